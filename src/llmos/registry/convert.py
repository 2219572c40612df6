"""``llmos convert`` and ``llmos quantize``: new registry versions in another format, with lineage to their source.

Contract: :func:`convert` reads a registered version (an encrypted one through a private plaintext copy that is
removed afterwards, never by linking its blob), converts it and registers the result through
:func:`llmos.registry.derive.derive` under the target name with a ``convert`` lineage record (parent digest and
name, target format and type) and keeps the source's chat template, so both copies of a model talk the same way.
Directions: GGUF -> safetensors (``to="safetensors"``, transformers' GGUF reader), safetensors -> GGUF
(``to="gguf"``, :mod:`llmos.formats.gguf_write`, llama family, ``out_type`` f16 / f32 / q8_0) and safetensors -> ONNX
(``to="onnx"``, :mod:`llmos.formats.onnx_export`: Llama-family decoders with a KV cache, sentence-transformers
encoders; the graph is checked against its source before it is registered). A LoRA adapter
converted to GGUF is first merged into its base (the base is a second parent), so the file is self-contained and
llama.cpp serves the fine-tuned model on its own.

:func:`quantize` makes a quantized child: llama.cpp types for GGUF parents, ``int8`` (dynamic int8 for the PyTorch
backend, :mod:`llmos.compression.int8`) for safetensors parents; a type that does not fit the parent's format is
refused with the types that do. Children belong to their parent's tenant and are encrypted when the parent is
(:mod:`llmos.registry.derive`).
"""

from __future__ import annotations

from pathlib import Path

from llmos.errors import InvalidInputError
from llmos.registry.derive import derive
from llmos.registry.names import DEFAULT_TAG, parse_ref
from llmos.registry.service import ParentRef, ProgressFactory, Registry, ResolvedModel
from llmos.registry.views import VersionView

TARGETS = ("safetensors", "gguf", "onnx")


def derived_name(source: str, suffix: str) -> str:
    """``REPO:SUFFIX`` for a default or format tag (``latest``, ``safetensors``, ``gguf-*``), else ``REPO:TAG-SUFFIX``,
    so children of different versions of one repository (``smollm2:int8`` -> ``smollm2:int8-gguf-f16``) do not take
    each other's tag."""
    ref = parse_ref(source)
    if ref.tag in (None, DEFAULT_TAG, "safetensors", suffix) or ref.tag.startswith("gguf-"):
        return f"{ref.repository}:{suffix}"
    return f"{ref.repository}:{ref.tag}-{suffix}"


def convert(
    registry: Registry,
    name: str,
    *,
    to: str = "safetensors",
    target: str | None = None,
    dtype: str = "float32",
    out_type: str | None = None,
    progress: ProgressFactory | None = None,
) -> VersionView:
    if to not in TARGETS:
        raise InvalidInputError(f"--to must be one of {', '.join(TARGETS)}", param="to")
    if to == "gguf":
        return _to_gguf(registry, name, out_type or "f16", target, progress)
    if to == "onnx":
        if out_type is not None:
            raise InvalidInputError("--type applies to --to gguf; quantize an ONNX model with `llmos quantize`")
        return _to_onnx(registry, name, target, progress)
    if out_type is not None:
        raise InvalidInputError("--type applies to --to gguf; safetensors takes --dtype", param="type")
    resolved = registry.resolve(name, verify=True)
    source = resolved.view
    if source.format != "gguf":
        raise InvalidInputError(
            f"{source.name} is already {source.format}; only GGUF models convert to safetensors", param="to"
        )
    from llmos.formats.convert import gguf_to_hf

    target_name = target or f"{source.repository}:{to}"
    parse_ref(target_name)

    def work(scratch: Path) -> Path:
        with registry.loadable_dir(resolved) as source_dir:  # an encrypted GGUF is read from a private plaintext copy
            gguf_to_hf(source_dir / source.files[0].path, scratch / "out", dtype)
        return scratch / "out"

    return derive(
        registry,
        [resolved],
        work,
        target_name,
        operation="convert",
        params={"to": to, "dtype": dtype},
        chat_template=source.chat_template,
        progress=progress,
        prefix="convert-",
    )


def _to_gguf(
    registry: Registry, name: str, out_type: str, target: str | None, progress: ProgressFactory | None
) -> VersionView:
    from llmos.formats.convert import merge_lora
    from llmos.formats.gguf_write import OUT_TYPES, hf_to_gguf

    if out_type not in OUT_TYPES:
        raise InvalidInputError(
            f"--type must be one of {', '.join(OUT_TYPES)} for GGUF, not {out_type!r}", param="type"
        )
    resolved = registry.resolve(name, verify=True)
    source = resolved.view
    if source.format not in ("hf", "lora"):
        raise InvalidInputError(
            f"{source.name} is {source.format}; only safetensors models and LoRA adapters convert to GGUF", param="to"
        )
    target_name = target or derived_name(source.name, f"gguf-{out_type}")
    parse_ref(target_name)
    parents: list[ResolvedModel] = [resolved]
    lineage = [ParentRef(source.digest, source.name)]
    params: dict[str, object] = {"to": "gguf", "type": out_type}
    template = source.chat_template
    base: ResolvedModel | None = None
    if source.format == "lora":
        base_name = str(source.details.get("base_name", ""))
        base = registry.resolve(f"{parse_ref(base_name).repository}@{source.details.get('base_digest')}", verify=True)
        parents.append(base)
        lineage.append(ParentRef(base.view.digest, base_name or base.view.name))
        params.update({"merged_adapter": True, "base": base_name or base.view.name})
        template = source.chat_template or base.view.chat_template

    def work(scratch: Path) -> Path:
        output = scratch / "model.gguf"
        if base is not None:
            with registry.loadable_dir(base) as base_dir, registry.loadable_dir(resolved) as adapter_dir:
                merged = merge_lora(base_dir, adapter_dir)
                hf_to_gguf(base_dir, output, out_type, name=source.name, chat_template=template, tensors=merged)
            del merged
        else:
            with registry.loadable_dir(resolved) as source_dir:
                hf_to_gguf(source_dir, output, out_type, name=source.name, chat_template=template)
        return output

    return derive(
        registry,
        parents,
        work,
        target_name,
        operation="convert",
        params=params,
        lineage=lineage,
        chat_template=template,
        progress=progress,
        prefix="convert-",
    )


def _to_onnx(registry: Registry, name: str, target: str | None, progress: ProgressFactory | None) -> VersionView:
    """A safetensors decoder or sentence-transformers encoder exported to ONNX and checked against its source."""
    from llmos.formats.onnx_export import export_decoder, export_encoder

    resolved = registry.resolve(name, verify=True)
    source = resolved.view
    if source.format != "hf":
        raise InvalidInputError(
            f"{source.name} is {source.format}; only safetensors models export to ONNX"
            " (a GGUF converts to safetensors first: `llmos convert NAME --to safetensors`)",
            param="to",
        )
    embedding = source.details.get("task") == "embedding"
    target_name = target or derived_name(source.name, "onnx")
    parse_ref(target_name)

    def work(scratch: Path) -> Path:
        with registry.loadable_dir(resolved) as source_dir:
            (export_encoder if embedding else export_decoder)(source_dir, scratch / "out")
        return scratch / "out"

    return derive(
        registry,
        [resolved],
        work,
        target_name,
        operation="convert",
        params={"to": "onnx", "task": "embedding" if embedding else "generation"},
        chat_template=source.chat_template,
        progress=progress,
        prefix="convert-",
    )


def quantize(
    registry: Registry,
    name: str,
    *,
    kind: str,
    target: str | None = None,
    progress: ProgressFactory | None = None,
) -> VersionView:
    """A quantized child of a registered model (llama.cpp types for GGUF, int8 for safetensors), with lineage."""
    from llmos.compression.quantize import check_fits, check_type, quantize_gguf

    key = check_type(kind)
    resolved = registry.resolve(name, verify=True)
    source = resolved.view
    check_fits(key, source.format, source.name)
    target_name = target or derived_name(source.name, key)
    parse_ref(target_name)

    def work(scratch: Path) -> Path:
        with registry.loadable_dir(resolved) as source_dir:
            if key == "int8" and source.format == "onnx":
                from llmos.compression.quantize import quantize_onnx

                return quantize_onnx(source_dir, scratch / "out")
            if key == "int8":
                from llmos.compression.int8 import quantize_int8

                return quantize_int8(source_dir, scratch / "out")
            return quantize_gguf(source_dir / source.files[0].path, scratch / "model.gguf", key)

    return derive(
        registry,
        [resolved],
        work,
        target_name,
        operation="quantize",
        params={"type": key, "parent_quantization": source.quantization, "parent_size": source.size},
        chat_template=source.chat_template,
        progress=progress,
        prefix="quantize-",
    )
