"""Property-based fuzzing of the whole HTTP surface with schemathesis, authenticated as an admin.

The server publishes its request and response schemas (llmos.api.openapi); schemathesis generates valid and invalid
requests for every operation from that document and checks that no response is a server error and every response
matches its documented status, content type and schema. The run is bounded in examples and in time.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmos.config import Settings
from llmos.registry import sources
from llmos.registry.service import Registry
from tests.helpers import ServerProcess, run_cli

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


@pytest.mark.timeout(600)
def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path: Path) -> None:
    home = tmp_path / "home"
    registry = Registry(Settings(home=home))
    sources.pull(registry, "smollm2")
    registry.close()
    assert run_cli(home, "tenants", "create", "fuzz").returncode == 0
    created = run_cli(home, "keys", "create", "--tenant", "fuzz", "--role", "admin")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    # a short context keeps every generated request cheap: prompts and max_tokens beyond it are refused or clamped
    server = ServerProcess(home, "--model", "smollm2", env={"LLMOS_CONTEXT_LENGTH": "256", "LLMOS_MAX_WAITING": "64"})
    try:
        command = [
            str(Path(sys.executable).with_name("st")), "run", f"{server.base}/openapi.json",
            "--header", f"Authorization: Bearer {key}",
            "--checks", CHECKS,
            "--exclude-method", "DELETE",  # deleting the model under test would only make later cases 404
            # fuzzing repeats until --max-time is spent; 20 s covers every operation (asserted below)
            "--max-examples", "10", "--max-time", "20", "--request-timeout", "60",
            "--seed", "20261125", "--workers", "2", "--no-color", "--generation-database", "none",
            "--suppress-health-check", "all",
            # the coverage phase sometimes crashes inside hypothesis on Python 3.11 (SystemError: AST constructor
            # recursion depth mismatch, a CPython bug hit by deeply nested schemas), which is not a server finding
            "--phases", "examples,fuzzing,stateful",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=420, cwd=tmp_path)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-6000:]
        assert "passed" in output.lower(), output[-3000:]
        # the time budget ends fuzzing early, never before every selected operation was tested
        selected = re.search(r"Selected: (\d+)/", output)
        tested = re.search(r"Tested: (\d+)", output)
        assert selected and tested and tested.group(1) == selected.group(1), output[-3000:]
        assert key not in server.read_log()
    finally:
        server.stop()
