"""GGUF header reader that trusts nothing.

Contract: :func:`read_gguf` parses the header of a GGUF (v2/v3) file through a read-only memory map, checking every
count, length and offset against the file's real size before using it (and arrays nested at most
:data:`MAX_NESTING` deep, so no header can exhaust the stack), and returns the metadata key/values and the
tensor table. Weights are never read. Any malformed, truncated or absurd header raises
:class:`~llmos.errors.InvalidModelFileError` with a message that says what is wrong. :func:`inspect_gguf` turns the
result into a :class:`~llmos.formats.info.ModelInfo`.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmos.errors import InvalidModelFileError
from llmos.formats.info import ModelFile, ModelInfo

GGUF_MAGIC = b"GGUF"
MAX_TENSORS = 1_000_000
MAX_KV = 1_000_000
MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32
MAX_NESTING = 64  # arrays of arrays: real files nest at most one level
KEEP_ARRAY_LEN = 64  # arrays longer than this are summarised by their length in the returned metadata

# GGML tensor types: id -> (name, elements per block, bytes per block). Checked against gguf-py in the tests.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),  # ggml: 2 halves + 32 int8 (gguf-py says 40; never stored in files)
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}

# llama.cpp's `general.file_type` (enum llama_ftype) -> the quantization name people use.
FILE_TYPES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
}

# GGUF metadata value types: id -> struct format (None for string / array, handled separately).
_SCALARS: dict[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type_name: str
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int


class _Reader:
    """Bounds-checked little-endian reads from a buffer."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.size = len(buf)
        self.path = path

    def fail(self, what: str) -> InvalidModelFileError:
        return InvalidModelFileError(f"{self.path.name}: not a valid GGUF file: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} runs past the end of the file (truncated or corrupt header)")

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return int(self.scalar("<I", what))

    def u64(self, what: str) -> int:
        return int(self.scalar("<Q", what))

    def string(self, what: str) -> str:
        length = self.u64(f"length of {what}")
        if length > self.size - self.pos:
            raise self.fail(f"{what} claims {length} bytes but only {self.size - self.pos} remain")
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, keep_all: bool, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            if depth >= MAX_NESTING:
                raise self.fail(f"{what} nests arrays more than {MAX_NESTING} deep")
            item_type = self.u32(f"item type of {what}")
            count = self.u64(f"length of {what}")
            min_item = struct.calcsize(_SCALARS[item_type]) if item_type in _SCALARS else 8
            if item_type not in _SCALARS and item_type not in (_STRING, _ARRAY):
                raise self.fail(f"{what} has unknown item type {item_type}")
            if count > (self.size - self.pos) // min_item:
                raise self.fail(f"{what} claims {count} items, more than the file can hold")
            if not keep_all and count > KEEP_ARRAY_LEN and item_type != _ARRAY:
                if item_type == _STRING:  # walk the lengths without decoding
                    for _ in range(count):
                        length = self.u64(f"length of an item of {what}")
                        self.need(length, what)
                        self.pos += length
                else:
                    self.need(count * min_item, what)
                    self.pos += count * min_item
                return _ArrayLength(count)
            items = [self.value(item_type, what, keep_all, depth + 1) for _ in range(count)]
            return items if keep_all or count <= KEEP_ARRAY_LEN else _ArrayLength(count)
        raise self.fail(f"{what} has unknown value type {vtype}")


class _ArrayLength(int):
    """Placeholder for a long array whose items were skipped: its value is the item count."""


_KEEP_FULL_KEYS = {"tokenizer.ggml.tokens"}


def read_gguf(path: Path) -> GGUFHeader:
    """Parse and validate the header of the GGUF file at ``path``."""
    try:
        with path.open("rb") as handle:
            file_size = path.stat().st_size
            if file_size < 4:
                raise InvalidModelFileError(f"{path.name}: not a valid GGUF file: only {file_size} bytes")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(_Reader(buf, path), file_size)
    except OSError as exc:
        raise InvalidModelFileError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _parse(reader: _Reader, file_size: int) -> GGUFHeader:
    reader.need(4, "magic")
    if bytes(reader.buf[0:4]) != GGUF_MAGIC:
        raise reader.fail("missing GGUF magic")
    reader.pos = 4
    version = reader.u32("version")
    if version not in (2, 3):
        raise reader.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = reader.u64("tensor count")
    n_kv = reader.u64("metadata count")
    if n_tensors > MAX_TENSORS or n_tensors * 24 > file_size:
        raise reader.fail(f"header claims {n_tensors} tensors, which this {file_size}-byte file cannot hold")
    if n_kv > MAX_KV or n_kv * 12 > file_size:
        raise reader.fail(f"header claims {n_kv} metadata entries, which this {file_size}-byte file cannot hold")

    metadata: dict[str, Any] = {}
    for index in range(n_kv):
        key = reader.string(f"metadata key #{index}")
        vtype = reader.u32(f"type of metadata {key!r}")
        metadata[key] = reader.value(vtype, f"metadata {key!r}", keep_all=key in _KEEP_FULL_KEYS)

    raw_tensors: list[tuple[str, tuple[int, ...], int, int]] = []
    for index in range(n_tensors):
        name = reader.string(f"name of tensor #{index}")
        n_dims = reader.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise reader.fail(f"tensor {name!r} has {n_dims} dimensions (allowed: 1..{MAX_DIMS})")
        shape = tuple(reader.u64(f"shape of tensor {name!r}") for _ in range(n_dims))
        ggml_type = reader.u32(f"type of tensor {name!r}")
        offset = reader.u64(f"offset of tensor {name!r}")
        raw_tensors.append((name, shape, ggml_type, offset))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20:
        raise reader.fail(f"invalid general.alignment {alignment!r}")
    data_offset = -(-reader.pos // alignment) * alignment
    data_size = file_size - data_offset
    if n_tensors and data_size < 0:
        raise reader.fail("tensor data section is missing (file truncated)")

    tensors: list[TensorInfo] = []
    for name, shape, ggml_type, offset in raw_tensors:
        if ggml_type not in GGML_TYPES:
            raise reader.fail(f"tensor {name!r} has unknown type id {ggml_type}")
        type_name, block, type_size = GGML_TYPES[ggml_type]
        n_elements = math.prod(shape)
        if any(d == 0 for d in shape) or n_elements > 1 << 48:
            raise reader.fail(f"tensor {name!r} has an absurd shape {list(shape)}")
        if shape[0] % block:
            raise reader.fail(f"tensor {name!r} row size {shape[0]} is not a multiple of its {type_name} block")
        nbytes = n_elements // block * type_size
        if offset % alignment or offset + nbytes > data_size:
            raise reader.fail(
                f"tensor {name!r} lies at bytes {offset}..{offset + nbytes} of a {max(data_size, 0)}-byte data"
                " section (file truncated or corrupt)"
            )
        tensors.append(TensorInfo(name, shape, type_name, offset, nbytes))
    return GGUFHeader(version, metadata, tensors, data_offset, file_size)


def _quantization(header: GGUFHeader) -> str | None:
    file_type = header.metadata.get("general.file_type")
    if isinstance(file_type, int) and file_type in FILE_TYPES:
        return FILE_TYPES[file_type]
    counts: dict[str, int] = {}
    for tensor in header.tensors:
        counts[tensor.type_name] = counts.get(tensor.type_name, 0) + tensor.nbytes
    return max(counts, key=lambda k: counts[k]) if counts else None


def _token(tokens: Any, index: Any) -> str | None:
    if isinstance(tokens, list) and isinstance(index, int) and 0 <= index < len(tokens):
        return str(tokens[index])
    return None


def inspect_gguf(path: Path, model_path: str = "model.gguf") -> ModelInfo:
    """Describe the GGUF model at ``path``; it becomes the single file ``model_path`` of the model."""
    header = read_gguf(path)
    meta = header.metadata
    if not header.tensors:
        raise InvalidModelFileError(f"{path.name}: GGUF file holds no tensors (a vocabulary-only file?)")
    arch = meta.get("general.architecture")
    arch = arch if isinstance(arch, str) else None
    context = meta.get(f"{arch}.context_length") if arch else None
    tokens = meta.get("tokenizer.ggml.tokens")
    tokenizer: dict[str, Any] = {
        "model": meta.get("tokenizer.ggml.model"),
        "vocab_size": len(tokens) if isinstance(tokens, list) else None,
        "bos_token": _token(tokens, meta.get("tokenizer.ggml.bos_token_id")),
        "eos_token": _token(tokens, meta.get("tokenizer.ggml.eos_token_id")),
    }
    template = meta.get("tokenizer.chat_template")
    shape = _shape(meta, arch)
    scalars = {
        k: v
        for k, v in meta.items()
        if isinstance(v, str | int | float | bool)
        and not isinstance(v, _ArrayLength)
        and k != "tokenizer.chat_template"
    }
    return ModelInfo(
        format="gguf",
        files=[ModelFile(path, model_path, header.file_size)],
        architecture=arch,
        parameter_count=sum(t.n_elements for t in header.tensors),
        quantization=_quantization(header),
        context_length=int(context) if isinstance(context, int) and context > 0 else None,
        chat_template=template if isinstance(template, str) else None,
        tokenizer=tokenizer,
        metadata={
            "gguf_version": header.version,
            "tensor_count": len(header.tensors),
            **({"shape": shape} if shape else {}),
            **_small(scalars),
        },
    )


def _shape(meta: dict[str, Any], arch: str | None) -> dict[str, int] | None:
    """Transformer dimensions (for memory estimates), when the file states them."""

    def get(key: str) -> int | None:
        value = meta.get(f"{arch}.{key}")
        return value if isinstance(value, int) and value > 0 else None

    layers, embedding, heads = get("block_count"), get("embedding_length"), get("attention.head_count")
    if not (arch and layers and embedding and heads):
        return None
    kv_heads = get("attention.head_count_kv") or heads
    return {
        "layers": layers,
        "embedding": embedding,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": get("attention.key_length") or embedding // heads,
    }


def _small(values: dict[str, Any]) -> dict[str, Any]:
    """Keep scalar metadata that is short enough to store and show."""
    return {k: v for k, v in values.items() if not (isinstance(v, str) and len(v) > 512)}
