"""llmos: a self-hosted operating system for large language models.

The public Python API is :func:`load_model` (see :mod:`llmos.sdk`); everything else is reached through the CLI
(``llmos --help``) or the HTTP API.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("llmos")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without installation
    __version__ = "0.0.0"

if TYPE_CHECKING:
    from llmos.sdk import Model, TrainableModel, create_model, load_model

__all__ = ["Model", "TrainableModel", "__version__", "create_model", "load_model"]


def __getattr__(name: str) -> Any:
    # The SDK pulls in SQLAlchemy and llama.cpp; import it only when used so `import llmos` stays cheap.
    if name in ("load_model", "Model", "create_model", "TrainableModel"):
        from llmos import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'llmos' has no attribute {name!r}")
