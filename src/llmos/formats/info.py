"""What an inspector learns about a model without loading its weights.

Contract: inspectors in this package return a :class:`ModelInfo` built only from headers they validated against the
real file sizes, or raise :class:`llmos.errors.InvalidModelFileError` (or ``UnsafeFormatError``). ``ModelInfo`` is
plain data, shared by the registry (which stores it) and the engine (which picks a backend from ``format``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ModelFormat = Literal["gguf", "safetensors", "hf", "lora", "onnx", "dataset"]


@dataclass(frozen=True)
class ModelFile:
    """One file of a model: where it is now (``source``) and its path inside the model (``path``)."""

    source: Path
    path: str
    size: int


@dataclass
class ModelInfo:
    format: ModelFormat
    files: list[ModelFile]
    architecture: str | None = None
    parameter_count: int | None = None
    quantization: str | None = None
    context_length: int | None = None
    chat_template: str | None = None
    tokenizer: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def manifest_config(self) -> dict[str, Any]:
        """The facts that identify this model's content; they go into the manifest (and so into its digest)."""
        template = self.chat_template
        return {
            "format": self.format,
            "architecture": self.architecture,
            "parameter_count": self.parameter_count,
            "quantization": self.quantization,
            "context_length": self.context_length,
            "chat_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest() if template else None,
            **({"base": self.metadata["base_digest"]} if self.metadata.get("base_digest") else {}),
        }
