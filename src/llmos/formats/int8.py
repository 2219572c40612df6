"""The int8 checkpoint format of ``llmos quantize --type int8``: one rule shared by its writer and its readers.

Contract: a Hugging Face checkpoint whose config.json says ``"llmos_quantization": "int8_dynamic"`` (:data:`MARKER`)
stores each quantized weight ``W [out, in]`` as int8 ``Q`` under ``<module>.weight`` and a float32 scale per output
row under ``<module>.weight_scale`` (:data:`SCALE_SUFFIX`), symmetric: ``W ~= Q * scale[:, None]``, ``|Q| <= 127``
(:func:`quantize_rows`, :func:`dequantize_rows`). :func:`is_quantized_key` names the tensors that are quantized: the
linear projections of every decoder layer (``model.layers.*_proj.weight``), the LM head and the token embeddings;
norms and everything else stay float.

The writer is :mod:`llmos.compression.int8`; the readers are the PyTorch backend (:mod:`llmos.engine.backends.int8`)
and the GGUF writer (:mod:`llmos.formats.gguf_write`, which dequantizes). torch is imported inside functions only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MARKER = "int8_dynamic"
"""config.json ``llmos_quantization`` (and ``quantization_config.quant_method``) of an int8 checkpoint."""
SCALE_SUFFIX = "_scale"
"""``<module>.weight_scale`` holds the per-row scales of the int8 ``<module>.weight``."""
DESCRIPTION = {
    "quant_method": MARKER,
    "bits": 8,
    "weights": "int8, symmetric, one float32 scale per output row",
    "activations": "int8, dynamic (per call)",
    "modules": "decoder *_proj, lm_head, embed_tokens",
}
"""The ``quantization_config`` written into config.json (``llmos show`` reports it)."""


def is_int8_config(config: object) -> bool:
    """True for the parsed config.json of an int8 checkpoint."""
    return isinstance(config, dict) and config.get("llmos_quantization") == MARKER


def is_int8_dir(model_dir: Path) -> bool:
    """True when ``model_dir`` holds an int8 checkpoint (an unreadable config.json is not one)."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return is_int8_config(config)


def is_quantized_key(key: str, ndim: int) -> bool:
    """Whether the tensor ``key`` (of ``ndim`` dimensions) is stored as int8 in the checkpoint."""
    if ndim != 2 or not key.endswith(".weight"):
        return False
    return key in ("lm_head.weight", "model.embed_tokens.weight") or (
        key.startswith("model.layers.") and key.endswith("_proj.weight")
    )


def quantize_rows(weight: Any) -> tuple[Any, Any]:
    """Symmetric int8 per output row: (int8 ``Q``, float32 ``scale``) with ``weight ~= Q * scale[:, None]``."""
    import torch

    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: Any, scale: Any) -> Any:
    """The float32 weight ``Q * scale[:, None]`` of an int8 tensor and its per-row scales."""
    return q.float() * scale.float()[:, None]
