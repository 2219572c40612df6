"""The llama.cpp fast-path probe: its real child process, every way the child can fail, the key and the cache."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from llmos.config import Settings
from llmos.engine.backends import llamacpp_path
from llmos.machine import llamacpp_probe as probe


@pytest.fixture(scope="module")
def native() -> Path:
    path = probe.installed_lib_dir()
    assert path is not None, "llama-cpp-python is not installed"
    return path


@pytest.fixture(scope="module")
def machine_child(native: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[probe.ChildOutcome, Path]:
    """One hook-free probe child on both paths, and the directory it wrote its models to."""
    directory = tmp_path_factory.mktemp("machine")
    return probe.run_child(native, ("safe", "fast"), directory, timeout=120, build="lib"), directory


@pytest.fixture(scope="module")
def fast_path_fault(machine_child: tuple[probe.ChildOutcome, Path]) -> str | None:
    """How this machine's installed build fails on its fast path without any hook ("died by SIGILL" where AMX is
    advertised but faults), or None where it works."""
    return machine_child[0].failure


def test_the_child_compares_every_quantization_type_on_both_paths(
    machine_child: tuple[probe.ChildOutcome, Path], fast_path_fault: str | None
) -> None:
    if fast_path_fault is not None:
        assert fast_path_fault.startswith("died by"), fast_path_fault  # a fault of the machine, not of the probe
        pytest.skip(f"this machine's fast path {fast_path_fault}: there is no fast result to compare")
    outcome, directory = machine_child
    assert outcome.failure is None and outcome.returncode == 0
    assert {name for _, name in outcome.results} == set(probe.FTYPES)
    for name in probe.FTYPES:
        safe = outcome.results[("safe", name)]
        assert [len(tokens) for tokens in safe["tokens"]] == [probe.STEPS + 1] * len(probe.PROMPTS)
        fast = outcome.results[("fast", name)]
        assert 0.0 <= fast["error"] <= probe.LOGIT_TOLERANCE, (name, fast)
    assert {p.name for p in directory.glob("probe-*.gguf")} == {f"probe-{n}.gguf" for n in ["f32", *probe.FTYPES]}


@pytest.mark.parametrize(
    ("fault", "expected"),
    [("SIGILL", "died by SIGILL"), ("SIGSEGV", "died by SIGSEGV"), ("hang", "hung"), ("garble", "differs")],
)
def test_every_failure_of_the_fast_path_means_the_safe_path(
    native: Path, monkeypatch: pytest.MonkeyPatch, fault: str, expected: str, fast_path_fault: str | None
) -> None:
    if fault == "garble" and fast_path_fault is not None:
        expected = fast_path_fault  # garbling needs a fast path that runs; where it faults, the fault is the reason
    monkeypatch.setenv(probe.FAULT_HOOK, fault)
    verdict = probe.probe(native, timeout=4 if fault == "hang" else 120)
    assert verdict.extra_buffers is False and verdict.lib_dir is None
    assert expected in verdict.reason, verdict.reason
    assert verdict.describe.startswith("safe")


def test_a_working_variant_is_preferred_to_the_safe_path_and_a_faulting_one_is_not(
    native: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fast_path_fault: str | None
) -> None:
    variants = tmp_path / "variants"
    working = native
    if fast_path_fault is not None:  # a copy of the installed build faults here too: use the real no-AMX build
        working = Path(sys.prefix) / "lib" / "llmos-llama-cpp" / "no-amx"
        assert working.is_dir(), f"the fast path {fast_path_fault} but `make install` built no no-amx variant"
    shutil.copytree(working, variants / "no-amx", symlinks=True)
    shutil.copytree(native, variants / "portable", symlinks=True)
    monkeypatch.setenv(probe.FAULT_HOOK, "SIGILL@lib")  # only the installed build faults
    verdict = probe.probe(native, probe.variant_dirs(variants))
    assert verdict.extra_buffers and verdict.build == "no-amx" and verdict.lib_dir == str(variants / "no-amx")
    assert "died by SIGILL" in verdict.reason and "no-amx build's fast path works" in verdict.reason
    monkeypatch.setenv(probe.FAULT_HOOK, "SIGILL")  # every build faults
    verdict = probe.probe(native, probe.variant_dirs(variants))
    assert not verdict.extra_buffers and verdict.lib_dir is None
    assert verdict.reason.count("died by SIGILL") == 3, verdict.reason


def test_a_broken_safe_path_is_reported_not_hidden(tmp_path: Path) -> None:
    empty = tmp_path / "no-libraries"
    empty.mkdir()
    verdict = probe.probe(empty)  # llama_cpp cannot load its library from there
    assert not verdict.extra_buffers and "failed even on the safe path" in verdict.reason


def test_the_key_follows_the_library_bytes(native: Path, tmp_path: Path) -> None:
    copy = tmp_path / "lib"
    shutil.copytree(native, copy, symlinks=True)
    key = probe.machine_key([copy])
    assert probe.machine_key([copy]) == key and len(key) == 24
    target = probe.library_files(copy)[0]
    target.write_bytes(target.read_bytes() + b"\0")
    assert probe.machine_key([copy]) != key
    assert probe.machine_key([native]) != probe.machine_key([native, copy])


def test_the_verdict_is_cached_and_read_back_without_probing(
    native: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[float] = []
    real_probe = probe.probe

    def counting(*args: object, **kwargs: object) -> probe.Verdict:
        calls.append(time.monotonic())
        return real_probe(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(probe, "probe", counting)
    first = probe.cached_probe(tmp_path, native)
    second = probe.cached_probe(tmp_path, native)
    assert len(calls) == 1 and first.source == "probe" and second.source == "cache"
    assert (first.extra_buffers, first.reason, first.key) == (second.extra_buffers, second.reason, second.key)
    [stored] = tmp_path.glob("llamacpp-*.json")
    assert json.loads(stored.read_text())["key"] == first.key
    stored.write_text("{not json")  # a damaged cache is probed again, never trusted
    assert probe.cached_probe(tmp_path, native).source == "probe" and len(calls) == 2


def test_an_explicit_setting_wins_without_probing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe, "probe", lambda *a, **k: pytest.fail("probed despite an explicit setting"))
    for value in (True, False):
        settings = Settings(home=tmp_path, llamacpp_extra_buffers=value, probe_cache_dir=tmp_path / "probes")
        verdict = llamacpp_path.decide(settings)
        assert verdict.extra_buffers is value and verdict.source == "explicit" and verdict.lib_dir is None
    assert not (tmp_path / "probes").exists()
