"""TensorFlow checkpoints: TF -> PyTorch weight names, strict loading, HDF5 refusals and the missing-extra error.

The checkpoints are copies of the committed fixture (tests/fixtures/tf_tiny_bert, made by scripts/make_tf_fixture.py
with transformers 4.x) edited with h5py, converted by the real converter into a real transformers BertModel.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from llmos.errors import BackendUnavailableError, InvalidModelFileError
from llmos.formats.tensorflow import find_tf_checkpoint, read_tf_weights, tf_to_hf, tf_to_pt_name

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tf_tiny_bert"
POOLER_KERNEL = "tf_bert_model/bert/pooler/dense/kernel:0"
torch = pytest.importorskip("torch")  # the conversion builds the PyTorch model (the torch extra)


@pytest.mark.parametrize(
    ("tf_name", "prefix", "ndim", "expected"),
    [
        (
            "tf_bert_model/bert/encoder/layer_._0/attention/self/query/kernel:0",
            "bert.",
            2,
            ("encoder.layer.0.attention.self.query.weight", (1, 0)),
        ),
        (  # a model with a head keeps the base model's prefix
            "tf_bert_for_sequence_classification/bert/encoder/layer_._11/output/dense/bias:0",
            "",
            1,
            ("bert.encoder.layer.11.output.dense.bias", None),
        ),
        ("tf_bert_model/bert/embeddings/LayerNorm/gamma:0", "bert.", 1, ("embeddings.LayerNorm.weight", None)),
        ("tf_bert_model/bert/embeddings/LayerNorm/beta:0", "bert.", 1, ("embeddings.LayerNorm.bias", None)),
        (
            "tf_bert_model/bert/embeddings/position_embeddings/embeddings:0",
            "bert.",
            2,
            ("embeddings.position_embeddings.weight", None),
        ),
        (
            "tf_bert_model/bert/embeddings/word_embeddings/weight:0",
            "bert.",
            2,
            ("embeddings.word_embeddings.weight", None),
        ),
        ("tf_bert_for_masked_lm/mlm___cls/predictions/bias:0", "", 1, ("cls.predictions.bias", None)),
        ("tf_bert_for_sequence_classification/classifier/kernel:0", "", 2, ("classifier.weight", (1, 0))),
        (
            "tf_vit_model/vit/embeddings/patch_embeddings/projection/kernel:0",
            "",
            4,
            (
                "vit.embeddings.patch_embeddings.projection.weight",
                (3, 2, 0, 1),
            ),
        ),
        ("final_logits_bias:0", "", 2, ("final_logits_bias", None)),  # a single level keeps its name
        ("tf_bert_model/bert/pooler/dense/kernel:0", "bert.", 2, ("pooler.dense.weight", (1, 0))),
    ],
)
def test_tf_names_map_to_pytorch_names(
    tf_name: str, prefix: str, ndim: int, expected: tuple[str, tuple[int, ...] | None]
) -> None:
    assert tf_to_pt_name(tf_name, prefix, ndim) == expected


def _edited_copy(tmp_path: Path, edit: Callable[[Any], None]) -> Path:
    """A copy of the fixture whose tf_model.h5 ``edit`` changed (given the ``bert`` layer group, opened r+)."""
    directory = tmp_path / "tf_model"
    shutil.copytree(FIXTURE, directory)
    with h5py.File(directory / "tf_model.h5", "r+") as handle:
        edit(handle["bert"])
    return directory


def _names(group: Any) -> list[bytes]:
    return [n if isinstance(n, bytes) else str(n).encode() for n in group.attrs["weight_names"]]


def _extra_weight(group: Any) -> None:
    group.create_dataset("tf_bert_model/bert/extra/dense/kernel:0", data=np.ones((32, 4), dtype=np.float32))
    group.attrs["weight_names"] = [*_names(group), b"tf_bert_model/bert/extra/dense/kernel:0"]


def _missing_weight(group: Any) -> None:
    del group[POOLER_KERNEL]
    group.attrs["weight_names"] = [n for n in _names(group) if n != POOLER_KERNEL.encode()]


def _wrong_shape(group: Any) -> None:
    del group[POOLER_KERNEL]
    group.create_dataset(POOLER_KERNEL, data=np.ones((32, 31), dtype=np.float32))


def _listed_not_stored(group: Any) -> None:
    del group[POOLER_KERNEL]


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (_extra_weight, "1 weight(s) no parameter takes: tf_bert_model/bert/extra/dense/kernel:0"),
        (_missing_weight, "1 parameter(s) no weight gives: pooler.dense.weight"),
        (_wrong_shape, f"1 shape mismatch(es): {POOLER_KERNEL} (31, 32) vs pooler.dense.weight (32, 32)"),
        (_listed_not_stored, "is listed but not stored"),
    ],
)
def test_a_checkpoint_that_does_not_fit_its_model_is_refused_in_one_line(
    tmp_path: Path, edit: Callable[[Any], None], fragment: str
) -> None:
    source = _edited_copy(tmp_path, edit)
    out = tmp_path / "out"
    with pytest.raises(InvalidModelFileError) as caught:
        tf_to_hf(source, out)
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not out.exists()  # refused before anything was written


def test_the_fixture_converts_to_a_safetensors_directory(tmp_path: Path) -> None:
    params = tf_to_hf(FIXTURE, tmp_path / "out")
    assert params["converted_from"] == "tensorflow"
    assert len(params["tf_model_sha256"]) == 64
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "model.safetensors" in names and "vocab.txt" in names and "config.json" in names
    assert not {"tf_model.h5", "expected_outputs.json"} & set(names)


def test_missing_h5py_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "h5py", None)  # `import h5py` now raises ImportError
    with pytest.raises(BackendUnavailableError, match=r"pip install 'llmos\[tensorflow,torch\]'"):
        tf_to_hf(FIXTURE, tmp_path / "out")
    with pytest.raises(BackendUnavailableError, match="h5py"):
        read_tf_weights(FIXTURE / "tf_model.h5")
    assert not (tmp_path / "out").exists()


def test_external_links_and_compressed_arrays_are_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as handle:
        handle.create_dataset("secret", data=np.arange(32 * 32, dtype=np.float32).reshape(32, 32))

    def linked(group: Any) -> None:
        del group[POOLER_KERNEL]
        group["tf_bert_model/bert/pooler/dense"]["kernel:0"] = h5py.ExternalLink(str(other), "secret")

    with pytest.raises(InvalidModelFileError, match="HDF5 link to elsewhere"):
        read_tf_weights(_edited_copy(tmp_path / "a", linked) / "tf_model.h5")

    def compressed(group: Any) -> None:
        del group[POOLER_KERNEL]
        group.create_dataset(POOLER_KERNEL, data=np.zeros((32, 32), dtype=np.float32), compression="gzip")

    with pytest.raises(InvalidModelFileError, match="filtered"):
        read_tf_weights(_edited_copy(tmp_path / "b", compressed) / "tf_model.h5")


def test_arrays_larger_than_the_file_are_refused(tmp_path: Path) -> None:
    def unwritten(group: Any) -> None:  # declared huge, never written: HDF5 would hand back fill values
        del group[POOLER_KERNEL]
        group.create_dataset(POOLER_KERNEL, shape=(32, 10**7), dtype=np.float32)

    with pytest.raises(InvalidModelFileError, match="larger than the file"):
        read_tf_weights(_edited_copy(tmp_path, unwritten) / "tf_model.h5")


def test_which_directories_are_tensorflow_checkpoints(tmp_path: Path) -> None:
    assert find_tf_checkpoint(FIXTURE) == FIXTURE / "tf_model.h5"

    with_pickle = tmp_path / "with_pickle"
    shutil.copytree(FIXTURE, with_pickle)
    (with_pickle / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    assert find_tf_checkpoint(with_pickle) is None  # left to inspect_path, which refuses pickles

    with_safetensors = tmp_path / "with_safetensors"
    shutil.copytree(FIXTURE, with_safetensors)
    (with_safetensors / "model.safetensors").write_bytes(b"")
    assert find_tf_checkpoint(with_safetensors) is None  # a plain Hugging Face directory

    keras = tmp_path / "keras"
    keras.mkdir()
    (keras / "config.json").write_text("{}")
    (keras / "model.keras").write_bytes(b"PK\x03\x04")
    with pytest.raises(InvalidModelFileError, match=r"model.keras: a Keras 3 \.keras archive is not supported"):
        find_tf_checkpoint(keras)
    with pytest.raises(InvalidModelFileError, match=r"only Hugging Face TensorFlow checkpoints saved as tf_model\.h5"):
        find_tf_checkpoint(keras / "model.keras")

    saved_model = tmp_path / "saved_model"
    (saved_model / "variables").mkdir(parents=True)
    (saved_model / "saved_model.pb").write_bytes(b"\x08\x01")
    with pytest.raises(InvalidModelFileError, match="SavedModel"):
        find_tf_checkpoint(saved_model)

    with pytest.raises(InvalidModelFileError, match="import the Hugging Face directory"):
        find_tf_checkpoint(FIXTURE / "tf_model.h5")

    assert find_tf_checkpoint(FIXTURE / "config.json") is None


@pytest.mark.parametrize("architectures", [["TFBertModel"], ["BertModel"], None])
def test_the_pytorch_class_is_the_tf_architecture_without_its_prefix(tmp_path: Path, architectures: Any) -> None:
    source = tmp_path / "tf_model"
    shutil.copytree(FIXTURE, source)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config.pop("architectures")
    if architectures is not None:
        config["architectures"] = architectures
    (source / "config.json").write_text(json.dumps(config), encoding="utf-8")
    tf_to_hf(source, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text(encoding="utf-8"))
    assert written["architectures"] == ["BertModel"]


def test_an_architecture_without_a_pytorch_class_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "tf_model"
    shutil.copytree(FIXTURE, source)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    (source / "config.json").write_text(json.dumps({**config, "architectures": ["TFNoSuchModel"]}), encoding="utf-8")
    with pytest.raises(InvalidModelFileError, match="TFNoSuchModel has no PyTorch model class"):
        tf_to_hf(source, tmp_path / "out")
