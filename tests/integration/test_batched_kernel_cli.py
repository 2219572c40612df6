"""`llmos show` says which batched kernel the shipped Q4_1 SmolLM2 gets here, or points to `llmos quantize`."""

from __future__ import annotations

import json
from pathlib import Path

from llmos.machine.kernels import Cpu
from tests.helpers import run_cli


def test_show_names_the_batched_kernel_of_q4_1_or_the_quantize_command(home: Path) -> None:
    assert run_cli(home, "pull", "smollm2").returncode == 0
    # extra buffer types on, as the probe decides on a machine whose fast path works (set: no probe here)
    env = {"LLMOS_LLAMACPP_EXTRA_BUFFERS": "1"}
    shown = run_cli(home, "show", "smollm2", env=env)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(run_cli(home, "show", "smollm2", "--json", env=env).stdout)
    found = data["batched_kernel"]
    assert (found["quantization"], found["weight_type"], found["extra_buffers"]) == ("Q4_1", "Q4_1", True)
    cpu = Cpu.current()
    if cpu.amx:  # Intel AMX has a Q4_1 kernel
        assert found["kernel"] == "amx" and found["advice"] is None
        assert "AMX" in shown.stdout and "llmos quantize" not in shown.stdout
        return
    if cpu.has("avx2", "f16c", "fma"):  # llmos's own Q4_1 kernel (scripts/patches)
        assert found["kernel"] == "tinyblas" and found["has_kernel"] is True and found["advice"] is None
        assert "batched kernel  Q4_1 runs on llmos's batched Q4_1 kernel" in shown.stdout
        assert "llmos quantize" not in shown.stdout
        return
    assert found["kernel"] == "none" and found["has_kernel"] is False
    assert "batched kernel  Q4_1 has no batched kernel on this CPU" in shown.stdout
    if cpu.has("avx2") or cpu.dotprod:  # Q4_0 is repacked there
        assert found["suggested_type"] == "q4_0"
        assert "note: Q4_1 has no batched kernel on this CPU" in shown.stdout
        assert "`llmos quantize smollm2 --type q4_0` makes a child that has one" in shown.stdout
    # --template prints the chat template alone
    assert "batched kernel" not in run_cli(home, "show", "smollm2", "--template").stdout
