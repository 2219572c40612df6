"""``llmos quantize --type int8``: a Hugging Face checkpoint with int8 weights, for the PyTorch backend.

Contract: :func:`quantize_int8` writes a copy of ``source_dir`` into ``out_dir`` in which the linear projections of
every decoder layer (``*_proj``), the LM head and the token embeddings are int8 with one float32 scale per output
row (the format of :mod:`llmos.formats.int8`: ``<module>.weight`` + ``<module>.weight_scale``), so those weights
take a quarter of their float32 size on disk and in memory. Everything else (norms) is copied unchanged, as are the
tokenizer and generation files. config.json is marked ``"llmos_quantization": "int8_dynamic"`` (plus a
``quantization_config`` describing the scheme, which ``llmos show`` reports); the PyTorch backend then quantizes
activations dynamically at run time (:mod:`llmos.engine.backends.int8`). Models the PyTorch backend cannot run, and
checkpoints that are already quantized, are refused with :class:`~llmos.errors.InvalidInputError`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from llmos.errors import InvalidInputError, InvalidModelFileError
from llmos.formats.int8 import DESCRIPTION, MARKER, SCALE_SUFFIX, is_quantized_key, quantize_rows


def quantize_int8(source_dir: Path, out_dir: Path) -> Path:
    """Write the int8 copy of the checkpoint in ``source_dir`` to ``out_dir`` and return ``out_dir``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from llmos.engine.backends.torch import SUPPORTED_TYPES

    try:
        config: dict[str, Any] = json.loads((source_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidModelFileError(f"the model's config.json cannot be read: {exc}") from exc
    if config.get("model_type") not in SUPPORTED_TYPES:
        raise InvalidInputError(
            f"int8 quantization is for models the PyTorch backend runs ({', '.join(sorted(SUPPORTED_TYPES))}),"
            f" not {config.get('model_type')}",
            param="model",
        )
    if config.get("llmos_quantization") or config.get("quantization_config"):
        raise InvalidInputError("this model is already quantized; quantize its float parent", param="model")
    tied = bool(config.get("tie_word_embeddings", False))
    files = sorted(source_dir.glob("*.safetensors"))
    if not files:
        raise InvalidModelFileError("the model has no *.safetensors weights")
    tensors: dict[str, Any] = {}
    count = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if tied and key == "lm_head.weight":
                    continue  # the embeddings are the LM head; Hugging Face does not store them twice
                tensor = handle.get_tensor(key)
                if is_quantized_key(key, tensor.ndim):
                    q, scale = quantize_rows(tensor)
                    tensors[key], tensors[f"{key}{SCALE_SUFFIX}"] = q, scale
                    count += 1
                else:
                    tensors[key] = tensor.contiguous()
    if count == 0:
        raise InvalidModelFileError("no linear projections found to quantize (expected *_proj.weight tensors)")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt", "llmos": MARKER})
    for side in sorted(source_dir.iterdir()):
        skip = side.suffix == ".safetensors" or side.name in ("config.json", "model.safetensors.index.json")
        if side.is_file() and not skip:
            shutil.copyfile(side, out_dir / side.name)
    config["llmos_quantization"] = MARKER
    config["quantization_config"] = dict(DESCRIPTION)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir
