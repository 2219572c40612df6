"""Format conversion: GGUF -> Hugging Face safetensors directory, and LoRA merging (for HF -> GGUF, see gguf_write).

Contract: :func:`gguf_to_hf` dequantizes a llama-family GGUF with transformers' GGUF reader and writes a Hugging
Face directory (config.json, model.safetensors, tokenizer files) in ``dtype`` (float32 by default: the exact
dequantized values). Needs the ``torch`` extra; anything transformers cannot read raises
:class:`~llmos.errors.InvalidModelFileError`. :func:`merge_lora` folds a peft LoRA adapter into its base's weights
(peft ``merge_and_unload``) so a fine-tuned model can be written as one self-contained file.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmos.errors import BackendUnavailableError, InvalidInputError, InvalidModelFileError

DTYPES = ("float32", "bfloat16", "float16")
_PARSING = threading.Lock()


@contextlib.contextmanager
def _parse_gguf_once() -> Iterator[None]:
    """While transformers reads one GGUF: parse the file once and build gguf's tensor-name map once.

    transformers opens the file three times (tokenizer, config, weights), each parse walking every vocabulary entry
    in Python, and rebuilds gguf's TensorNameMap for each of the model's ~400 submodules; together that was about
    half of converting SmolLM2. Both are looked up on the ``gguf`` module at call time, so they are swapped for
    caching versions here and restored after (one conversion at a time per process holds the lock).
    """
    try:
        import gguf
    except ImportError:  # pragma: no cover - transformers reports the missing package itself
        yield
        return
    with _PARSING:
        reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
        readers: dict[tuple[str, str], Any] = {}

        def shared_reader(path: str | os.PathLike[str], mode: str = "r") -> Any:
            key = (os.fspath(path), mode)
            if key not in readers:
                readers[key] = reader_class(path, mode)  # type: ignore[arg-type]
            return readers[key]

        gguf.GGUFReader = shared_reader  # type: ignore[assignment,misc]
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map  # type: ignore[misc]


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
        with contextlib.redirect_stderr(io.StringIO()), _parse_gguf_once():
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


def merge_lora(base_dir: Path, adapter_dir: Path) -> dict[str, Any]:
    """The state dict of ``base_dir`` with the peft LoRA adapter in ``adapter_dir`` merged in (``merge_and_unload``).

    Loaded in float32 so the merge adds the low-rank update at full precision; the result is self-contained.
    """
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("llmos_quantization"):
        raise InvalidInputError(
            f"cannot merge a LoRA adapter into a {config['llmos_quantization']} model; use its float parent as base"
        )
    try:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    except ImportError as exc:  # pragma: no cover - depends on installation
        raise BackendUnavailableError("merging a LoRA adapter needs `pip install 'llmos[torch]'`") from exc
    try:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, local_files_only=True)
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise InvalidModelFileError(f"the LoRA adapter cannot be merged into its base: {exc}") from exc
    return dict(merged.state_dict())
