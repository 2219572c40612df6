"""Format conversion: GGUF -> Hugging Face safetensors directory.

Contract: :func:`gguf_to_hf` dequantizes a llama-family GGUF with transformers' GGUF reader and writes a Hugging
Face directory (config.json, model.safetensors, tokenizer files) in ``dtype`` (float32 by default: the exact
dequantized values). Needs the ``torch`` extra; anything transformers cannot read raises
:class:`~llmos.errors.InvalidModelFileError`.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from llmos.errors import BackendUnavailableError, InvalidModelFileError

DTYPES = ("float32", "bfloat16", "float16")


def gguf_to_hf(gguf_file: Path, out_dir: Path, dtype: str = "float32") -> None:
    if dtype not in DTYPES:
        raise InvalidModelFileError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on installation
        raise BackendUnavailableError("conversion needs `pip install 'llmos[torch]'`") from exc
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    torch_dtype = getattr(torch, dtype)
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise InvalidModelFileError(f"transformers cannot convert this GGUF: {exc}") from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain tensors now
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.to(torch_dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
