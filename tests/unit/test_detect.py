"""Format detection, safetensors headers, Hugging Face directories and refusal of pickle checkpoints."""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path

import pytest

from llmos.errors import InvalidModelFileError, UnsafeFormatError
from llmos.formats.detect import inspect_path
from llmos.formats.safetensors import read_safetensors_header


def safetensors_bytes(
    tensors: dict[str, tuple[str, list[int]]] | None = None, header_override: bytes | None = None
) -> bytes:
    tensors = {"w": ("F32", [2, 3])} if tensors is None else tensors
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    data = b""
    for name, (dtype, shape) in tensors.items():
        size = 4 if dtype == "F32" else 2
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + size]}
        data += b"\0" * size
    raw = header_override if header_override is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_safetensors_file_is_inspected(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes({"a": ("F32", [2, 3]), "b": ("BF16", [4])}))
    info = inspect_path(path)
    assert info.format == "safetensors"
    assert info.parameter_count == 10
    assert info.quantization == "F32"


def test_safetensors_header_longer_than_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(InvalidModelFileError, match="exceeds the file"):
        inspect_path(path)


@pytest.mark.parametrize(
    "header",
    [
        b"[1, 2]",
        b"{not json",
        b"[" * 100_000 + b"]" * 100_000,
        json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 999]}}).encode(),
        json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode(),
        json.dumps({"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}).encode(),
        json.dumps({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}).encode(),
    ],
)
def test_malformed_safetensors_headers_are_refused(tmp_path: Path, header: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(safetensors_bytes({"w": ("F32", [2])}, header_override=header))
    with pytest.raises(InvalidModelFileError):
        read_safetensors_header(path)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl"])
def test_pickle_checkpoints_are_refused_by_extension(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"pytorch_model{suffix}"
    path.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))
    with pytest.raises(UnsafeFormatError, match="arbitrary code"):
        inspect_path(path)


def test_pickle_and_torch_zip_are_refused_by_content(tmp_path: Path) -> None:
    disguised = tmp_path / "weights.dat"
    disguised.write_bytes(pickle.dumps([1, 2, 3], protocol=4))
    with pytest.raises(UnsafeFormatError):
        inspect_path(disguised)
    archive = tmp_path / "model.weights"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({}))
    with pytest.raises(UnsafeFormatError):
        inspect_path(archive)


def test_non_model_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("just some text, definitely not a model\n" * 10)
    with pytest.raises(InvalidModelFileError, match="unrecognised model format"):
        inspect_path(path)


def test_missing_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelFileError, match="no such file"):
        inspect_path(tmp_path / "nope.gguf")


def test_hugging_face_directory_takes_only_allowed_files(tmp_path: Path) -> None:
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 2048, "model_type": "llama"})
    )
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{x}}", "eos_token": "</s>"}))
    (model / "tokenizer.json").write_text("{}")
    (model / "model.safetensors").write_bytes(safetensors_bytes({"w": ("BF16", [4, 4])}))
    (model / "modeling_evil.py").write_text("import os; os.system('echo pwned')")
    (model / "pytorch_model.bin").write_bytes(pickle.dumps({}))
    info = inspect_path(model)
    assert info.format == "hf"
    assert info.architecture == "LlamaForCausalLM"
    assert info.context_length == 2048
    assert info.parameter_count == 16
    assert info.chat_template == "{{x}}"
    assert sorted(f.path for f in info.files) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_hugging_face_directory_with_only_pickle_weights_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "pytorch_model.bin").write_bytes(pickle.dumps({}))
    with pytest.raises(UnsafeFormatError):
        inspect_path(model)


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelFileError, match=r"no config\.json"):
        inspect_path(tmp_path)
