"""Settings.speculative = auto: on for GGUF weights with a batched kernel on this CPU, off elsewhere."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest

from llmos.config import Settings
from llmos.machine import kernels
from llmos.registry.service import Registry
from llmos.runtime.loader import Loader

AVX2 = kernels.Cpu.parse("x86_64", "avx avx2 f16c fma")
NO_AVX = kernels.Cpu.parse("x86_64", "sse4_2")


def decide(mode: str, backend: str, quantization: str | None, model_format: str = "gguf") -> bool:
    loader = Loader(Settings(speculative=mode), cast(Registry, None))
    view: Any = SimpleNamespace(name="m:latest", quantization=quantization, format=model_format)
    return loader._speculative(backend, view)


@pytest.mark.parametrize(
    ("cpu", "backend", "quantization", "model_format", "expected"),
    [
        (AVX2, "llama.cpp", "Q4_1", "gguf", True),  # llmos's batched Q4_1 kernel
        (AVX2, "llama.cpp", "Q4_0", "gguf", True),
        (AVX2, "llama.cpp", "Q5_1", "gguf", False),  # no batched kernel: drafts cost more than they save
        (NO_AVX, "llama.cpp", "Q4_1", "gguf", False),
        (AVX2, "torch", None, "hf", False),  # not measured on the PyTorch backend
    ],
)
def test_auto_follows_the_batched_kernel(
    monkeypatch: pytest.MonkeyPatch, cpu: kernels.Cpu, backend: str, quantization: str | None, model_format: str,
    expected: bool,
) -> None:  # fmt: skip
    monkeypatch.setattr(kernels.Cpu, "current", classmethod(lambda cls: cpu))
    assert decide("auto", backend, quantization, model_format) is expected


def test_on_and_off_are_forced() -> None:
    assert decide("on", "torch", None, "hf") is True
    assert decide("off", "llama.cpp", "Q4_1") is False
