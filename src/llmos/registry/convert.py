"""``llmos convert``: a new registry version in another format, with lineage to its source.

Contract: :func:`convert` reads a registered version, converts it in a temporary directory inside the store (same
filesystem, removed afterwards whatever happens), imports the result under the target name with a ``convert``
lineage record (parent digest and name, target format, dtype) and keeps the source's chat template, so both copies
of a model talk the same way. Only GGUF -> safetensors exists so far.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from llmos.errors import InvalidInputError
from llmos.formats.convert import gguf_to_hf
from llmos.formats.detect import inspect_path
from llmos.registry.names import parse_ref
from llmos.registry.service import ParentRef, ProgressFactory, Registry
from llmos.registry.views import VersionView

TARGETS = ("safetensors",)


def convert(
    registry: Registry,
    name: str,
    *,
    to: str = "safetensors",
    target: str | None = None,
    dtype: str = "float32",
    progress: ProgressFactory | None = None,
) -> VersionView:
    if to not in TARGETS:
        raise InvalidInputError(f"--to must be one of {', '.join(TARGETS)}", param="to")
    resolved = registry.resolve(name)
    source = resolved.view
    if source.format != "gguf":
        raise InvalidInputError(f"{source.name} is already {source.format}; only GGUF models can be converted so far")
    target_name = target or f"{source.repository}:{to}"
    parse_ref(target_name)
    scratch = registry.settings.home / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="convert-", dir=scratch) as tmp:
        work = Path(tmp)
        (work / "src").mkdir()
        os.symlink(resolved.primary_path, work / "src" / "model.gguf")
        gguf_to_hf(work / "src" / "model.gguf", work / "out", dtype)
        info = inspect_path(work / "out")
        info.chat_template = source.chat_template or info.chat_template
        return registry.import_info(
            info,
            target_name,
            progress=progress,
            operation="convert",
            parents=[ParentRef(source.digest, source.name)],
            params={"to": to, "dtype": dtype},
        )


def quantize(
    registry: Registry,
    name: str,
    *,
    kind: str,
    target: str | None = None,
    progress: ProgressFactory | None = None,
) -> VersionView:
    """A GGUF child of a registered GGUF model, quantized to ``kind``, with a ``quantize`` lineage record."""
    from llmos.compression.quantize import check_type, quantize_gguf

    key = check_type(kind)
    resolved = registry.resolve(name, verify=True)
    source = resolved.view
    if source.format != "gguf":
        raise InvalidInputError(
            f"{source.name} is {source.format}; quantization works on GGUF models"
            " (a fine-tuned model must first be converted to GGUF)",
            param="model",
        )
    target_name = target or f"{source.repository}:{key}"
    parse_ref(target_name)
    scratch = registry.settings.home / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quantize-", dir=scratch) as tmp:
        with registry.loadable_dir(resolved) as source_dir:
            output = quantize_gguf(source_dir / source.files[0].path, Path(tmp) / "model.gguf", key)
        info = inspect_path(output)
        info.chat_template = source.chat_template or info.chat_template
        return registry.import_info(
            info,
            target_name,
            progress=progress,
            operation="quantize",
            parents=[ParentRef(source.digest, source.name)],
            params={"type": key, "parent_quantization": source.quantization, "parent_size": source.size},
        )
