"""The base install (`make run`: llama.cpp, no PyTorch, no Ray) must be able to start the CLI and the server."""

from __future__ import annotations

import subprocess
import sys

BLOCK = (
    "import sys\n"
    "for name in ('torch', 'transformers', 'peft', 'sentence_transformers', 'ray'):\n"
    "    sys.modules[name] = None\n"
)
OPTIONAL_FORMATS = ("onnx", "onnxruntime", "h5py")
"""The onnx and tensorflow extras: imported only when an ONNX model or a TensorFlow checkpoint is used."""


def test_cli_and_server_import_without_pytorch_or_ray() -> None:
    code = BLOCK + (
        "import llmos.api.app, llmos.cli, llmos.sdk, llmos.jobs.service, llmos.jobs.train, llmos.registry.remote\n"
        "from llmos.api.app import create_app\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_format_extras_are_not_imported_unless_used() -> None:
    code = (
        "import sys\n"
        f"for name in {OPTIONAL_FORMATS!r}:\n"
        "    sys.modules[name] = None\n"
        "import llmos.api.app, llmos.cli, llmos.sdk, llmos.formats.detect, llmos.registry.service\n"
        "import llmos.runtime.loader, llmos.registry.convert, llmos.compression.quantize\n"
        "from llmos.api.app import create_app\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_cli_and_the_stores_load_without_numpy() -> None:
    """Every CLI command opens a store: numpy (about 70 ms of each start) loads only where weights are read."""
    code = (
        "import sys\n"
        "import llmos.cli, llmos.registry.service, llmos.security.service, llmos.jobs.service\n"
        "assert 'numpy' not in sys.modules, 'numpy was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_no_command_module_imports_the_cli_package_that_imports_it() -> None:
    """`llmos.cli` imports its command modules to register them; they share `llmos.cli.common` instead of importing
    the package back (an import loop that only worked by the order of the package's lines). Function-level imports
    count too."""
    import grimp

    graph = grimp.build_graph("llmos")
    registered = graph.find_modules_directly_imported_by("llmos.cli")
    commands = {m for m in graph.find_children("llmos.cli")} - {"llmos.cli.common"}
    assert commands <= registered | {"llmos.cli.tenancy"}  # the package registers (or lazily uses) every one
    loops = sorted(
        m for m in commands | {"llmos.cli.common"} if "llmos.cli" in graph.find_modules_directly_imported_by(m)
    )
    assert loops == []
