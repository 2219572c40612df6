"""`llmos import` of ONNX graphs: what is inspected and recorded, and what is refused with one line, store unchanged.

Tiny graphs are built here with onnx's helpers (an embedding lookup, weights in an external data file), so each case
differs from a valid graph in exactly one way: an external-data path that escapes the directory, a truncated graph,
an input the backend does not feed, a data file shorter than its tensors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_cli, store_snapshot

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
TensorProto, helper, numpy_helper = onnx.TensorProto, onnx.helper, onnx.numpy_helper


def make_graph(directory: Path, *, location: str = "weights.bin", extra_input: str | None = None) -> Path:
    """An encoder-shaped graph: input_ids -> Gather(table) -> last_hidden_state, the table in ``location``."""
    directory.mkdir(parents=True, exist_ok=True)
    table = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "table")
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])]
    if extra_input:
        inputs.append(helper.make_tensor_value_info(extra_input, TensorProto.FLOAT, ["batch", 3]))
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["last_hidden_state"])],
        "tiny",
        inputs,
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", 4])],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = (directory / location).resolve()
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_bytes(table.raw_data)
    table.ClearField("raw_data")
    table.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "160")):
        entry = table.external_data.add()
        entry.key, entry.value = key, value
    model.graph.initializer[0].CopyFrom(table)
    (directory / "model.onnx").write_bytes(model.SerializeToString())
    (directory / "config.json").write_text(json.dumps({"architectures": ["TinyEncoder"], "vocab_size": 10}))
    return directory


def test_a_graph_imports_with_its_facts_and_external_data_digest(tmp_path: Path) -> None:
    home = tmp_path / "home"
    source = make_graph(tmp_path / "tiny")
    result = run_cli(home, "import", str(source), "--name", "tiny:onnx")
    assert result.returncode == 0, result.stderr
    shown = json.loads(run_cli(home, "show", "tiny:onnx", "--json").stdout)
    assert shown["format"] == "onnx"
    assert shown["parameter_count"] == 40
    details = shown["details"]
    assert details["task"] == "embedding" and details["opset"] == 17
    assert details["inputs"] == {"input_ids": ["batch", "sequence"]}
    digest = hashlib.sha256((source / "weights.bin").read_bytes()).hexdigest()
    assert details["external_data"] == {"weights.bin": digest}
    assert sorted(f["path"] for f in shown["files"]) == ["config.json", "model.onnx", "weights.bin"]


@pytest.fixture(scope="module")
def store_with_a_graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("onnx-store")
    assert run_cli(root / "home", "import", str(make_graph(root / "good")), "--name", "good:onnx").returncode == 0
    return root / "home"


def _truncate(directory: Path) -> None:
    graph = directory / "model.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])


def _shorten_data(directory: Path) -> None:
    data = directory / "weights.bin"
    data.write_bytes(data.read_bytes()[:100])


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda d: make_graph(d, location="../outside.bin"), "outside the graph's directory"),
        (lambda d: make_graph(d, location="/tmp/llmos-absolute.bin"), "outside the graph's directory"),
        (lambda d: _truncate(make_graph(d)), "not a readable ONNX graph"),
        (lambda d: make_graph(d, extra_input="pixel_values"), "unsupported inputs pixel_values"),
        (lambda d: _shorten_data(make_graph(d)), "shorter than its tensors need"),
    ],
    ids=["escaping-path", "absolute-path", "truncated", "unsupported-input", "short-data"],
)
def test_bad_graphs_are_refused_in_one_line_and_the_store_is_unchanged(
    store_with_a_graph: Path, tmp_path: Path, build: object, message: str
) -> None:
    home = store_with_a_graph
    before = store_snapshot(home)
    bad = tmp_path / "bad" / "model"
    build(bad)  # type: ignore[operator]
    result = run_cli(home, "import", str(bad), "--name", "bad:onnx")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert store_snapshot(home) == before
