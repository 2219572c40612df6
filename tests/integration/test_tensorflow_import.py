"""`llmos import` of a Hugging Face TensorFlow checkpoint through the real CLI: converted to safetensors, registered
with its origin in the lineage, and the registered model computes what the TensorFlow model computed.

The fixture (tests/fixtures/tf_tiny_bert) was written by transformers 4.x ``TFBertModel.save_pretrained``
(scripts/make_tf_fixture.py); its expected_outputs.json holds the TensorFlow model's own outputs.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from llmos.config import Settings
from llmos.registry.service import Registry
from tests.helpers import run_cli, store_snapshot

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tf_tiny_bert"
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow


def test_import_converts_registers_and_computes_what_tensorflow_computed(home: Path, tmp_path: Path) -> None:
    template = tmp_path / "template.jinja"  # --chat-template goes through the conversion too
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    result = run_cli(home, "import", str(FIXTURE), "--name", "tfbert", "--chat-template", str(template))
    assert result.returncode == 0, result.stderr

    shown = run_cli(home, "show", "tfbert", "--json")
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert view["format"] == "hf"
    assert view["architecture"] == "BertModel"
    assert view["chat_template"] == template.read_text(encoding="utf-8")
    params = view["lineage"][0]["params"]
    assert view["lineage"][0]["operation"] == "import"
    assert params["converted_from"] == "tensorflow"
    assert params["tf_model_sha256"] == hashlib.sha256((FIXTURE / "tf_model.h5").read_bytes()).hexdigest()
    assert params["source"] == "tf_tiny_bert"
    files = {f["path"] for f in view["files"]}
    assert {"model.safetensors", "config.json", "vocab.txt", "tokenizer_config.json"} <= files
    assert not files & {"tf_model.h5", "expected_outputs.json"}
    assert not any((home / "tmp").iterdir())  # the scratch directory of the conversion is gone

    from transformers import AutoTokenizer, BertModel

    expected = json.loads((FIXTURE / "expected_outputs.json").read_text(encoding="utf-8"))
    registry = Registry(Settings(home=home))
    try:
        resolved = registry.resolve("tfbert", verify=True)
        with registry.loadable_dir(resolved) as model_dir:
            model = BertModel.from_pretrained(model_dir, local_files_only=True)  # in eval mode
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    finally:
        registry.close()
    assert tokenizer(expected["tokenizer"]["text"])["input_ids"] == expected["tokenizer"]["input_ids"]
    for batch in expected["batches"]:
        with torch.no_grad():
            output = model(
                input_ids=torch.tensor(batch["input_ids"]),
                attention_mask=torch.tensor(batch["attention_mask"]),
                token_type_ids=torch.tensor(batch["token_type_ids"]),
            )
        hidden = np.abs(output.last_hidden_state.numpy() - np.asarray(batch["last_hidden_state"])).max()
        pooled = np.abs(output.pooler_output.numpy() - np.asarray(batch["pooler_output"])).max()
        assert hidden < 1e-4 and pooled < 1e-4, (hidden, pooled)


def _with_pickle(directory: Path) -> None:
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}))


def _keras_instead(directory: Path) -> None:
    (directory / "tf_model.h5").unlink()
    (directory / "model.keras").write_bytes(b"PK\x03\x04")


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (_with_pickle, "pytorch_model.bin: pickle checkpoints are refused"),
        (_keras_instead, "model.keras: a Keras 3 .keras archive is not supported"),
    ],
)
def test_refused_tensorflow_directories_leave_the_store_unchanged(
    home: Path, tmp_path: Path, make: object, fragment: str
) -> None:
    assert run_cli(home, "import", str(FIXTURE), "--name", "tfbert").returncode == 0
    before = store_snapshot(home)
    source = tmp_path / "tf_tiny_bert"
    shutil.copytree(FIXTURE, source)
    make(source)  # type: ignore[operator]
    result = run_cli(home, "import", str(source), "--name", "tfbert2")
    assert result.returncode != 0
    stderr = result.stderr.strip()
    assert fragment in stderr, stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert "Traceback" not in stderr
    assert store_snapshot(home) == before
