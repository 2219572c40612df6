"""``llmos quantize``: quantization types, and a GGUF child of a registered GGUF model, quantized by llama.cpp.

Contract: :func:`check_type` accepts the llama.cpp types (for GGUF models) and :data:`HF_TYPES` (``int8``, for
safetensors models on the PyTorch backend, see :mod:`llmos.compression.int8`, and for ONNX models, where
:func:`quantize_onnx` runs ONNX Runtime's dynamic quantization); :func:`check_fits` refuses a type that
does not fit the model's format, listing the ones that do. :func:`quantize_gguf` runs ``llama_model_quantize`` on
the parent's GGUF into a temporary file inside the store (same filesystem; removed whatever happens) and returns its
path for the registry to import. Types are the llama.cpp file types listed in :data:`TYPES` (``q8_0``, ``q5_k_m``,
``q4_k_m``, ``q4_0``, ``f16``, ...); an unknown type is refused with the list. A parent that is already quantized
is re-quantized (llama.cpp's ``allow_requantize``): the child can never be more precise than the parent, which the
report makes visible. :func:`batched_kernel` says whether a GGUF model's weights get a batched (repacked) kernel
from llama.cpp on this CPU and, where they do not, which of these types would (``llmos show``, ``llmos bench``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from llmos.errors import InvalidInputError, ModelLoadError

if TYPE_CHECKING:
    from llmos.config import Settings
    from llmos.machine.kernels import BatchedKernel

TYPES = {
    "f32": "LLAMA_FTYPE_ALL_F32", "f16": "LLAMA_FTYPE_MOSTLY_F16", "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0", "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M", "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
}  # fmt: skip
HF_TYPES = ("int8",)


def check_type(kind: str) -> str:
    key = kind.lower()
    if key not in TYPES and key not in HF_TYPES:
        raise InvalidInputError(
            f"unknown quantization type {kind!r}; choose one of {', '.join(TYPES)} (GGUF models)"
            f" or {', '.join(HF_TYPES)} (safetensors models)",
            param="type",
        )
    return key


def check_fits(key: str, model_format: str, model_name: str) -> None:
    """Refuse a quantization type that the model's format cannot take, naming the types that it can."""
    if (model_format == "gguf" and key in TYPES) or (model_format in ("hf", "onnx") and key in HF_TYPES):
        return
    if model_format == "onnx":
        raise InvalidInputError(
            f"{model_name} is an ONNX model; valid types for it: {', '.join(HF_TYPES)} (ONNX Runtime's dynamic"
            " quantization)",
            param="type",
        )
    if model_format == "gguf":
        raise InvalidInputError(
            f"{model_name} is a GGUF model; {key} is for safetensors models (PyTorch backend)."
            f" Types for GGUF models: {', '.join(TYPES)}",
            param="type",
        )
    if model_format == "hf":
        raise InvalidInputError(
            f"{model_name} is a safetensors model; valid types for it: {', '.join(HF_TYPES)}."
            f" {key} is a llama.cpp type and needs a GGUF model (`llmos convert {model_name} --to gguf` makes one)",
            param="type",
        )
    hint = " (`llmos convert NAME --to gguf` merges an adapter into its base)" if model_format == "lora" else ""
    raise InvalidInputError(
        f"{model_name} is {model_format}; quantization works on GGUF models ({', '.join(TYPES)})"
        f" and safetensors models ({', '.join(HF_TYPES)}){hint}",
        param="model",
    )


def quantize_gguf(source: Path, target: Path, kind: str, threads: int | None = None) -> Path:
    """Write ``source`` quantized to ``kind`` at ``target``."""
    from llmos.engine.backends.llamacpp import load_library

    llama_cpp = load_library()

    key = check_type(kind)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, TYPES[key])
    params.allow_requantize = True
    params.nthread = threads or os.cpu_count() or 1
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if code != 0 or not target.is_file():
        target.unlink(missing_ok=True)
        raise ModelLoadError(f"llama.cpp could not quantize {source.name} to {key} (code {code})")
    return target


def batched_kernel(quantization: str | None, model_format: str, model: str, settings: Settings) -> BatchedKernel | None:
    """The batched kernel a GGUF model of ``quantization`` gets on this CPU (``None`` for other formats).

    Uses the llama.cpp path verdict this process knows (its own, the setting's or the cached one) and never starts
    a probe; the advice names ``model`` and only types of :data:`TYPES`.
    """
    if model_format != "gguf" or not quantization:
        return None
    from llmos.engine.backends import llamacpp_path
    from llmos.machine import kernels

    return kernels.batched_kernel(
        quantization, quantize_types=TYPES, model=model, verdict=llamacpp_path.known(settings)
    )


DOWN_PROJECTION = "down_proj"
"""Decoder MLP output projections stay float in an int8 ONNX model: their inputs (the SwiGLU products) carry outliers
that one dynamic int8 scale per tensor cannot represent. On SmolLM2 the mean KL divergence from the float model's
next-token distribution over 200 tokens of held-out text was 0.53 with them quantized and 0.078 without."""


def quantize_onnx(source_dir: Path, out_dir: Path) -> Path:
    """An ONNX graph with int8 weights and dynamically quantized activations (ONNX Runtime's ``quantize_dynamic``
    over MatMul, Gemm and Gather, per output channel, except :data:`DOWN_PROJECTION` nodes), beside a copy of the
    source's tokenizer and config files."""
    import shutil

    from llmos.formats.onnx import ONNX_EXTRA
    from llmos.formats.onnx_session import graph_file

    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        from llmos.errors import BackendUnavailableError

        raise BackendUnavailableError(f"quantizing an ONNX model needs `{ONNX_EXTRA}`") from exc
    graph = graph_file(source_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staged = out_dir / "staged"  # the graph beside real copies of its data: the quantizer refuses symlinked data
    staged.mkdir()
    for item in source_dir.iterdir():
        if item.is_file():
            shutil.copyfile(item, staged / item.name)
    import onnx

    nodes = onnx.load(str(graph), load_external_data=False).graph.node
    try:
        quantize_dynamic(
            str(staged / graph.name),
            str(out_dir / "model.onnx"),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm", "Gather"],
            per_channel=True,  # one scale per output channel: cosine to the fp32 MiniLM 0.993, per-tensor 0.968
            nodes_to_exclude=[n.name for n in nodes if DOWN_PROJECTION in n.name],
        )
    except Exception as exc:  # onnxruntime's quantizer raises plain exceptions of many kinds
        raise ModelLoadError(f"ONNX Runtime could not quantize {graph.name}: {exc}") from exc
    for item in staged.iterdir():
        if item.suffix != ".onnx" and not item.name.endswith(".onnx.data") and item.name != graph.name + ".data":
            shutil.copyfile(item, out_dir / item.name)
    for sub in source_dir.iterdir():
        if sub.is_dir():
            shutil.copytree(sub, out_dir / sub.name)
    shutil.rmtree(staged)
    return out_dir
