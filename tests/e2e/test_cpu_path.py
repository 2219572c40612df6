"""The llama.cpp fast-path probe end to end: every entry point survives a CPU whose fast kernels fault.

The fault is the probe's test hook (``LLMOS_TEST_PROBE_FAULT``): the probe child kills itself with SIGILL just before
its first fast-path decode, as a hypervisor that advertises AMX but faults on it does. Each test has its own verdict
cache (the session's shared one is removed from the children's environment).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from llmos.config import Settings
from llmos.engine.backends import llamacpp_path
from llmos.machine.llamacpp_probe import installed_lib_dir
from tests.helpers import ServerProcess, child_env, run_cli

QUESTION = "What is the capital of France?"
SDK_SCRIPT = (
    "import llmos\n"
    "with llmos.load_model('smollm2') as model:\n"
    f"    print(model.generate_text({QUESTION!r}, max_length=32))\n"
    "print('libllama:', next(line.split()[-1] for line in open('/proc/self/maps') if 'libllama' in line))\n"
)


@pytest.fixture
def fresh_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    pulled = run_cli(home, "pull", "smollm2")
    assert pulled.returncode == 0, pulled.stderr
    return home


def notices(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "llama.cpp runs its" in line]


def verdict_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("llamacpp-*.json"))


def run_sdk(home: Path, env: dict[str, str | None]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SDK_SCRIPT], capture_output=True, text=True, env=child_env(home, env), timeout=300
    )


@pytest.fixture
def server_factory() -> Iterator[list[ServerProcess]]:
    servers: list[ServerProcess] = []
    yield servers
    for server in servers:
        server.stop()


def test_run_sdk_and_serve_answer_on_the_safe_path_when_the_fast_path_dies(
    fresh_home: Path, server_factory: list[ServerProcess]
) -> None:
    env: dict[str, str | None] = {"LLMOS_TEST_PROBE_FAULT": "SIGILL", "LLMOS_PROBE_CACHE_DIR": None}
    cache = fresh_home / "probes"  # the default place: the llmos home

    ran = run_cli(fresh_home, "run", "smollm2", QUESTION, "--temperature", "0", env=env)
    assert ran.returncode == 0, ran.stderr
    assert "Paris" in ran.stdout
    [line] = notices(ran.stderr)
    assert "safe" in line and "SIGILL" in line, line
    [verdict_path] = verdict_files(cache)
    verdict = json.loads(verdict_path.read_text())
    assert verdict["extra_buffers"] is False and verdict["lib_dir"] is None and "SIGILL" in verdict["reason"]
    stamp = (verdict_path.stat().st_mtime_ns, verdict["probed_at"])

    sdk = run_sdk(fresh_home, env)
    assert sdk.returncode == 0, sdk.stderr
    assert "Paris" in sdk.stdout
    [line] = notices(sdk.stderr)
    assert "SIGILL" in line

    server = ServerProcess(fresh_home, env=env)
    server_factory.append(server)
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=120)
    answer = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=32
    )
    assert "Paris" in (answer.choices[0].message.content or "")
    runtime = httpx.get(f"{server.base}/admin/runtime", timeout=10).json()
    assert runtime["llamacpp"]["extra_buffers"] is False and runtime["llamacpp"]["source"] == "cache"
    assert len(notices(server.read_log())) == 1, server.read_log()

    # one probe for all three: the verdict file was never rewritten
    assert verdict_files(cache) == [verdict_path]
    assert (verdict_path.stat().st_mtime_ns, json.loads(verdict_path.read_text())["probed_at"]) == stamp

    doctor = json.loads(run_cli(fresh_home, "doctor", "--json", env=env).stdout)
    assert doctor["llama_cpp"]["verdict"]["source"] == "cache" and not doctor["llama_cpp"]["verdict"]["extra_buffers"]
    assert any(check["name"] == "llama.cpp" and check["status"] == "warn" for check in doctor["checks"])


def test_a_variant_build_keeps_the_fast_path_when_only_the_installed_build_faults(
    fresh_home: Path, tmp_path: Path
) -> None:
    """The hook faults only the installed build; the variant is the no-AMX build `make install` made where this CPU
    needs one (on such a machine a copy of the installed libraries would fault too), else a copy of the installed."""
    installed = installed_lib_dir()
    assert installed is not None
    built = llamacpp_path.variants_root(Settings(home=fresh_home)) / "no-amx"
    variant = tmp_path / "variants" / "no-amx"
    shutil.copytree(built if built.is_dir() else installed, variant, symlinks=True)
    env: dict[str, str | None] = {
        "LLMOS_TEST_PROBE_FAULT": "SIGILL@lib",
        "LLMOS_LLAMACPP_VARIANTS_DIR": str(variant.parent),
        "LLMOS_PROBE_CACHE_DIR": str(tmp_path / "probes"),
    }
    sdk = run_sdk(fresh_home, env)
    assert sdk.returncode == 0, sdk.stderr
    assert "Paris" in sdk.stdout
    [line] = notices(sdk.stderr)
    assert "fast (no-amx build)" in line and "SIGILL" in line, line
    mapped = sdk.stdout.split("libllama:", 1)[1].strip()
    assert mapped.startswith(str(variant)), mapped  # the process really loaded the variant's library
    [verdict_path] = verdict_files(tmp_path / "probes")
    verdict = json.loads(verdict_path.read_text())
    assert verdict["extra_buffers"] is True and verdict["lib_dir"] == str(variant)

    forced = run_sdk(fresh_home, {**env, "LLMOS_LLAMACPP_EXTRA_BUFFERS": "0"})  # explicit wins over the verdict
    assert forced.returncode == 0 and "Paris" in forced.stdout and not notices(forced.stderr), forced.stderr
    assert forced.stdout.split("libllama:", 1)[1].strip().startswith(str(installed))


def test_the_forced_fast_path_agrees_with_the_verdict(fresh_home: Path, tmp_path: Path) -> None:
    """Without any hook the probe must pick the installed build's fast path exactly where a forced fast run works."""
    env: dict[str, str | None] = {"LLMOS_PROBE_CACHE_DIR": str(tmp_path / "probes")}
    verdict = json.loads(run_cli(fresh_home, "doctor", "--json", env=env).stdout)["llama_cpp"]["verdict"]
    assert verdict["source"] == "probe" and verdict["seconds"] > 0
    forced = run_cli(
        fresh_home, "run", "smollm2", QUESTION, "--temperature", "0", env={**env, "LLMOS_LLAMACPP_EXTRA_BUFFERS": "1"}
    )
    fast_works = forced.returncode == 0 and "Paris" in forced.stdout
    # a forced fast path runs the installed build; the verdict may instead have picked a variant build's fast path
    # (lib_dir), which it does only where the installed build's fails
    installed_fast = verdict["extra_buffers"] and verdict["lib_dir"] is None
    assert installed_fast == fast_works, (verdict, forced.returncode, forced.stderr[-2000:])
