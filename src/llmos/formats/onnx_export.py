"""Export a Hugging Face model directory to an ONNX graph that the ONNX Runtime backend runs, and check it.

Contract: :func:`export_decoder` writes ``model.onnx`` (weights in ``model.onnx.data``) for a Llama-family causal LM
(llama, mistral, qwen2, smollm) with the usual KV-cache signature: inputs ``input_ids [batch, seq]``,
``attention_mask [batch, past + seq]`` (0 marks a padded or empty cell), ``position_ids [batch, seq]`` and
``past_key_values.N.key/value [batch, kv_heads, past, head_dim]``; outputs ``logits [batch, seq, vocab]`` and
``present.N.key/value`` (the past with this call's keys and values appended). Query ``j`` of a row attends to past
cells its mask allows and to this call's cells ``0..j``. The forward pass is llmos's own (the Hugging Face modules
supply the weights), written so the exporter sees plain tensor operations. :func:`export_encoder` writes a
sentence-transformers encoder with its pooling (mean or CLS) and normalisation inside the graph: inputs
``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the model has them), output ``sentence_embedding``.
Both copy the tokenizer and config files, then check the graph against the source: the same greedy tokens on a
prompt (decoder), cosine > 0.999 on a few sentences (encoder); a mismatch raises
:class:`~llmos.errors.InvalidModelFileError` and nothing is registered. Needs the ``torch`` and ``onnx`` extras.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llmos.errors import BackendUnavailableError, InvalidModelFileError
from llmos.formats.detect import HF_SIDE_FILES
from llmos.formats.onnx import sentence_pooling

DECODER_TYPES = {"llama", "mistral", "qwen2", "smollm3"}
CHECK_PROMPT = "The capital of France is"
CHECK_TOKENS = 12
CHECK_SENTENCES = ("A man is eating food.", "The weather is lovely today.", "llmos runs models on your own machine.")
_SIDE_FILES = HF_SIDE_FILES - {"model.safetensors.index.json"}
"""The source's config and tokenizer files the export copies beside the graph."""


def _libraries() -> tuple[Any, Any]:
    try:
        import onnx
        import torch
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise BackendUnavailableError("exporting to ONNX needs `pip install 'llmos[torch,onnx]'`") from exc
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    return torch, onnx


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The TorchScript exporter's tracer and deprecation warnings are about its own internals, not the user's model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _copy_side_files(source: Path, out_dir: Path) -> None:
    for name in sorted(_SIDE_FILES):
        if (source / name).is_file():
            shutil.copyfile(source / name, out_dir / name)


def _save(onnx: Any, raw: Path, out_dir: Path) -> None:
    """Re-save the exporter's graph with every weight in one external ``model.onnx.data`` file."""
    model = onnx.load(str(raw))
    onnx.save_model(
        model, str(out_dir / "model.onnx"), save_as_external_data=True, location="model.onnx.data", size_threshold=0
    )
    raw.unlink()


# --- decoders --------------------------------------------------------------------------------------------------------


def _decoder_module(torch: Any, model: Any) -> Any:
    """The exported forward pass: plain tensor operations over the Hugging Face model's weights."""
    config = model.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    rotary = model.model.rotary_emb
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    eps = float(config.rms_norm_eps)

    embedding = model.model.embed_tokens.weight
    tied = model.lm_head.weight is embedding or bool(getattr(config, "tie_word_embeddings", False))

    class Decoder(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.register_buffer("inv_freq", rotary.inv_freq.detach().clone().float(), persistent=False)
            # tied embeddings: one [hidden, vocab] table serves the lookup (a Gather of columns) and the LM head (a
            # MatMul), so the graph holds it once; a Linear over the embedding would add a transposed copy (+113 MB)
            self.table = torch.nn.Parameter(embedding.detach().t().contiguous()) if tied else None

        def norm(self, x: Any, weight: Any) -> Any:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, *past: Any) -> tuple[Any, ...]:
            batch, seq = input_ids.shape
            total = past[0].shape[2] + seq
            if self.table is not None:
                x = torch.index_select(self.table, 1, input_ids.reshape(-1)).t().reshape(batch, seq, -1)
            else:
                x = self.model.model.embed_tokens(input_ids)
            freqs = position_ids[..., None].float() * self.inv_freq
            angles = torch.cat([freqs, freqs], -1)
            cos, sin = (angles.cos() * scaling)[:, None], (angles.sin() * scaling)[:, None]
            query_cell = torch.arange(seq) + (total - seq)
            causal = torch.arange(total)[None, :] <= query_cell[:, None]
            allowed = causal[None] & (attention_mask[:, None, :] > 0)
            bias = torch.where(allowed, 0.0, -1e9)[:, None]  # finite: a row with nothing to attend to gives no NaN
            half = head_dim // 2
            group = heads // kv_heads

            def rope(t: Any) -> Any:
                return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

            presents = []
            for index, layer in enumerate(self.model.model.layers):
                attn = layer.self_attn
                h = self.norm(x, layer.input_layernorm.weight)
                q = rope(attn.q_proj(h).view(batch, seq, heads, head_dim).transpose(1, 2))
                k = rope(attn.k_proj(h).view(batch, seq, kv_heads, head_dim).transpose(1, 2))
                v = attn.v_proj(h).view(batch, seq, kv_heads, head_dim).transpose(1, 2)
                k = torch.cat([past[2 * index], k], 2)
                v = torch.cat([past[2 * index + 1], v], 2)
                presents += [k, v]
                k = k[:, :, None].expand(batch, kv_heads, group, total, head_dim).reshape(batch, heads, total, head_dim)
                v = v[:, :, None].expand(batch, kv_heads, group, total, head_dim).reshape(batch, heads, total, head_dim)
                weights = torch.softmax(q @ k.transpose(-1, -2) * (head_dim**-0.5) + bias, -1)
                out = (weights @ v).transpose(1, 2).reshape(batch, seq, heads * head_dim)
                x = x + attn.o_proj(out)
                h = self.norm(x, layer.post_attention_layernorm.weight)
                mlp = layer.mlp
                x = x + mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
            x = self.norm(x, self.model.model.norm.weight)
            logits = x @ self.table if self.table is not None else self.model.lm_head(x)
            return (logits, *presents)

    module = Decoder().eval()
    module.kv_shape = (len(model.model.layers), kv_heads, head_dim)
    return module


def export_decoder(source: Path, out_dir: Path, *, threads: int | None = None) -> None:
    torch, onnx = _libraries()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") not in DECODER_TYPES:
        raise InvalidModelFileError(
            f"ONNX export supports {', '.join(sorted(DECODER_TYPES))} decoders, not {config.get('model_type')!r}"
        )
    if config.get("llmos_quantization"):
        raise InvalidModelFileError("export the float parent to ONNX, then `llmos quantize --type int8` the ONNX model")
    model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, local_files_only=True)
    model.eval()
    module = _decoder_module(torch, model)
    layers, kv_heads, head_dim = module.kv_shape
    batch, seq, past = 2, 3, 4
    example = (
        torch.randint(0, 100, (batch, seq)),
        torch.ones(batch, past + seq, dtype=torch.int64),
        torch.arange(past, past + seq)[None].expand(batch, seq).contiguous(),
        *[torch.zeros(batch, kv_heads, past, head_dim) for _ in range(2 * layers)],
    )
    past_names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present_names = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
        **{name: {0: "batch", 2: "past"} for name in past_names},
        **{name: {0: "batch", 2: "total"} for name in present_names},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "raw.onnx"
    with torch.no_grad(), _quiet():
        torch.onnx.export(
            module,
            example,
            str(raw),
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    _save(onnx, raw, out_dir)
    _copy_side_files(source, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    prompt = list(tokenizer(CHECK_PROMPT)["input_ids"])
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt]), max_new_tokens=CHECK_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    expected = [int(t) for t in generated[0, len(prompt) :]]
    got = onnx_greedy(out_dir / "model.onnx", prompt, len(expected), threads=threads)
    if got != expected:
        raise InvalidModelFileError(
            f"the exported ONNX graph does not reproduce the source's greedy tokens ({got} vs {expected})"
        )


def onnx_greedy(graph: Path, prompt: list[int], count: int, *, threads: int | None = None) -> list[int]:
    """Greedy decoding of ``count`` tokens with ONNX Runtime over a decoder graph (one sequence): the export check."""
    from llmos.formats.onnx_session import open_session

    session = open_session(graph, threads=threads)
    names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    shape = session.get_inputs()[3].shape
    past = {name: np.zeros((1, int(shape[1]), 0, int(shape[3])), dtype=np.float32) for name in names}
    tokens, generated = list(prompt), []
    new = tokens
    for _ in range(count):
        feeds = {
            "input_ids": np.array([new], dtype=np.int64),
            "attention_mask": np.ones((1, len(tokens)), dtype=np.int64),
            "position_ids": np.arange(len(tokens) - len(new), len(tokens), dtype=np.int64)[None],
            **past,
        }
        outputs = session.run(None, feeds)
        token = int(np.argmax(outputs[0][0, -1]))
        generated.append(token)
        past = dict(zip(names, outputs[1:], strict=True))
        tokens.append(token)
        new = [token]
    return generated


# --- encoders --------------------------------------------------------------------------------------------------------


def export_encoder(source: Path, out_dir: Path, *, threads: int | None = None) -> None:
    torch, onnx = _libraries()
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(str(source), device="cpu", local_files_only=True)
    transformer: Any = encoder[0].auto_model
    transformer.eval()
    mode, normalize = sentence_pooling(source)
    if mode not in ("mean_tokens", "cls_token"):
        raise InvalidModelFileError("ONNX export supports mean and CLS pooling only")
    cls_pooling = mode == "cls_token"
    token_types = getattr(transformer.config, "type_vocab_size", 0) > 0

    class Encoder(torch.nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids: Any, attention_mask: Any, *rest: Any) -> Any:
            extra = {"token_type_ids": rest[0]} if rest else {}
            hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
            if cls_pooling:
                pooled = hidden[:, 0]
            else:
                mask = attention_mask[..., None].to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
            return pooled

    names = ["input_ids", "attention_mask", *(["token_type_ids"] if token_types else [])]
    example = tuple(torch.ones(2, 5, dtype=torch.int64) for _ in names)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "raw.onnx"
    with torch.no_grad(), _quiet():
        torch.onnx.export(
            Encoder().eval(),
            example,
            str(raw),
            input_names=names,
            output_names=["sentence_embedding"],
            dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, "sentence_embedding": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    _save(onnx, raw, out_dir)
    _copy_side_files(source, out_dir)
    pooling_dir = out_dir / "1_Pooling"
    pooling_dir.mkdir(exist_ok=True)
    shutil.copyfile(source / "1_Pooling" / "config.json", pooling_dir / "config.json")
    expected = encoder.encode(list(CHECK_SENTENCES), convert_to_numpy=True)
    from llmos.formats.onnx_session import open_session

    session = open_session(out_dir / "model.onnx", threads=threads)
    encoded = encoder.tokenizer(list(CHECK_SENTENCES), padding=True, return_tensors="np")
    got = session.run(None, {n: encoded[n].astype(np.int64) for n in names})[0]
    cosine = np.sum(got * expected, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    if float(cosine.min()) < 0.999:
        raise InvalidModelFileError(f"the exported ONNX encoder differs from its source (cosine {cosine.min():.5f})")
