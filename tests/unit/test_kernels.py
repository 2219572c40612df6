"""Which GGUF weight types get a batched (repacked) llama.cpp kernel on which CPU, and the advice when none does."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Collection
from pathlib import Path

import pytest

from llmos.compression.quantize import TYPES
from llmos.config import Settings
from llmos.engine.backends import llamacpp_path
from llmos.formats.gguf import FILE_TYPES
from llmos.machine import llamacpp_probe as probe
from llmos.machine.kernels import BatchedKernel, Cpu, batched_kernel, kernel_for, weight_type
from llmos.machine.llamacpp_probe import Verdict

AVX2 = Cpu.parse("x86_64", "fpu sse sse2 ssse3 fma avx f16c bmi1 avx2 bmi2")  # e.g. a Haswell..Alder Lake desktop
AVX512 = Cpu.parse("x86_64", "fpu sse2 fma avx f16c avx2 avx512f avx512bw avx512vl avx512_vnni avx512_bf16")  # AMD EPYC
AMX = Cpu.parse("x86_64", "fma avx f16c avx2 avx512f avx512_vnni amx_bf16 amx_tile amx_int8")  # Sapphire Rapids
AVX_ONLY = Cpu.parse("x86_64", "fpu sse2 avx")  # Sandy Bridge
ARM_I8MM = Cpu.parse("aarch64", "fp asimd evtstrm aes crc32 atomics fphp asimdhp asimddp sve i8mm bf16")  # Graviton 3
ARM_PLAIN = Cpu.parse("aarch64", "fp asimd evtstrm crc32 cpuid")  # Cortex-A72 (Raspberry Pi 4): no dot products
RISCV = Cpu.parse("riscv64", "")
ALL_CPUS = (AVX2, AVX512, AMX, AVX_ONLY, ARM_I8MM, ARM_PLAIN, RISCV)

INSTALLED_FAST = Verdict(True, None, "installed", "the fast path agrees with the safe path")
SAFE = Verdict(False, None, "installed", "the installed build's fast path died by SIGILL on a q4_0 model")
NO_AMX_VARIANT = Verdict(True, "/venv/lib/llmos-llama-cpp/no-amx", "no-amx", "AMX faults; the no-amx build works")


def kernel(
    quantization: str, cpu: Cpu, verdict: Verdict | None = INSTALLED_FAST, types: Collection[str] = tuple(TYPES)
) -> BatchedKernel:
    return batched_kernel(quantization, quantize_types=types, model="smollm2", cpu=cpu, verdict=verdict)


def test_cpu_flags_and_architectures_are_parsed() -> None:
    assert (AVX2.arch, AVX512.arch, ARM_I8MM.arch, RISCV.arch) == ("x86", "x86", "arm", "riscv64")
    assert Cpu.parse("AMD64", "AVX2").has("avx2")
    assert AMX.amx and not AVX512.amx  # AMX needs amx_int8 and avx512_vnni
    assert ARM_I8MM.dotprod and not ARM_PLAIN.dotprod and not AVX2.dotprod
    current = Cpu.current()
    assert current.arch and isinstance(current.flags, frozenset)


def test_file_types_stand_for_their_main_tensor_type() -> None:
    assert weight_type("Q4_K_M") == weight_type("q4_k_s") == "Q4_K"
    assert weight_type("Q3_K_L") == "Q3_K" and weight_type("MXFP4_MOE") == "MXFP4" and weight_type("Q2_K_S") == "Q2_K"
    assert weight_type("q4_1") == "Q4_1" and weight_type("IQ4_XS") == "IQ4_XS"


def test_x86_with_avx2_repacks_q4_0_and_q4_k_and_runs_q4_1_on_llmos_kernel() -> None:
    for quantization in ("Q4_0", "Q4_K_M", "Q4_K_S", "IQ4_NL", "MXFP4_MOE"):
        found = kernel(quantization, AVX2)
        assert (found.kernel, found.repacked, found.advice) == ("repack", True, None), quantization
        assert "AVX2" in found.detail
    for quantization in ("Q8_0", "Q5_0", "F16", "BF16", "F32"):  # llamafile's GEMM, not repacked
        found = kernel(quantization, AVX2)
        assert (found.kernel, found.has_kernel, found.repacked, found.advice) == ("tinyblas", True, False, None)
    shipped = kernel("Q4_1", AVX2)  # llmos's patched llamafile GEMM (scripts/patches)
    assert (shipped.kernel, shipped.has_kernel, shipped.repacked, shipped.advice) == ("tinyblas", True, False, None)
    assert "llmos's batched Q4_1 kernel" in shipped.line
    for flags in ("avx avx2 f16c", "avx avx2 fma", "avx f16c fma"):  # it needs AVX2, F16C and FMA
        assert kernel("Q4_1", Cpu.parse("x86_64", flags)).kernel == "none", flags
    older = kernel("Q4_1", AVX_ONLY)
    assert (older.kernel, older.has_kernel, older.suggested_type) == ("none", False, "q4_0")
    assert older.advice is not None and older.line == older.advice
    assert older.advice.startswith("Q4_1 has no batched kernel on this CPU")
    assert "`llmos quantize smollm2 --type q4_0` makes a child that has one" in older.advice
    # five bits or more: the advice keeps the precision (Q8_0 has llamafile's GEMM on x86)
    for quantization in ("Q5_1", "Q5_K_M", "Q6_K"):
        assert kernel(quantization, AVX2).suggested_type == "q8_0", quantization
    for quantization in ("Q3_K_M", "Q2_K", "IQ2_XS"):  # Q2_K is repacked only with AVX-512
        assert kernel(quantization, AVX2).suggested_type == "q4_0", quantization


def test_avx512_adds_q2_k_and_nothing_else_changes() -> None:
    assert kernel("Q2_K", AVX512).kernel == "repack" and "AVX-512" in kernel("Q2_K", AVX512).detail
    for quantization in ("Q4_1", "Q4_0", "Q8_0", "Q4_K_M", "Q6_K", "Q5_K_M"):
        assert kernel(quantization, AVX512).kernel == kernel(quantization, AVX2).kernel, quantization


def test_with_extra_buffers_off_nothing_is_repacked_and_llamafile_still_serves_q4_0() -> None:
    q4_0 = kernel("Q4_0", AVX512, SAFE)
    assert (q4_0.kernel, q4_0.extra_buffers, q4_0.advice) == ("tinyblas", False, None)
    assert "extra buffer types are off" in q4_0.detail
    q4_k = kernel("Q4_K_M", AVX512, SAFE)  # repacked when extra buffers are on, nothing when off
    assert (q4_k.kernel, q4_k.suggested_type) == ("none", "q4_0")
    assert "extra buffer types are off" in q4_k.detail
    assert kernel("Q4_1", AVX512, SAFE).kernel == "tinyblas"  # llmos's kernel needs no extra buffer type
    assert kernel("Q3_K_M", AVX512, SAFE).suggested_type == "q4_0"


def test_amx_has_kernels_for_q4_1_and_llmos_kernel_takes_over_without_amx_or_extra_buffers() -> None:
    for quantization in ("Q4_1", "Q4_0", "Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_XS", "F16"):
        found = kernel(quantization, AMX)
        assert (found.kernel, found.repacked, found.advice) == ("amx", True, None), quantization
    assert kernel("IQ4_NL", AMX).kernel == "repack"  # AMX has no IQ4_NL kernel: the repack buffer type takes it
    variant = kernel("Q4_1", AMX, NO_AMX_VARIANT)
    assert (variant.kernel, variant.suggested_type) == ("tinyblas", None)
    assert kernel("Q5_1", AMX, NO_AMX_VARIANT).suggested_type == "q8_0"
    assert kernel("Q4_0", AMX, NO_AMX_VARIANT).kernel == "repack"
    assert kernel("Q4_1", AMX, SAFE).kernel == "tinyblas"
    assert kernel("Q6_K", AMX, SAFE).kernel == "none"
    assert kernel("Q8_0", AMX, SAFE).kernel == "tinyblas"


def test_arm_with_dot_products_repacks_q8_0_and_k_quants_but_not_q4_1() -> None:
    for quantization in ("Q4_0", "Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_NL"):
        found = kernel(quantization, ARM_I8MM)
        assert (found.kernel, found.advice) == ("repack", None), quantization
        assert "i8mm" in found.detail
    assert kernel("Q4_1", ARM_I8MM).suggested_type == "q4_0"
    assert kernel("Q5_1", ARM_I8MM).suggested_type == "q8_0"
    assert kernel("F16", ARM_I8MM).kernel == "tinyblas"


def test_no_advice_where_no_type_llmos_can_make_has_a_kernel() -> None:
    for cpu in (ARM_PLAIN, RISCV):
        found = kernel("Q4_1", cpu)
        assert (found.kernel, found.suggested_type, found.advice) == ("none", None, None)
        assert found.line == found.detail
    assert kernel("Q4_0", ARM_PLAIN).kernel == "none"
    assert kernel("F32", ARM_PLAIN).kernel == "tinyblas"
    assert kernel("F16", AVX_ONLY).kernel == "none"  # llamafile's F16 GEMM needs F16C
    assert kernel("Q4_0", AVX_ONLY).kernel == "tinyblas"  # repacking needs AVX2


def test_advice_names_only_types_llmos_quantize_makes() -> None:
    assert kernel("Q4_1", AVX_ONLY, types=("q8_0", "f16")).suggested_type == "q8_0"
    assert kernel("Q4_1", AVX_ONLY, types=()).advice is None
    for cpu in ALL_CPUS:
        for verdict in (INSTALLED_FAST, SAFE, NO_AMX_VARIANT, None):
            for quantization in FILE_TYPES.values():
                found = kernel(quantization, cpu, verdict)
                if found.suggested_type is None:
                    continue
                assert found.suggested_type in TYPES
                assert found.suggested_type.upper() != found.weight_type
                better = kernel(found.suggested_type, cpu, verdict)
                assert better.has_kernel, (cpu, verdict, quantization)


def test_without_a_verdict_extra_buffers_are_assumed_on_and_said_so() -> None:
    found = kernel("Q4_0", AVX2, None)
    assert (found.kernel, found.assumed, found.extra_buffers) == ("repack", True, True)
    assert not kernel("Q4_0", AVX2).assumed
    data = json.loads(json.dumps(kernel("Q4_1", AVX_ONLY).to_json()))
    assert data["kernel"] == "none" and data["has_kernel"] is False and data["suggested_type"] == "q4_0"


def test_kernel_for_takes_tensor_type_names() -> None:
    assert kernel_for("q4_0", AVX2, extra_buffers=True)[0] == "repack"
    assert kernel_for("Q4_0", AMX, extra_buffers=True, amx_build=False)[0] == "repack"


def test_the_known_verdict_never_probes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llamacpp_path, "_chosen", None)
    explicit = llamacpp_path.known(Settings(home=tmp_path, probe_cache_dir=tmp_path, llamacpp_extra_buffers=False))
    assert explicit is not None and (explicit.extra_buffers, explicit.source) == (False, "explicit")
    settings = Settings(home=tmp_path, probe_cache_dir=tmp_path / "probes")
    native, variants = llamacpp_path.builds(settings)
    if native is None:
        pytest.skip("llama-cpp-python is not installed")
    assert llamacpp_path.known(settings) is None  # nothing cached: no probe starts
    assert not (tmp_path / "probes").exists()
    key = probe.machine_key([native, *variants])
    cached = Verdict(False, None, "installed", "a cached reason", key=key)
    (tmp_path / "probes").mkdir()
    (tmp_path / "probes" / f"llamacpp-{key}.json").write_text(json.dumps(cached.to_json()))
    found = llamacpp_path.known(settings)
    assert found is not None and (found.reason, found.source) == ("a cached reason", "cache")
    monkeypatch.setattr(llamacpp_path, "_chosen", INSTALLED_FAST)
    assert llamacpp_path.known(settings) is INSTALLED_FAST


def test_asking_does_not_import_llama_cpp(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from llmos.config import Settings\n"
        "from llmos.compression.quantize import batched_kernel\n"
        f"found = batched_kernel('Q4_1', 'gguf', 'smollm2', Settings(home={str(tmp_path)!r}))\n"
        "assert found is not None and found.weight_type == 'Q4_1'\n"
        "assert batched_kernel('float16', 'hf', 'x', Settings(home='/nonexistent')) is None\n"
        "assert 'llama_cpp' not in sys.modules, 'llama_cpp was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
