"""Format conversion: Hugging Face (safetensors) llama-family directory -> one self-contained GGUF file.

Contract: :func:`hf_to_gguf` writes what llama.cpp's own ``convert_hf_to_gguf.py`` writes for a
``LlamaForCausalLM`` checkpoint, with the ``gguf`` package's :class:`~gguf.GGUFWriter`:

* ``general.architecture = llama`` and the ``llama.*`` hyperparameters (context and embedding length, block count,
  feed-forward length, head counts, RMS-norm epsilon, rope base and dimension, vocabulary size) plus
  ``general.file_type``;
* tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ... ``ffn_down``, ``attn_norm``, ``ffn_norm``,
  ``output_norm``, and ``output`` unless the embeddings are tied), with the rows of ``attn_q`` / ``attn_k`` permuted
  from Hugging Face's rotary layout back to llama.cpp's interleaved one (:func:`permute_qk`; transformers' GGUF
  reader applies the inverse, so GGUF -> HF -> GGUF is exact in f32);
* the tokenizer: byte-level BPE only (``tokenizer.ggml.model = gpt2``): tokens in id order (gaps filled with unused
  ``[PADn]`` tokens), token types (control for special added tokens, user-defined for other added ones), merges,
  the pre-tokenizer llama.cpp must use (recognised from tokenizer.json: GPT-2, SmolLM, Llama 3), bos / eos / unk /
  pad ids, ``add_bos_token`` / ``add_eos_token``, and the chat template.

Output types (:data:`OUT_TYPES`): ``f32``, ``f16`` (default; 1-D tensors such as norms stay f32, as upstream) and
``q8_0`` (2-D tensors quantized by gguf-py's reference implementation, rows not a multiple of 32 stay f16).
``tensors`` may replace the checkpoint's weights (a LoRA adapter merged into its base); a directory written by
``llmos quantize --type int8`` is dequantized on the way. Anything else (another architecture, a WordPiece /
Unigram / SentencePiece tokenizer, an unknown pre-tokenizer, rope scaling, biases) raises
:class:`~llmos.errors.InvalidInputError` naming what is unsupported. Needs the ``torch`` extra (torch, gguf).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmos.errors import BackendUnavailableError, InvalidInputError, InvalidModelFileError
from llmos.formats import safe_json
from llmos.formats.int8 import SCALE_SUFFIX, dequantize_rows, is_int8_config

if TYPE_CHECKING:
    import numpy as np
    import torch

OUT_TYPES = ("f16", "f32", "q8_0")
ARCHITECTURES = ("LlamaForCausalLM",)

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


def gguf_tensor_name(hf_name: str) -> str | None:
    """llama.cpp's name for a Hugging Face llama tensor (``None``: not a tensor GGUF keeps, e.g. rotary buffers)."""
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    match = _LAYER_KEY.match(hf_name)
    if match is None or match.group(2) not in LAYER_NAMES:
        return None
    return f"blk.{match.group(1)}.{LAYER_NAMES[match.group(2)]}.weight"


def permute_qk(weights: np.ndarray[Any, Any], heads: int) -> np.ndarray[Any, Any]:
    """Hugging Face's rotary row order (two halves per head) -> llama.cpp's (interleaved pairs), per head."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidModelFileError(f"{path.name} cannot be read: {exc.strerror or exc}") from exc
    data = safe_json.loads(raw, path.name)
    return data if isinstance(data, dict) else {}


# --- hyperparameters ------------------------------------------------------------------------------------------------


def llama_hparams(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``llama.*`` metadata of a Hugging Face config, refusing what this writer does not reproduce."""
    architectures = config.get("architectures") or [config.get("model_type")]
    architecture = str(architectures[0]) if architectures else "unknown"
    if architecture not in ARCHITECTURES:
        raise InvalidInputError(
            f"GGUF conversion supports llama-family models ({', '.join(ARCHITECTURES)}), not {architecture}",
            param="model",
        )
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise InvalidInputError(f"GGUF conversion does not support {flag}=true checkpoints yet", param="model")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type != "default":
        raise InvalidInputError(f"GGUF conversion does not support rope scaling {rope_type!r} yet", param="model")
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or hidden // heads)
        return {
            "context_length": int(config.get("max_position_embeddings") or 2048),
            "embedding_length": hidden,
            "block_count": int(config["num_hidden_layers"]),
            "feed_forward_length": int(config["intermediate_size"]),
            "head_count": heads,
            "head_count_kv": int(config.get("num_key_value_heads") or heads),
            "head_dim": head_dim,
            "rms_norm_eps": float(config.get("rms_norm_eps") or 1e-5),
            "rope_theta": float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0),
            "vocab_size": int(config["vocab_size"]),
            "tied": bool(config.get("tie_word_embeddings", False)),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidModelFileError(f"config.json lacks a usable llama hyperparameter: {exc}") from exc


# --- tokenizer ------------------------------------------------------------------------------------------------------


def _pre_tokenizer_name(tokenizer: Mapping[str, Any]) -> str:
    """llama.cpp's pre-tokenizer for a byte-level BPE tokenizer.json, recognised from its pre_tokenizer chain."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [str(step.get("type")) for step in steps]
    if tokenizer.get("normalizer") is not None:
        raise InvalidInputError("GGUF conversion does not support tokenizers with a normalizer", param="model")
    if kinds and kinds[-1] == "ByteLevel" and steps[-1].get("add_prefix_space"):
        raise InvalidInputError("GGUF conversion does not support byte-level BPE with add_prefix_space", param="model")
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern == LLAMA3_SPLIT and steps[0].get("behavior") == "Isolated":
            return "llama-bpe"
    raise InvalidInputError(
        f"GGUF conversion does not recognise this tokenizer's pre-tokenizer ({' + '.join(kinds) or 'none'});"
        " supported: GPT-2, SmolLM and Llama 3 byte-level BPE",
        param="model",
    )


def _token_id(value: Any, vocab: Mapping[str, int]) -> int | None:
    text = value.get("content") if isinstance(value, dict) else value
    return vocab.get(text) if isinstance(text, str) else None


def _template_has(processor: Mapping[str, Any] | None, token: str | None, where: str) -> bool:
    """Whether a TemplateProcessing post-processor puts ``token`` first (``where="bos"``) or last in a single text."""
    if not processor or token is None:
        return False
    steps = processor.get("processors", []) if processor.get("type") == "Sequence" else [processor]
    for step in steps:
        single = step.get("single") if step.get("type") == "TemplateProcessing" else None
        if single:
            piece = single[0] if where == "bos" else single[-1]
            if isinstance(piece, dict) and (piece.get("SpecialToken") or {}).get("id") == token:
                return True
    return False


def read_tokenizer(model_dir: Path, config: Mapping[str, Any], vocab_size: int) -> dict[str, Any]:
    """Everything GGUF needs of a byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json + config.json)."""
    data = _read_json(model_dir / "tokenizer.json")
    if not data:
        raise InvalidInputError("GGUF conversion needs a tokenizer.json (fast tokenizer) in the model", param="model")
    model = data.get("model") or {}
    kind = str(model.get("type"))
    if kind != "BPE":
        raise InvalidInputError(
            f"GGUF conversion supports byte-level BPE tokenizers, not {kind} (tokenizer.json)", param="model"
        )
    decoder = (data.get("decoder") or {}).get("type")
    if decoder != "ByteLevel" or model.get("byte_fallback"):
        raise InvalidInputError(
            "GGUF conversion supports byte-level BPE tokenizers; this BPE is SentencePiece-style"
            f" (decoder {decoder}, byte_fallback {bool(model.get('byte_fallback'))})",
            param="model",
        )
    pre = _pre_tokenizer_name(data)
    vocab: dict[str, int] = {str(k): int(v) for k, v in (model.get("vocab") or {}).items()}
    added = {int(t["id"]): t for t in data.get("added_tokens") or [] if isinstance(t, dict) and "id" in t}
    for token_id, entry in added.items():
        vocab.setdefault(str(entry.get("content")), token_id)
    by_id = {v: k for k, v in vocab.items()}
    size = max(vocab_size, max(by_id, default=-1) + 1)
    tokens: list[str] = []
    types: list[int] = []
    for i in range(size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
        elif i in added:
            tokens.append(text)
            special = bool(added[i].get("special")) or (text.startswith("<|") and text.endswith("|>"))
            types.append(3 if special else 4)  # CONTROL / USER_DEFINED
        else:
            tokens.append(text)
            types.append(1)  # NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    settings = _read_json(model_dir / "tokenizer_config.json")
    ids: dict[str, int | None] = {}
    texts: dict[str, str | None] = {}
    for key in ("bos", "eos", "unk", "pad"):
        value = settings.get(f"{key}_token")
        texts[key] = value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None
        found = _token_id(value, vocab)
        fallback = config.get(f"{key}_token_id")
        ids[key] = found if found is not None else fallback if isinstance(fallback, int) else None
    processor = data.get("post_processor")
    add_bos = settings.get("add_bos_token")
    add_eos = settings.get("add_eos_token")
    template = settings.get("chat_template")
    if (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    return {
        "pre": pre,
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "ids": ids,
        "add_bos": add_bos if isinstance(add_bos, bool) else _template_has(processor, texts["bos"], "bos"),
        "add_eos": add_eos if isinstance(add_eos, bool) else _template_has(processor, texts["eos"], "eos"),
        "chat_template": template if isinstance(template, str) else None,
    }


# --- tensors --------------------------------------------------------------------------------------------------------


def _checkpoint_tensors(model_dir: Path, int8: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, float32 tensor) for every tensor of the checkpoint's safetensors files, int8 weights dequantized."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise InvalidModelFileError(f"{model_dir.name}: no *.safetensors weights to convert")
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            keys = list(handle.keys())
            for key in keys:
                if int8 and key.endswith(SCALE_SUFFIX):
                    continue
                tensor = handle.get_tensor(key)
                if int8 and f"{key}{SCALE_SUFFIX}" in keys:
                    tensor = dequantize_rows(tensor, handle.get_tensor(f"{key}{SCALE_SUFFIX}"))
                yield key, tensor.float()


def _encode(name: str, data: np.ndarray[Any, Any], out_type: str) -> tuple[np.ndarray[Any, Any], Any]:
    """The array to write and its raw GGML type (None: let the writer infer f32 / f16 from the dtype)."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if out_type == "f32" or data.ndim < 2 or name.endswith("_norm.weight"):
        return data.astype(np.float32), None
    if out_type == "q8_0" and data.shape[-1] % 32 == 0:
        return quantize(data.astype(np.float32), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def hf_to_gguf(
    model_dir: Path,
    out_file: Path,
    out_type: str = "f16",
    *,
    name: str | None = None,
    chat_template: str | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write the llama checkpoint in ``model_dir`` (or ``tensors`` with its config and tokenizer) to ``out_file``."""
    if out_type not in OUT_TYPES:
        raise InvalidInputError(f"--type must be one of {', '.join(OUT_TYPES)} for GGUF, not {out_type!r}")
    try:
        import gguf
        import torch
    except ImportError as exc:  # pragma: no cover - depends on installation
        raise BackendUnavailableError("conversion to GGUF needs `pip install 'llmos[torch]'`") from exc
    config = _read_json(model_dir / "config.json")
    if not config:
        raise InvalidModelFileError(f"{model_dir.name}: no config.json; not a Hugging Face model directory")
    hp = llama_hparams(config)
    vocab = read_tokenizer(model_dir, config, hp["vocab_size"])
    int8 = is_int8_config(config)

    writer = gguf.GGUFWriter(str(out_file), "llama")
    writer.add_name(name or str(config.get("_name_or_path") or model_dir.name))
    writer.add_context_length(hp["context_length"])
    writer.add_embedding_length(hp["embedding_length"])
    writer.add_block_count(hp["block_count"])
    writer.add_feed_forward_length(hp["feed_forward_length"])
    writer.add_head_count(hp["head_count"])
    writer.add_head_count_kv(hp["head_count_kv"])
    writer.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != hp["embedding_length"] // hp["head_count"]:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    writer.add_vocab_size(len(vocab["tokens"]))
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_file_type(file_types[out_type])
    if out_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for key, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        if vocab["ids"][key] is not None:
            add(int(vocab["ids"][key]))
    writer.add_add_bos_token(bool(vocab["add_bos"]))
    writer.add_add_eos_token(bool(vocab["add_eos"]))
    template = chat_template or vocab["chat_template"]
    if template:
        writer.add_chat_template(template)

    source = tensors.items() if tensors is not None else _checkpoint_tensors(model_dir, int8)
    written: set[str] = set()
    for key, tensor in source:
        target = gguf_tensor_name(key)
        if target is None or (target == "output.weight" and hp["tied"]):
            continue
        data = tensor.detach().to(dtype=torch.float32, device="cpu").numpy()
        if target.endswith("attn_q.weight"):
            data = permute_qk(data, hp["head_count"])
        elif target.endswith("attn_k.weight"):
            data = permute_qk(data, hp["head_count_kv"])
        array, raw_type = _encode(target, data, out_type)
        writer.add_tensor(target, array, raw_dtype=raw_type)
        written.add(target)
    expected = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not hp["tied"] else set())
    for block in range(hp["block_count"]):
        expected |= {f"blk.{block}.{suffix}.weight" for suffix in LAYER_NAMES.values()}
    missing = sorted(expected - written)
    if missing:
        writer.close()
        raise InvalidModelFileError(f"the checkpoint lacks {len(missing)} llama tensors, e.g. {', '.join(missing[:3])}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file
