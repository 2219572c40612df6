"""safetensors header reader that trusts nothing.

Contract: :func:`read_safetensors_header` reads the 8-byte header length and the JSON header of a ``.safetensors``
file, refusing a length beyond the file or beyond a sane cap and JSON nested deeper than
:data:`~llmos.formats.safe_json.MAX_DEPTH`, and checks every tensor's dtype, shape and byte range against the data
section. As the safetensors library itself requires, the ranges, sorted, must tile the data section exactly: no
overlap (two tensors on the same bytes), no gap, nothing past its end, and each range the size of its dtype times its
shape. Tensor bytes are never read. Errors raise :class:`~llmos.errors.InvalidModelFileError`.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmos.errors import InvalidModelFileError
from llmos.formats import safe_json
from llmos.formats.info import ModelFile, ModelInfo

MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
}


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype, shape)
    metadata: dict[str, str]
    file_size: int

    @property
    def parameter_count(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors.values())

    @property
    def main_dtype(self) -> str | None:
        weight: dict[str, int] = {}
        for dtype, shape in self.tensors.values():
            weight[dtype] = weight.get(dtype, 0) + math.prod(shape)
        return max(weight, key=lambda k: weight[k]) if weight else None


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    name = path.name

    def fail(what: str) -> InvalidModelFileError:
        return InvalidModelFileError(f"{name}: not a valid safetensors file: {what}")

    try:
        file_size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise fail(f"only {len(prefix)} bytes")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > file_size - 8:
                raise fail(f"header length {header_len} exceeds the file ({file_size} bytes)")
            if header_len > MAX_HEADER_BYTES:
                raise fail(f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
            raw = handle.read(header_len)
    except OSError as exc:
        raise InvalidModelFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(raw) != header_len:
        raise fail("header truncated")
    try:
        header = safe_json.loads(raw, "header")
    except InvalidModelFileError as exc:
        raise fail(exc.message) from exc
    if not isinstance(header, dict):
        raise fail("header is not a JSON object")

    data_size = file_size - 8 - header_len
    metadata_raw = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata_raw, dict):
        raise fail("__metadata__ is not an object")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    ranges: list[tuple[int, int, str]] = []
    for tensor_name, entry in header.items():
        tensors[tensor_name] = _check_tensor(tensor_name, entry, data_size, fail)
        ranges.append((entry["data_offsets"][0], entry["data_offsets"][1], tensor_name))
    _check_tiling(ranges, data_size, fail)
    metadata = {str(k): str(v) for k, v in metadata_raw.items()}
    return SafetensorsHeader(tensors, metadata, file_size)


def _check_tensor(name: str, entry: Any, data_size: int, fail: Any) -> tuple[str, tuple[int, ...]]:
    if not isinstance(entry, dict):
        raise fail(f"entry for tensor {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise fail(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape) or len(shape) > 8:
        raise fail(f"tensor {name!r} has an invalid shape")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise fail(f"tensor {name!r} has byte range {offsets!r} outside the {data_size}-byte data section")
    if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise fail(f"tensor {name!r}: byte range does not match its shape and dtype")
    return dtype, tuple(shape)


def _check_tiling(ranges: list[tuple[int, int, str]], data_size: int, fail: Any) -> None:
    """The byte ranges, sorted, must follow each other exactly from 0 to the end of the data section."""
    position, previous = 0, None
    for start, end, name in sorted(ranges):
        if start < position:
            raise fail(f"tensor {name!r} (bytes {start}..{end}) overlaps tensor {previous!r}")
        if start > position:
            raise fail(f"a gap of {start - position} bytes lies before tensor {name!r} (bytes {start}..{end})")
        position, previous = end, name
    if position != data_size:
        raise fail(f"the tensors cover {position} bytes of the {data_size}-byte data section")


def inspect_safetensors(path: Path, model_path: str = "model.safetensors") -> ModelInfo:
    """Describe a single ``.safetensors`` file as a model (no config: architecture comes from metadata if any)."""
    header = read_safetensors_header(path)
    if not header.tensors:
        raise InvalidModelFileError(f"{path.name}: safetensors file holds no tensors")
    return ModelInfo(
        format="safetensors",
        files=[ModelFile(path, model_path, header.file_size)],
        architecture=header.metadata.get("architecture"),
        parameter_count=header.parameter_count,
        quantization=header.main_dtype,
        metadata={"tensor_count": len(header.tensors), **header.metadata},
    )
