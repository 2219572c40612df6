"""Memory facts: how much RAM there is, how much this process uses, and what a model will cost.

Contract: :func:`process_rss` reads the resident set size of this process from ``/proc`` (the number the budget is
checked against in tests). :func:`estimate_bytes` predicts what loading a version will add, from its metadata alone:
weights plus KV cache plus a compute allowance, per backend. Estimates are corrected by measured loads in the
residency manager. :func:`parse_size` reads budgets such as ``8GB``, ``512MiB``, ``60%`` (of RAM) or a plain number
of bytes. :func:`release_freed_memory` asks the C allocator to give freed pages back after an unload.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
from typing import Any

from llmos.errors import InvalidInputError

COMPUTE_ALLOWANCE = 128 * 1024 * 1024
"""Scratch buffers a loaded model needs besides weights and KV cache (llama.cpp reports ~100 MiB for n_batch 512)."""

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}  # fmt: skip


def total_ram() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("MemTotal not found in /proc/meminfo")  # pragma: no cover


def process_rss() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0  # pragma: no cover


def parse_size(text: str | int, *, total: int | None = None) -> int:
    """Bytes from ``"8GB"``, ``"512MiB"``, ``"60%"`` (of ``total``, default RAM) or a number."""
    if isinstance(text, int):
        return text
    value = text.strip().lower()
    if value.endswith("%"):
        try:
            share = float(value[:-1])
        except ValueError as exc:
            raise InvalidInputError(f"invalid memory size {text!r}") from exc
        if not 0 < share <= 100:
            raise InvalidInputError(f"a memory share must be between 0 and 100%, got {text!r}")
        return int((total if total is not None else total_ram()) * share / 100)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    if not match or match.group(2) not in _UNITS:
        raise InvalidInputError(f"invalid memory size {text!r}; use e.g. 8GB, 512MiB, 60% or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover


KV_VALUE_BYTES = {"f16": 2.0, "f32": 4.0, "q8_0": 34 / 32}  # llama.cpp KV element types (q8_0: 32 values + a scale)


def kv_cache_bytes(details: dict[str, Any], tokens: int, bytes_per_value: float) -> int:
    """KV cache for ``tokens`` cells from the shape the inspector recorded (layers x 2 x kv heads x head dim)."""
    shape = details.get("shape")
    if not isinstance(shape, dict):
        return 0
    layers, kv_heads, head_dim = shape.get("layers"), shape.get("kv_heads"), shape.get("head_dim")
    if not all(isinstance(v, int) and v > 0 for v in (layers, kv_heads, head_dim)):
        return 0
    return int(int(str(layers)) * 2 * int(str(kv_heads)) * int(str(head_dim)) * tokens * bytes_per_value)


def estimate_bytes(
    *,
    backend: str,
    file_size: int,
    parameter_count: int | None,
    details: dict[str, Any],
    kv_tokens: int,
    kv_cache_type: str = "f16",
) -> int:
    """What loading a model is expected to add to this process's RSS (the llama.cpp KV pool is allocated whole)."""
    if backend == "llama.cpp":
        return file_size + kv_cache_bytes(details, kv_tokens, KV_VALUE_BYTES[kv_cache_type]) + COMPUTE_ALLOWANCE
    if backend == "onnx":  # the graph's weights as stored, plus the transposed copies ONNX Runtime folds at load
        return file_size * 5 // 4 + kv_cache_bytes(details, kv_tokens, 4) + COMPUTE_ALLOWANCE
    weights = (parameter_count or file_size // 2) * 4  # the PyTorch backends hold fp32 weights on CPU
    kv = kv_cache_bytes(details, kv_tokens, 4) if backend == "torch" else 0
    return weights + kv + COMPUTE_ALLOWANCE


def release_freed_memory() -> None:
    """Collect garbage and return freed heap pages to the OS, so RSS reflects what is really held."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
