from __future__ import annotations

import struct
from pathlib import Path

import pytest

from llmos.errors import InvalidModelFileError
from llmos.formats.gguf import GGML_TYPES, inspect_gguf, read_gguf
from tests.helpers import gguf_bytes


def write(tmp_path: Path, data: bytes, name: str = "m.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_valid_file_is_described(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        gguf_bytes(
            metadata={
                "general.architecture": "llama",
                "llama.context_length": 2048,
                "general.file_type": 3,
                "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.tokens": ["<s>", "</s>", "a", "b"],
                "tokenizer.ggml.bos_token_id": 0,
                "tokenizer.ggml.eos_token_id": 1,
                "tokenizer.chat_template": "{{ messages }}",
            },
            tensors=[("a", (32, 2), 0), ("b", (64,), 0)],
        ),
    )
    info = inspect_gguf(path)
    assert info.format == "gguf"
    assert info.architecture == "llama"
    assert info.context_length == 2048
    assert info.quantization == "Q4_1"
    assert info.parameter_count == 32 * 2 + 64
    assert info.chat_template == "{{ messages }}"
    assert info.tokenizer == {"model": "gpt2", "vocab_size": 4, "bos_token": "<s>", "eos_token": "</s>"}
    assert info.files[0].size == path.stat().st_size


def test_real_smollm2_header(smollm2_file: Path) -> None:
    info = inspect_gguf(smollm2_file)
    assert (info.architecture, info.quantization, info.context_length) == ("llama", "Q4_1", 8192)
    assert 130e6 < (info.parameter_count or 0) < 140e6
    assert info.tokenizer["vocab_size"] == 49152
    assert "<|im_start|>" in (info.chat_template or "")


def test_type_table_matches_gguf_py() -> None:
    gguf = pytest.importorskip("gguf")
    reference = {int(t): (t.name, block, size) for t, (block, size) in gguf.constants.GGML_QUANT_SIZES.items()}
    for type_id, expected in reference.items():
        if expected[0] == "Q8_1":  # gguf-py's size differs from ggml's struct; the type never appears in files
            continue
        assert GGML_TYPES.get(type_id) == expected, type_id


def test_truncated_real_file_is_refused(tmp_path: Path, smollm2_file: Path) -> None:
    with smollm2_file.open("rb") as handle:
        head = handle.read(1024 * 1024)
    with pytest.raises(InvalidModelFileError, match=r"truncated|past the end|more than the file can hold"):
        inspect_gguf(write(tmp_path, head))


def test_magic_only_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelFileError, match="past the end"):
        read_gguf(write(tmp_path, b"GGUF"))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"n_tensors_override": 2**62}, "tensors"),
        ({"n_kv_override": 2**60}, "metadata entries"),
        ({"version": 99}, "unsupported GGUF version"),
    ],
)
def test_absurd_header_counts_are_refused(tmp_path: Path, kwargs: dict[str, int], fragment: str) -> None:
    with pytest.raises(InvalidModelFileError, match=fragment):
        read_gguf(write(tmp_path, gguf_bytes(**kwargs)))


def test_absurd_string_length_is_refused(tmp_path: Path) -> None:
    data = bytearray(gguf_bytes(metadata={"general.name": "x"}, tensors=[]))
    key_len_at = 4 + 4 + 8 + 8
    value_len_at = key_len_at + 8 + len("general.name") + 4
    data[value_len_at : value_len_at + 8] = struct.pack("<Q", 2**63)
    with pytest.raises(InvalidModelFileError, match="claims"):
        read_gguf(write(tmp_path, bytes(data)))


def test_absurd_array_length_is_refused(tmp_path: Path) -> None:
    data = bytearray(gguf_bytes(metadata={"tokenizer.ggml.tokens": ["a"]}, tensors=[]))
    count_at = 4 + 4 + 8 + 8 + 8 + len("tokenizer.ggml.tokens") + 4 + 4
    data[count_at : count_at + 8] = struct.pack("<Q", 2**61)
    with pytest.raises(InvalidModelFileError, match="items"):
        read_gguf(write(tmp_path, bytes(data)))


def test_tensor_past_end_of_file_is_refused(tmp_path: Path) -> None:
    data = gguf_bytes(tensors=[("big", (1024, 1024), 0)])
    with pytest.raises(InvalidModelFileError, match="truncated or corrupt"):
        read_gguf(write(tmp_path, data[: len(data) - 4096]))


@pytest.mark.parametrize(
    ("tensor", "fragment"),
    [
        (("bad", (4,), 77), "unknown type id"),
        (("bad", (0, 4), 0), "absurd shape"),
        (("bad", (2**40, 2**40), 0), "absurd shape"),
        (("bad", (31,), 2), "not a multiple"),
    ],
)
def test_bad_tensor_entries_are_refused(
    tmp_path: Path, tensor: tuple[str, tuple[int, ...], int], fragment: str
) -> None:
    with pytest.raises(InvalidModelFileError, match=fragment):
        read_gguf(write(tmp_path, gguf_bytes(tensors=[tensor])))


def test_too_many_dimensions_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelFileError, match="dimensions"):
        read_gguf(write(tmp_path, gguf_bytes(tensors=[("t", (1, 1, 1, 1, 1), 0)])))


def test_file_without_tensors_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelFileError, match="no tensors"):
        inspect_gguf(write(tmp_path, gguf_bytes(tensors=[])))
