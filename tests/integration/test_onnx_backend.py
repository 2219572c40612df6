"""The ONNX Runtime backend on a tiny random Llama exported by llmos: the same greedy tokens as the PyTorch backend,
alone, in a batch, across group changes (sequences joining and leaving), after truncation and with chunked prefill.

The model is random (weights with a large spread, so attention and positions visibly shape the logits), which makes
any mistake in the cell layout, the masks or the positions change the tokens. The engine is stepped directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

from llmos.engine.backends.base import BatchItem
from llmos.engine.backends.onnx import OnnxBackend
from llmos.engine.backends.torch import TorchBackend
from llmos.engine.core import EngineConfig, EngineCore
from llmos.engine.request import GenerationRequest
from llmos.engine.streams import SyncOutputStream
from llmos.formats.onnx_export import export_decoder
from llmos.types import SamplingParams
from tests.helpers import make_tiny_bpe_llama

PROMPTS = ["double 7? 14.", "The year (1912) had", "Hello, world!", "user assistant", "double 31?", "isn't it?"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("onnx-tiny")
    hf = make_tiny_bpe_llama(root / "hf", seed=3)
    export_decoder(hf, root / "onnx")
    return hf, root / "onnx"


@pytest.fixture(scope="module")
def onnx_backend(dirs: tuple[Path, Path]) -> Iterator[OnnxBackend]:
    backend = OnnxBackend(dirs[1], n_seq_max=8, n_ctx_seq=128, threads=1)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def torch_backend(dirs: tuple[Path, Path]) -> Iterator[TorchBackend]:
    backend = TorchBackend(dirs[0], n_seq_max=8, n_ctx_seq=128, threads=1)
    yield backend
    backend.close()


def generate(backend: object, prompts: list[list[int]], max_tokens: int = 20, **config: object) -> list[list[int]]:
    core = EngineCore(backend, EngineConfig(prefix_cache=False, speculative=False, **config), background=False)  # type: ignore[arg-type]
    streams = []
    for prompt in prompts:
        stream = SyncOutputStream()
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        core.submit(GenerationRequest(prompt, params), stream)
        streams.append(stream)
    while core.has_work():
        core.step()
    return [[t for event in stream for t in event.token_ids] for stream in streams]


def test_the_export_is_a_decoder_graph_with_its_tokenizer(dirs: tuple[Path, Path]) -> None:
    from llmos.formats.detect import inspect_path

    info = inspect_path(dirs[1])
    assert info.format == "onnx"
    assert info.metadata["task"] == "generation"
    assert info.metadata["shape"] == {"layers": 2, "kv_heads": 2, "head_dim": 16}
    assert sorted(info.metadata["external_data"]) == ["model.onnx.data"]
    assert {f.path for f in info.files} >= {"model.onnx", "model.onnx.data", "tokenizer.json", "config.json"}


def test_greedy_tokens_match_the_torch_backend_alone_and_batched(
    onnx_backend: OnnxBackend, torch_backend: TorchBackend
) -> None:
    prompts = [onnx_backend.tokenize(p, add_special=False) for p in PROMPTS]
    assert prompts == [torch_backend.tokenize(p, add_special=False) for p in PROMPTS]
    reference = [generate(torch_backend, [p])[0] for p in prompts]
    assert len({tuple(r) for r in reference}) > 1
    assert [generate(onnx_backend, [p])[0] for p in prompts] == reference
    assert generate(onnx_backend, prompts) == reference  # one batch: groups, padding and masks change nothing
    # more prompts than slots: sequences finish and others join, so groups are rebuilt mid-generation
    assert generate(onnx_backend, prompts + prompts[:4], max_tokens=12) == [r[:12] for r in reference + reference[:4]]
    # a prefill split into chunks of 3 tokens next to running decodes
    chunked = generate(onnx_backend, prompts, max_prefill_tokens=3)
    assert chunked == reference


def test_truncation_and_logits_rows(onnx_backend: OnnxBackend, torch_backend: TorchBackend) -> None:
    tokens = onnx_backend.tokenize("double 7? 14. The year", add_special=False)
    rows = onnx_backend.decode([BatchItem(0, tokens, 0, logits="all")])
    assert rows == {0: list(range(len(tokens)))}
    full = np.stack([onnx_backend._row_logits(r).copy() for r in rows[0]])
    torch_rows = torch_backend.decode([BatchItem(0, tokens, 0, logits="all")])
    expected = np.stack([torch_backend._row_logits(r).numpy() for r in torch_rows[0]])
    np.testing.assert_allclose(full, expected, atol=2e-3)
    # forget the tail and append it again one token at a time: the same logits
    onnx_backend.forget_sequence(0, 3)
    for index in range(3, len(tokens)):
        again = onnx_backend.decode([BatchItem(0, tokens[index : index + 1], index)])
        np.testing.assert_allclose(onnx_backend._row_logits(again[0][0]), full[index], atol=2e-3)
    onnx_backend.forget_sequence(0)
    torch_backend.forget_sequence(0)
    with pytest.raises(ValueError, match="cannot append"):
        onnx_backend.decode([BatchItem(1, tokens, 5)])


def test_a_group_truncated_to_a_fraction_is_compacted_and_computes_the_same(onnx_backend: OnnxBackend) -> None:
    tokens = onnx_backend.tokenize("double 7? 14. The year (1912) had 365 days, isn't it? " * 6, add_special=False)
    assert len(tokens) > 70
    onnx_backend.decode([BatchItem(2, tokens[:80], 0)])
    onnx_backend.forget_sequence(2, 10)  # 70 of 80 cells now empty in every row
    rows = onnx_backend.decode([BatchItem(2, tokens[10:11], 10)])
    after = onnx_backend._row_logits(rows[2][0]).copy()
    group = onnx_backend._group_of[2]
    assert group.positions.shape[1] == 11  # compacted: only the cells it holds
    fresh = onnx_backend.decode([BatchItem(3, tokens[:11], 0)])
    np.testing.assert_allclose(after, onnx_backend._row_logits(fresh[3][0]), atol=1e-4)
    onnx_backend.forget_sequence(2)
    onnx_backend.forget_sequence(3)
