"""Recognise what a path holds and inspect it.

Contract: :func:`inspect_path` accepts a GGUF file, a safetensors file, a Hugging Face model directory or an ONNX
graph (a ``.onnx`` file or a directory with one, :mod:`llmos.formats.onnx`) and returns
a validated :class:`~llmos.formats.info.ModelInfo`. Pickle checkpoints (``.bin``, ``.pt``, ``.pth``, ``.ckpt``,
``.pkl``, or any file that looks like a pickle or a ``torch.save`` zip) are refused with
:class:`~llmos.errors.UnsafeFormatError`, because loading them can run arbitrary code. Anything else raises
:class:`~llmos.errors.InvalidModelFileError`. From a directory only an allow-list of files is taken (config,
tokenizer, safetensors weights), never anything executable. Its JSON files are read through
:mod:`llmos.formats.safe_json` (size and nesting bounded).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llmos.errors import InvalidModelFileError, UnsafeFormatError
from llmos.formats import safe_json
from llmos.formats.gguf import GGUF_MAGIC, inspect_gguf
from llmos.formats.info import ModelFile, ModelInfo
from llmos.formats.onnx import inspect_onnx
from llmos.formats.safetensors import inspect_safetensors, read_safetensors_header

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
MAX_JSON_BYTES = 32 * 1024 * 1024
HF_SIDE_FILES = {
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "model.safetensors.index.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
}
MODULE_DIR = re.compile(r"^\d+_[A-Za-z]+$")
"""sentence-transformers module folders (``1_Pooling``, ``2_Normalize``); only their config.json is taken."""
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def unsafe_file(path: Path) -> UnsafeFormatError:
    return UnsafeFormatError(
        f"{path.name}: pickle checkpoints are refused because loading them can execute arbitrary code;"
        " convert the model to safetensors or GGUF first"
    )


def _looks_like_pickle(head: bytes) -> bool:
    # pickle protocol 2+ starts with 0x80 <proto>; torch.save >= 1.6 writes a zip archive holding data.pkl
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head.startswith(b"PK\x03\x04")


def inspect_path(path: Path) -> ModelInfo:
    """Inspect ``path`` (a file or a directory) without loading any weights."""
    if not path.exists():
        raise InvalidModelFileError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return inspect_lora_dir(path)
        if any(p.suffix == ".onnx" for p in path.iterdir()):
            return inspect_onnx(path)
        return inspect_hf_dir(path)
    if not path.is_file():
        raise InvalidModelFileError(f"{path}: not a regular file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise unsafe_file(path)
    if path.suffix.lower() == ".onnx":
        return inspect_onnx(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise InvalidModelFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if head.startswith(GGUF_MAGIC):
        return inspect_gguf(path)
    if _looks_like_pickle(head):
        raise unsafe_file(path)
    if path.suffix.lower() == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        return inspect_safetensors(path)
    raise InvalidModelFileError(
        f"{path.name}: unrecognised model format; expected a GGUF file, a safetensors file or a Hugging Face"
        " model directory"
    )


def _read_json(path: Path) -> Any:
    return safe_json.read(path, MAX_JSON_BYTES)


def inspect_hf_dir(directory: Path) -> ModelInfo:
    """Inspect a Hugging Face model directory: config.json, *.safetensors, tokenizer files."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise InvalidModelFileError(f"{directory}: not a Hugging Face model directory (no config.json)")
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise InvalidModelFileError("config.json: expected a JSON object")

    entries = sorted(p for p in directory.iterdir() if p.is_file() and not p.is_symlink())
    weights = [p for p in entries if p.suffix == ".safetensors"]
    if not weights:
        if any(p.suffix.lower() in PICKLE_SUFFIXES for p in entries):
            raise unsafe_file(next(p for p in entries if p.suffix.lower() in PICKLE_SUFFIXES))
        raise InvalidModelFileError(f"{directory}: no *.safetensors weights found")

    parameter_count = 0
    dtypes: dict[str, int] = {}
    files: list[ModelFile] = []
    for weight in weights:
        if not _SAFE_NAME.match(weight.name):
            raise InvalidModelFileError(f"{weight.name}: unexpected file name")
        header = read_safetensors_header(weight)
        parameter_count += header.parameter_count
        if header.main_dtype:
            dtypes[header.main_dtype] = dtypes.get(header.main_dtype, 0) + header.parameter_count
        files.append(ModelFile(weight, weight.name, header.file_size))

    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        index = _read_json(index_path)
        shard_names = set((index.get("weight_map") or {}).values()) if isinstance(index, dict) else set()
        missing = sorted(str(s) for s in shard_names if str(s) not in {w.name for w in weights})
        if missing:
            raise InvalidModelFileError(f"model.safetensors.index.json names missing shards: {', '.join(missing)}")

    for side in entries:
        if side.name in HF_SIDE_FILES:
            files.append(ModelFile(side, side.name, side.stat().st_size))
    for module_dir in sorted(p for p in directory.iterdir() if p.is_dir() and MODULE_DIR.match(p.name)):
        module_config = module_dir / "config.json"
        if module_config.is_file() and not module_config.is_symlink():
            _read_json(module_config)
            files.append(ModelFile(module_config, f"{module_dir.name}/config.json", module_config.stat().st_size))

    tokenizer_config = (
        _read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() else {}
    )
    template = tokenizer_config.get("chat_template") if isinstance(tokenizer_config, dict) else None
    if (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8", errors="replace")
    if not isinstance(template, str):
        template = None
    architectures = config.get("architectures")
    architecture = architectures[0] if isinstance(architectures, list) and architectures else config.get("model_type")
    quant = config.get("quantization_config")
    quantization = (
        quant.get("quant_method")
        if isinstance(quant, dict)
        else (max(dtypes, key=lambda k: dtypes[k]) if dtypes else None)
    )
    context = config.get("max_position_embeddings")
    return ModelInfo(
        format="hf",
        files=files,
        architecture=str(architecture) if architecture else None,
        parameter_count=parameter_count,
        quantization=str(quantization) if quantization else None,
        context_length=context if isinstance(context, int) and context > 0 else None,
        chat_template=template,
        tokenizer={
            "model": tokenizer_config.get("tokenizer_class") if isinstance(tokenizer_config, dict) else None,
            "vocab_size": config.get("vocab_size"),
            "bos_token": _token_text(tokenizer_config, "bos_token"),
            "eos_token": _token_text(tokenizer_config, "eos_token"),
        },
        metadata={
            "model_type": config.get("model_type"),
            "torch_dtype": config.get("torch_dtype") or config.get("dtype"),
            "task": "embedding" if (directory / "modules.json").is_file() else "generation",
            **({"shape": shape} if (shape := _hf_shape(config)) else {}),
        },
    )


def _hf_shape(config: dict[str, Any]) -> dict[str, int] | None:
    def get(key: str) -> int | None:
        value = config.get(key)
        return value if isinstance(value, int) and value > 0 else None

    layers, embedding, heads = get("num_hidden_layers"), get("hidden_size"), get("num_attention_heads")
    if not (layers and embedding and heads):
        return None
    return {
        "layers": layers,
        "embedding": embedding,
        "heads": heads,
        "kv_heads": get("num_key_value_heads") or heads,
        "head_dim": get("head_dim") or embedding // heads,
    }


def _token_text(tokenizer_config: Any, key: str) -> str | None:
    if not isinstance(tokenizer_config, dict):
        return None
    value = tokenizer_config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def inspect_lora_dir(directory: Path) -> ModelInfo:
    """A peft LoRA adapter: adapter_config.json + adapter_model.safetensors (pickled adapters are refused)."""
    config = _read_json(directory / "adapter_config.json")
    if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise InvalidModelFileError("adapter_config.json: only LoRA adapters (peft_type LORA) are supported")
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise unsafe_file(directory / "adapter_model.bin")
        raise InvalidModelFileError(f"{directory}: no adapter_model.safetensors")
    header = read_safetensors_header(weights)
    shapes = {name: list(shape) for name, (_dtype, shape) in header.tensors.items()}
    layers = sorted({int(m.group(1)) for n in shapes if (m := re.search(r"layers\.(\d+)\.", n))})
    hidden = next((s[1] for n, s in shapes.items() if n.endswith("q_proj.lora_A.weight")), None)
    return ModelInfo(
        format="lora",
        files=[
            ModelFile(
                directory / "adapter_config.json",
                "adapter_config.json",
                (directory / "adapter_config.json").stat().st_size,
            ),
            ModelFile(weights, "adapter_model.safetensors", header.file_size),
        ],
        architecture=None,
        parameter_count=header.parameter_count,
        quantization=header.main_dtype,
        metadata={
            "r": config.get("r"),
            "lora_alpha": config.get("lora_alpha"),
            "target_modules": sorted(config.get("target_modules") or []),
            "base_model_name_or_path": config.get("base_model_name_or_path"),
            "adapter_layers": (layers[-1] + 1) if layers else 0,
            "adapter_hidden": hidden,
        },
    )
