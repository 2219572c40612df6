"""The base install (`make run`: llama.cpp, no PyTorch, no Ray) must be able to start the CLI and the server."""

from __future__ import annotations

import subprocess
import sys

BLOCK = (
    "import sys\n"
    "for name in ('torch', 'transformers', 'peft', 'sentence_transformers', 'ray'):\n"
    "    sys.modules[name] = None\n"
)


def test_cli_and_server_import_without_pytorch_or_ray() -> None:
    code = BLOCK + (
        "import llmos.api.app, llmos.cli, llmos.sdk, llmos.jobs.service, llmos.jobs.train, llmos.registry.remote\n"
        "from llmos.api.app import create_app\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
