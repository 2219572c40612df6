"""Does llama.cpp have a batched matrix-multiply kernel for a GGUF weight type on this CPU?

Batched decoding (many requests in one ``llama_decode``) multiplies every weight matrix by a batch of activation
rows. llama.cpp's CPU backend does that fast only for some weight types, and which ones depends on the CPU, on how
llama.cpp was built and on whether its *extra buffer types* are on (``Verdict.extra_buffers`` of
:mod:`llmos.machine.llamacpp_probe`). The tables below are those of the llama.cpp that llmos builds
(llama-cpp-python 0.3.36, ggml 0.25.3, compiled with ``GGML_NATIVE``, so the CPU's flags are the build's):

* ``amx``: the AMX extra buffer type (``ggml-cpu/amx``, ``qtype_has_amx_kernels``), first in line when the CPU has
  ``amx_int8`` and ``avx512_vnni``, the build has AMX (the ``no-amx`` variant build has not) and extra buffers are on:
  Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K, IQ4_XS, F16.
* ``repack``: weight repacking (``ggml-cpu/repack.cpp``, ``ggml_repack_get_optimal_repack_type``), extra buffers on.
  x86: Q4_0, Q4_K, IQ4_NL and MXFP4 with AVX2; Q2_K with AVX-512F. Nothing else: not Q8_0, Q5_K or Q6_K.
  ARM: with dot-product instructions (``asimddp``) Q4_0, Q4_K, Q5_K, Q6_K, Q8_0, IQ4_NL, MXFP4 and Q1_0.
* ``tinyblas``: llamafile's GEMM (``ggml-cpu/llamafile/sgemm.cpp``), used for weights in plain CPU buffers, so also
  with extra buffers off. x86 (AVX): F32, F16 (with F16C), BF16 (with AVX2), Q8_0, Q4_0, Q5_0, IQ4_NL. ARM: F32,
  F16, and with dot products Q8_0 and Q4_0.
  llmos's build adds Q4_1 on x86 with AVX2, F16C and FMA (``scripts/patches/ggml-cpu-q4_1-batched-kernel.patch``,
  a tinyBLAS-style kernel that also serves batches of one, so results stay batch-invariant).
* ``none``: every other type (Q5_1, Q3_K, most IQ types; Q5_K and Q6_K on x86; Q4_1 on ARM or x86 without AVX2):
  ggml's generic path, one dot product per weight row and activation row: about half the speed of Q4_0 at 16
  sequences (measured below).

Contract: :func:`batched_kernel` answers for one model's quantization (a GGUF file type such as ``Q4_K_M`` or a
tensor type such as ``Q4_1``; a K-quant file type stands for its main tensor type), a :class:`Cpu` and a verdict
(``None``: not probed yet, taken as llama.cpp's default, extra buffers on). When the weights have no batched kernel
it advises, in one line, a type that does on this CPU and that ``llmos quantize`` can make (the caller passes those
types; only 32-element-block types are advised, since K-quants fall back to other types on rows that are not a
multiple of 256). Pure: no I/O except :meth:`Cpu.current`, never raises, standard library only (no ``llama_cpp``).
"""

from __future__ import annotations

import platform
from collections.abc import Collection
from dataclasses import asdict, dataclass
from typing import Any, Literal

from llmos.machine.llamacpp_probe import Verdict, cpu_description

Kernel = Literal["amx", "repack", "tinyblas", "none"]

# A GGUF file type (general.file_type, as llmos.formats.gguf names it) -> the tensor type of most of its weights.
FILE_TYPE_WEIGHTS = {
    "Q2_K_S": "Q2_K",
    "Q3_K_S": "Q3_K",
    "Q3_K_M": "Q3_K",
    "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K",
    "Q4_K_M": "Q4_K",
    "Q5_K_S": "Q5_K",
    "Q5_K_M": "Q5_K",
    "IQ3_XS": "IQ3_S",
    "IQ3_M": "IQ3_S",
    "IQ2_M": "IQ2_S",
    "MXFP4_MOE": "MXFP4",
}

AMX_TYPES = frozenset({"Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "F16"})
# x86 repacking: type -> the CPU flag it needs (every x86 layout is 8x8)
REPACK_X86 = {"Q4_0": "avx2", "Q4_K": "avx2", "IQ4_NL": "avx2", "MXFP4": "avx2", "Q2_K": "avx512f"}
FLAG_NAMES = {"avx2": "AVX2", "avx512f": "AVX-512"}
# ARM repacking needs dot products; with i8mm some types get a wider layout (same types either way)
REPACK_ARM = frozenset({"Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "IQ4_NL", "MXFP4", "Q1_0"})
TINYBLAS_X86 = frozenset({"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_0", "IQ4_NL"})
# llmos's own kernels in llamafile's GEMM (scripts/patches): type -> the CPU flags they need
PATCHED_X86 = {"Q4_1": ("avx2", "f16c", "fma")}
TINYBLAS_ARM_DOTPROD = frozenset({"Q8_0", "Q4_0"})
TINYBLAS_ARM = frozenset({"F32", "F16"})

# What to advise instead of a type without a batched kernel: llmos quantize types with 32-element blocks (any row
# length works), the precision-keeping one first for sources of five bits or more.
LOW_BIT_ADVICE = ("q4_0", "q8_0")
HIGH_BIT_ADVICE = ("q8_0", "q4_0")
HIGH_BIT_TYPES = frozenset({"Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "Q8_1", "F32", "F16", "BF16"})
# Measured before llmos had its Q4_1 kernel: raw llama_decode of 16 sequences, the shipped Q4_1 SmolLM2 against
# its Q4_0 child, bursts interleaved (AMD EPYC with AVX-512, 1 thread, medians): 130 vs 262 tok/s with repacking
# (2.0x), 136 vs 226 tok/s with extra buffers off (Q4_0 on llamafile's GEMM, 1.7x). Issue 18, served at 16 clients
# on an Intel x86 without AMX: 181 vs 341 tok/s (1.9x).
SLOWDOWN_NOTE = "about 2x slower than on a type that has one"


@dataclass(frozen=True)
class Cpu:
    """The CPU llama.cpp runs on: its architecture (``x86``, ``arm`` or another name) and its feature flags."""

    arch: str
    flags: frozenset[str]

    @classmethod
    def parse(cls, machine: str, flags: str) -> Cpu:
        """From ``platform.machine()`` and the ``flags`` (x86) or ``Features`` (ARM) line of /proc/cpuinfo."""
        name = machine.lower()
        if name in ("x86_64", "amd64", "i686", "i386", "x86"):
            arch = "x86"
        elif name in ("aarch64", "arm64", "armv8l", "arm"):
            arch = "arm"
        else:
            arch = name or "unknown"
        return cls(arch, frozenset(flags.lower().split()))

    @classmethod
    def current(cls) -> Cpu:
        """This machine's CPU (/proc/cpuinfo; no flags where it cannot be read)."""
        return cls.parse(platform.machine(), cpu_description()[1])

    def has(self, *names: str) -> bool:
        return all(name in self.flags for name in names)

    @property
    def amx(self) -> bool:
        return self.arch == "x86" and self.has("amx_int8", "avx512_vnni")

    @property
    def dotprod(self) -> bool:
        return self.arch == "arm" and self.has("asimddp")


@dataclass(frozen=True)
class BatchedKernel:
    """The batched kernel a model's weights get here, and what to do about it when there is none."""

    quantization: str
    weight_type: str
    kernel: Kernel
    detail: str
    extra_buffers: bool
    assumed: bool  # True: no verdict yet (the fast-path probe has not run); extra buffers taken as on
    suggested_type: str | None = None  # an `llmos quantize --type` value whose weights have a kernel here
    advice: str | None = None

    @property
    def has_kernel(self) -> bool:
        return self.kernel != "none"

    @property
    def repacked(self) -> bool:
        """Repacked into a layout for this CPU (AMX or the repack buffer type): the fastest batched path."""
        return self.kernel in ("amx", "repack")

    @property
    def line(self) -> str:
        """One line for people: the advice when there is no kernel, else which kernel runs."""
        return self.advice or self.detail

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "has_kernel": self.has_kernel, "repacked": self.repacked}


def weight_type(quantization: str) -> str:
    """The tensor type of most weights of a GGUF quantization (``Q4_K_M`` -> ``Q4_K``; tensor types unchanged)."""
    key = quantization.strip().upper()
    return FILE_TYPE_WEIGHTS.get(key, key)


def kernel_for(kind: str, cpu: Cpu, *, extra_buffers: bool, amx_build: bool = True) -> tuple[Kernel, str]:
    """(kernel, one-line description) of batched matrix products on ``kind`` weights (a tensor type)."""
    kind = kind.upper()
    if extra_buffers and amx_build and cpu.amx and kind in AMX_TYPES:
        return "amx", f"{kind} runs on llama.cpp's AMX kernels"
    if extra_buffers:
        if cpu.arch == "x86" and kind in REPACK_X86:
            flag = REPACK_X86[kind]
            if cpu.has(flag):
                return "repack", f"{kind} is repacked for {FLAG_NAMES[flag]} (batched kernel)"
        if cpu.dotprod and kind in REPACK_ARM:
            layout = "with i8mm" if cpu.has("i8mm") else "with dot products"
            return "repack", f"{kind} is repacked for NEON {layout} (batched kernel)"
    if cpu.arch == "x86" and kind in PATCHED_X86 and cpu.has(*PATCHED_X86[kind]):
        return "tinyblas", f"{kind} runs on llmos's batched {kind} kernel in llamafile's GEMM (not repacked)"
    if _tinyblas(kind, cpu):
        return "tinyblas", f"{kind} runs on llamafile's GEMM ({_not_repacked(kind, cpu, extra_buffers)})"
    off = "" if extra_buffers else "; llama.cpp's extra buffer types are off on this machine"
    return "none", f"{kind} has no batched kernel on this CPU (one weight row at a time){off}"


def _tinyblas(kind: str, cpu: Cpu) -> bool:
    if cpu.arch == "x86":
        if not cpu.has("avx") or kind not in TINYBLAS_X86:
            return False
        if kind == "F16":
            return cpu.has("f16c") or cpu.has("avx512f")
        return kind != "BF16" or cpu.has("avx2")
    if cpu.arch == "arm":
        return kind in TINYBLAS_ARM or (cpu.dotprod and kind in TINYBLAS_ARM_DOTPROD)
    return False


def _not_repacked(kind: str, cpu: Cpu, extra_buffers: bool) -> str:
    if not extra_buffers and kernel_for(kind, cpu, extra_buffers=True)[0] in ("amx", "repack"):
        return "not repacked: llama.cpp's extra buffer types are off on this machine"
    return "not repacked on this CPU"


def batched_kernel(
    quantization: str,
    *,
    quantize_types: Collection[str],
    model: str = "MODEL",
    cpu: Cpu | None = None,
    verdict: Verdict | None = None,
) -> BatchedKernel:
    """Which batched kernel ``quantization`` weights get on ``cpu`` (default: this one) under ``verdict``.

    ``quantize_types`` are the ``llmos quantize --type`` values (lower case) the advice may name; ``model`` is the
    model reference the advice's command line names.
    """
    cpu = cpu or Cpu.current()
    extra = verdict.extra_buffers if verdict is not None else True
    # the only variant build llmos makes is the one without AMX (scripts/build_llama_cpp.sh)
    amx_build = verdict is None or verdict.lib_dir is None or "no-amx" not in verdict.build
    kind = weight_type(quantization)
    kernel, detail = kernel_for(kind, cpu, extra_buffers=extra, amx_build=amx_build)
    result = BatchedKernel(quantization, kind, kernel, detail, extra, verdict is None)
    if kernel != "none":
        return result
    allowed = {t.lower() for t in quantize_types}
    order = HIGH_BIT_ADVICE if kind in HIGH_BIT_TYPES else LOW_BIT_ADVICE
    for candidate in order:
        if candidate not in allowed or weight_type(candidate) == kind:
            continue
        if kernel_for(candidate, cpu, extra_buffers=extra, amx_build=amx_build)[0] == "none":
            continue
        advice = (
            f"{detail}: batched decode (several requests at once) runs {SLOWDOWN_NOTE};"
            f" `llmos quantize {model} --type {candidate}` makes a child that has one"
        )
        return BatchedKernel(quantization, kind, kernel, detail, extra, verdict is None, candidate, advice)
    return result
