"""PyTorch backend for Llama-family causal LMs (Hugging Face checkpoints), with continuous batching and multi-LoRA.

Contract: implements :class:`llmos.engine.backends.base.Backend`. The Hugging Face model supplies the weights and
its modules (projections, norms, rotary embedding); the forward pass is llmos's own, so that one call can mix
sequences of different lengths:

* every scheduled token of every sequence is packed into one ``[1, N, hidden]`` batch for the projections and MLPs
  (the expensive part), with its own position;
* each sequence slot has a preallocated KV cache ``[layers, slots, kv_heads, n_ctx_seq, head_dim]``; new keys and
  values are written at the sequence's positions. Prefill chunks attend per sequence over their own cache with a
  causal mask offset by the cached length; all single-token decodes of a step attend in one call that treats the
  slot dimension of the cache as the batch (a view, no copy), masking each slot beyond its own length;
* LoRA adapters (peft format) add ``scale * x A^T B^T`` to the adapted projections for exactly the tokens of the
  sequences that asked for that adapter, so requests for different adapters and for the base share a batch.

KV spans (the prefix cache's side of the backend, ``kv_shared_pool = False``): each slot's valid length is tracked.
An item appends at ``start_pos`` <= that length (a smaller ``start_pos`` truncates; a gap is an engine bug and raises
``ValueError``) and the slot then holds ``start_pos + len(tokens)`` positions; attention only ever reads a slot up to
the positions the step itself defines, so positions beyond are dead and are simply overwritten later (nothing is
zeroed). A multi-token item at ``start_pos > 0`` (a prefill chunk, or speculative verification with
``logits="all"``) attends with a causal mask offset by ``start_pos``; :meth:`TorchBackend.forget_sequence` with
``from_pos`` then drops rejected positions. Holders ``0..prefix_holders-1`` are copies of one span ``[start, end)``
of a slot's keys and values (one tensor ``[2, layers, kv_heads, end - start, head_dim]`` each, on the backend's
device), separate from the per-slot cache: :meth:`~TorchBackend.save_span` copies out, :meth:`~TorchBackend.load_span`
copies a sub-range back into a slot that holds exactly ``[0, start)``, :meth:`~TorchBackend.split_span` cuts one into
two exact-size copies (the original is freed, so memory equals the tokens held), :meth:`~TorchBackend.drop_span` frees.
``kv_pool_tokens`` is the budget, in tokens, that the engine's prefix cache may keep in holders (the backend does not
enforce it; :attr:`~TorchBackend.held_tokens` says what is kept). Span calls with a holder out of range, an empty or
occupied holder where the other is required, or positions outside what a slot or holder keeps are engine bugs and
raise ``ValueError``.

Only logits of requested rows are computed (final norm + LM head on those rows); they come back to the CPU as
float32 once per step, where sampling and log-probabilities work on them. Device and dtype follow
:mod:`llmos.engine.torch_device` (``device="auto"``: the first CUDA GPU when torch sees one, else the CPU; dtype
float32 on the CPU, bfloat16 or float16 on CUDA); weights, KV cache, holders and LoRA weights live on that device. A
checkpoint made by ``llmos quantize --type int8`` loads with int8 projections, LM head and embeddings
(:mod:`llmos.engine.backends.int8`, fbgemm kernels: always on the CPU, float32 unless a dtype is given). Supported:
architectures whose HF implementation follows the Llama module layout (llama, mistral, qwen2, smollm). Not
thread-safe (engine thread only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmos.engine.backends.base import BatchItem, TokenLogprob, check_unconstrained
from llmos.engine.backends.hf_vocab import piece_bytes
from llmos.engine.backends.torch_sampling import TorchSampler
from llmos.errors import BackendUnavailableError, InvalidInputError, ModelLoadError
from llmos.types import SamplingParams

SUPPORTED_TYPES = {"llama", "mistral", "qwen2", "smollm3"}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class _Span:
    """The keys and values of positions ``[start, start + kv.shape[3])`` of one slot: ``kv[0]`` keys, ``kv[1]``
    values, each ``[layers, kv_heads, positions, head_dim]``."""

    start: int
    kv: torch.Tensor

    @property
    def end(self) -> int:
        return self.start + int(self.kv.shape[3])


@dataclass
class LoraAdapter:
    """Per (layer, module): A [r, in], B [out, r]; ``scale = alpha / r``."""

    name: str
    scale: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


class TorchBackend:
    backend_name = "torch"
    kv_shared_pool = False
    """Running sequences have their own preallocated per-slot cache; holders are extra copies."""

    def __init__(
        self,
        model_dir: Path,
        *,
        n_seq_max: int = 4,
        n_ctx_seq: int = 2048,
        n_batch: int = 512,
        threads: int | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "auto",
        prefix_holders: int = 64,
        prefix_cache_tokens: int = 8192,
    ) -> None:
        if prefix_holders < 0 or prefix_cache_tokens < 0:
            raise ValueError("prefix_holders and prefix_cache_tokens must not be negative")
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:  # pragma: no cover - depends on installation
            raise BackendUnavailableError("the PyTorch backend needs `pip install 'llmos[torch]'`") from exc
        if threads:
            torch.set_num_threads(threads)
        from llmos.engine.backends.int8 import load_int8_model
        from llmos.engine.torch_device import resolve_device, resolve_dtype
        from llmos.formats.int8 import is_int8_dir

        int8 = is_int8_dir(model_dir)  # `llmos quantize --type int8`: int8 weights, dynamic int8 activations (CPU)
        self.device = torch.device("cpu") if int8 else resolve_device(device)
        dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype or "auto", self.device)
        assert isinstance(dtype, torch.dtype)
        try:
            tokenizer: Any = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            if int8:
                model: Any = load_int8_model(model_dir, dtype)
            else:
                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
                if self.device.type != "cpu":
                    model = model.to(self.device)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"transformers could not load the model: {exc}") from exc
        self.tokenizer = tokenizer
        self.model = model
        self.model.eval()
        config = self.model.config
        if config.model_type not in SUPPORTED_TYPES:
            raise BackendUnavailableError(
                f"the PyTorch backend supports {', '.join(sorted(SUPPORTED_TYPES))} models, not {config.model_type}"
            )
        self.dtype = dtype
        self.n_seq_max = n_seq_max
        self.n_ctx_seq = min(n_ctx_seq, int(getattr(config, "max_position_embeddings", n_ctx_seq)))
        self.n_batch = n_batch
        self.n_vocab = int(self.model.get_output_embeddings().weight.shape[0])
        self.layers = list(self.model.model.layers)
        heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        self.heads = heads
        shape = (len(self.layers), n_seq_max, self.kv_heads, self.n_ctx_seq, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.prefix_holders = prefix_holders
        self.kv_pool_tokens = prefix_cache_tokens
        self._spans: dict[int, _Span] = {}
        self._lengths = [0] * n_seq_max
        """Positions ``[0, length)`` of each slot hold valid keys and values."""
        self.adapters: dict[str, LoraAdapter] = {}
        self._seq_adapter: dict[int, str | None] = {}
        self._logits: torch.Tensor | None = None
        self._log_z: list[float] | None = None
        self._eos = self._end_tokens()
        self._pieces: dict[int, bytes] = {}
        decoder = type(getattr(self.tokenizer.backend_tokenizer, "decoder", None)).__name__
        self._byte_level = decoder == "ByteLevel"
        self._special = set(self.tokenizer.all_special_ids)
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self._apply_rope = apply_rotary_pos_emb
        self._fuse_projections()

    def _end_tokens(self) -> set[int]:
        ends: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ends.add(value)
            elif isinstance(value, list | tuple):
                ends.update(int(v) for v in value)
        return ends

    # --- vocabulary -------------------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInputError("the text is not valid Unicode (it contains a lone surrogate)") from exc
        encoded = self.tokenizer(text, add_special_tokens=add_special, split_special_tokens=not parse_special)
        return list(encoded["input_ids"])

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            text = "" if token in self._special else str(self.tokenizer.convert_ids_to_tokens(token) or "")
            piece = piece_bytes(text, self._byte_level) if text else b""
            self._pieces[token] = piece
        return piece

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        return token in self._eos

    # --- sampling ---------------------------------------------------------------------------------------------------

    def new_sampler(
        self, params: SamplingParams, grammar: str | None = None, grammar_trigger: str | None = None
    ) -> TorchSampler:
        check_unconstrained(params, grammar, self.n_vocab)
        return TorchSampler(params, self._row_logits, [])

    def _row_logits(self, row: int) -> torch.Tensor:
        assert self._logits is not None, "sample() before decode()"
        logits: torch.Tensor = self._logits[row]
        return logits

    def logprobs(self, output_row: int, token: int, top_n: int) -> tuple[float, list[TokenLogprob]]:
        # log Z of every output row at once, the first time a row is asked for after a decode: scoring a prompt
        # asks for every row, and one vectorized logsumexp beats a full-vocabulary log-softmax per row
        if self._log_z is None:
            assert self._logits is not None, "logprobs() before decode()"
            self._log_z = torch.logsumexp(self._logits, dim=-1).tolist()
        logits = self._row_logits(output_row)
        log_z = self._log_z[output_row]
        chosen = float(logits[token]) - log_z
        if top_n <= 0:
            return chosen, []
        values, ids = torch.topk(logits, min(top_n, self.n_vocab))
        return chosen, [TokenLogprob(int(t), float(v) - log_z) for t, v in zip(ids, values, strict=True)]

    # --- adapters ---------------------------------------------------------------------------------------------------

    def add_adapter(self, name: str, adapter_dir: Path) -> None:
        self.adapters[name] = load_peft_adapter(name, adapter_dir, len(self.layers), self.dtype, self.device)

    def bind_adapter(self, seq_id: int, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.adapters:
            raise InvalidInputError(f"adapter {adapter!r} is not loaded on this model")
        self._seq_adapter[seq_id] = adapter

    # --- compute ----------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, items: Sequence[BatchItem]) -> dict[int, list[int]]:
        total = sum(len(item.tokens) for item in items)
        if total == 0:
            return {}
        if total > self.n_batch:
            raise ValueError(f"batch of {total} tokens exceeds n_batch={self.n_batch}")
        device = self.device
        ids = torch.tensor([t for item in items for t in item.tokens], dtype=torch.long, device=device)
        positions = torch.tensor(
            [item.start_pos + i for item in items for i in range(len(item.tokens))], dtype=torch.long, device=device
        )
        spans: list[tuple[BatchItem, int, int]] = []
        offset = 0
        for item in items:
            self._check_slot(item.seq_id)
            if item.start_pos + len(item.tokens) > self.n_ctx_seq:
                raise ModelLoadError(f"sequence {item.seq_id} would exceed its {self.n_ctx_seq}-token KV cache")
            if not 0 <= item.start_pos <= self._lengths[item.seq_id]:
                raise ValueError(
                    f"sequence {item.seq_id} holds {self._lengths[item.seq_id]} positions: cannot append at"
                    f" {item.start_pos}"
                )
            spans.append((item, offset, offset + len(item.tokens)))
            offset += len(item.tokens)
        for item in items:  # from here on, positions >= start_pos are being overwritten
            self._lengths[item.seq_id] = item.start_pos + len(item.tokens)
        lora_rows = self._lora_rows(spans)
        single = [(item, begin) for item, begin, end in spans if end - begin == 1 and item.start_pos > 0]
        decodes = self._decode_plan(single) if len(single) > 1 else None
        batched = {id(item) for item, _ in single} if decodes is not None else set()
        prefills = [span for span in spans if id(span[0]) not in batched]

        inner = self.model.model
        hidden = inner.embed_tokens(ids)[None]
        cos, sin = inner.rotary_emb(hidden, positions[None])
        for layer_index, layer in enumerate(self.layers):
            residual = hidden
            x = layer.input_layernorm(hidden)
            attn = layer.self_attn
            q, k, v = self._fused(x, layer_index, 0, ("q_proj", "k_proj", "v_proj"), lora_rows)
            q = q.reshape(1, total, self.heads, self.head_dim).transpose(1, 2)
            k = k.reshape(1, total, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.reshape(1, total, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self._apply_rope(q, k, cos, sin)
            out = torch.empty(1, self.heads, total, self.head_dim, dtype=q.dtype, device=device)
            if decodes is not None:
                self._attend_decodes(layer_index, attn.scaling, q, k, v, out, decodes)
            for item, begin, end in prefills:
                slot, start, length = item.seq_id, item.start_pos, end - begin
                self.k_cache[layer_index, slot, :, start : start + length] = k[0, :, begin:end]
                self.v_cache[layer_index, slot, :, start : start + length] = v[0, :, begin:end]
                keys = self.k_cache[layer_index, slot, :, : start + length][None]
                values = self.v_cache[layer_index, slot, :, : start + length][None]
                mask = None
                causal = length > 1 and start == 0  # a fresh prompt: the causal kernel skips the masked half
                if length > 1 and start > 0:
                    mask = torch.ones(length, start + length, dtype=torch.bool, device=device).tril(diagonal=start)
                scale = attn.scaling
                out[:, :, begin:end] = F.scaled_dot_product_attention(
                    q[:, :, begin:end], keys, values, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
                )
            out_flat = out.transpose(1, 2).reshape(1, total, self.heads * self.head_dim)
            hidden = residual + self._proj(attn.o_proj, out_flat, layer_index, "o_proj", lora_rows)
            residual = hidden
            x = layer.post_attention_layernorm(hidden)
            mlp = layer.mlp
            gate, up = self._fused(x, layer_index, 1, ("gate_proj", "up_proj"), lora_rows)
            hidden = residual + self._proj(mlp.down_proj, mlp.act_fn(gate) * up, layer_index, "down_proj", lora_rows)

        rows: dict[int, list[int]] = {}
        wanted: list[int] = []
        for item, begin, end in spans:
            if item.logits == "all":
                picks = list(range(begin, end))
            elif item.logits == "last":
                picks = [end - 1]
            else:
                picks = []
            rows[item.seq_id] = list(range(len(wanted), len(wanted) + len(picks)))
            wanted.extend(picks)
        self._log_z = None
        if wanted:
            selected = inner.norm(hidden[0, wanted])
            self._logits = self.model.lm_head(selected).to(torch.float32).cpu()  # one copy per step off a GPU
        else:
            self._logits = None
        return {seq: r for seq, r in rows.items() if r}

    def _decode_plan(self, single: list[tuple[BatchItem, int]]) -> dict[str, Any]:
        """Index tensors for attending all one-token decodes of a step in one call over the slot dimension."""
        device = self.device
        slots = torch.tensor([item.seq_id for item, _ in single], dtype=torch.long, device=device)
        positions = torch.tensor([item.start_pos for item, _ in single], dtype=torch.long, device=device)
        rows = torch.tensor([begin for _, begin in single], dtype=torch.long, device=device)
        length = max(item.start_pos for item, _ in single) + 1
        lengths = torch.zeros(self.n_seq_max, dtype=torch.long, device=device)
        lengths[slots] = positions + 1
        mask = torch.arange(length, device=device)[None, :] < lengths[:, None]  # [slots, length]
        return {"slots": slots, "positions": positions, "rows": rows, "length": length, "mask": mask[:, None, None]}

    def _attend_decodes(
        self,
        layer: int,
        scale: float,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        plan: dict[str, Any],
    ) -> None:
        slots, positions, rows, length = plan["slots"], plan["positions"], plan["rows"], plan["length"]
        self.k_cache[layer, slots, :, positions] = k[0, :, rows].transpose(0, 1)
        self.v_cache[layer, slots, :, positions] = v[0, :, rows].transpose(0, 1)
        queries = torch.zeros(self.n_seq_max, self.heads, 1, self.head_dim, dtype=q.dtype, device=q.device)
        queries[slots] = q[0, :, rows].transpose(0, 1)[:, :, None]
        keys = self.k_cache[layer, :, :, :length]
        values = self.v_cache[layer, :, :, :length]
        attended = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=plan["mask"], scale=scale, enable_gqa=True
        )  # [slots, heads, 1, head_dim]
        out[0, :, rows] = attended[slots, :, 0].transpose(0, 1)

    def _lora_rows(self, spans: list[tuple[BatchItem, int, int]]) -> dict[str, torch.Tensor]:
        groups: dict[str, list[int]] = {}
        for item, begin, end in spans:
            adapter = self._seq_adapter.get(item.seq_id)
            if adapter is not None:
                groups.setdefault(adapter, []).extend(range(begin, end))
        return {name: torch.tensor(rows, dtype=torch.long, device=self.device) for name, rows in groups.items()}

    def _fuse_projections(self) -> None:
        """One weight matrix for q/k/v and one for gate/up per layer: two large GEMMs instead of five small ones.

        The modules' own weights become views into the fused matrices, so nothing is stored twice. Int8 models get
        one packed int8 matrix per group instead (the modules become slices of it).
        """
        from llmos.engine.backends.int8 import fuse_int8, is_int8_module, pack_remaining

        self._fused_weights: list[list[tuple[torch.Tensor | torch.nn.Module, torch.Tensor | None, list[int]]]] = []
        for layer in self.layers:
            groups: list[tuple[torch.Tensor | torch.nn.Module, torch.Tensor | None, list[int]]] = []
            for owner, names in (
                (layer.self_attn, ("q_proj", "k_proj", "v_proj")),
                (layer.mlp, ("gate_proj", "up_proj")),
            ):
                modules = [getattr(owner, n) for n in names]
                sizes = [int(m.weight.shape[0]) for m in modules]
                if is_int8_module(modules[0]):
                    groups.append((fuse_int8(owner, names), None, sizes))
                    continue
                weight = torch.cat([m.weight.detach() for m in modules])
                biases = [m.bias for m in modules]
                bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
                offset = 0
                for module, size in zip(modules, sizes, strict=True):
                    module.weight = torch.nn.Parameter(weight[offset : offset + size], requires_grad=False)
                    if bias is not None:
                        module.bias = torch.nn.Parameter(bias[offset : offset + size], requires_grad=False)
                    offset += size
                groups.append((weight, bias if any(b is not None for b in biases) else None, sizes))
            self._fused_weights.append(groups)
        pack_remaining(self.model)

    def _fused(
        self, x: torch.Tensor, layer: int, group: int, modules: tuple[str, ...], lora_rows: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        weight, bias, sizes = self._fused_weights[layer][group]
        fused = weight(x) if isinstance(weight, torch.nn.Module) else F.linear(x, weight, bias)
        parts: tuple[torch.Tensor, ...] = torch.split(fused, sizes, dim=-1)
        for module, part in zip(modules, parts, strict=True):
            self._add_lora(part, x, layer, module, lora_rows)
        return parts

    def _proj(
        self, linear: Any, x: torch.Tensor, layer: int, module: str, lora_rows: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        out: torch.Tensor = linear(x)
        self._add_lora(out, x, layer, module, lora_rows)
        return out

    def _add_lora(
        self, out: torch.Tensor, x: torch.Tensor, layer: int, module: str, lora_rows: dict[str, torch.Tensor]
    ) -> None:
        for name, rows in lora_rows.items():
            adapter = self.adapters[name]
            weights = adapter.weights.get((layer, module))
            if weights is None:
                continue
            a, b = weights
            delta = (x[0, rows] @ a.T) @ b.T
            out[0, rows] += adapter.scale * delta

    # --- KV spans ---------------------------------------------------------------------------------------------------

    @property
    def held_tokens(self) -> int:
        """Positions kept in holders, all together."""
        return sum(int(span.kv.shape[3]) for span in self._spans.values())

    def save_span(self, holder: int, seq_id: int, start: int, end: int) -> None:
        """Keep a copy of sequence ``seq_id``'s keys and values at positions ``[start, end)`` under ``holder``."""
        self._check_holder(holder, empty=True)
        self._check_slot(seq_id)
        if not 0 <= start < end <= self._lengths[seq_id]:
            raise ValueError(
                f"cannot save positions [{start}, {end}) of sequence {seq_id}, which holds {self._lengths[seq_id]}"
            )
        with torch.inference_mode():
            kv = torch.stack((self.k_cache[:, seq_id, :, start:end], self.v_cache[:, seq_id, :, start:end]))
        self._spans[holder] = _Span(start, kv)

    def load_span(self, holder: int, seq_id: int, start: int, end: int) -> None:
        """Copy the holder's positions ``[start, end)`` into slot ``seq_id``, which must hold exactly ``[0, start)``."""
        span = self._span(holder)
        self._check_slot(seq_id)
        if not span.start <= start < end <= span.end:
            raise ValueError(f"holder {holder} keeps [{span.start}, {span.end}), not [{start}, {end})")
        if self._lengths[seq_id] != start:
            raise ValueError(
                f"sequence {seq_id} holds {self._lengths[seq_id]} positions: cannot load a span that starts at {start}"
            )
        if end > self.n_ctx_seq:
            raise ValueError(f"positions up to {end} do not fit the {self.n_ctx_seq}-token KV cache of a slot")
        first, last = start - span.start, end - span.start
        with torch.inference_mode():
            self.k_cache[:, seq_id, :, start:end] = span.kv[0, :, :, first:last]
            self.v_cache[:, seq_id, :, start:end] = span.kv[1, :, :, first:last]
        self._lengths[seq_id] = end

    def split_span(self, holder: int, new_holder: int, at: int) -> None:
        """``holder`` keeps ``[start, at)``, the empty ``new_holder`` gets ``[at, end)`` (two exact-size copies; the
        original storage is freed, so the bytes kept stay those of the tokens kept)."""
        span = self._span(holder)
        self._check_holder(new_holder, empty=True)
        if not span.start < at < span.end:
            raise ValueError(f"holder {holder} keeps [{span.start}, {span.end}): cannot split it at {at}")
        cut = at - span.start
        with torch.inference_mode():
            head, tail = span.kv[:, :, :, :cut].clone(), span.kv[:, :, :, cut:].clone()
        self._spans[holder] = _Span(span.start, head)
        self._spans[new_holder] = _Span(at, tail)

    def drop_span(self, holder: int) -> None:
        """Free what ``holder`` keeps."""
        self._span(holder)
        del self._spans[holder]

    def drop_all_spans(self) -> None:
        self._spans.clear()

    def forget_sequence(self, seq_id: int, from_pos: int = 0) -> None:
        """Positions ``>= from_pos`` of slot ``seq_id`` are no longer valid (later decodes overwrite them); with
        ``from_pos == 0`` the sequence is gone and its adapter binding too."""
        self._check_slot(seq_id)
        if from_pos < 0:
            raise ValueError(f"cannot forget sequence {seq_id} from position {from_pos}")
        self._lengths[seq_id] = min(self._lengths[seq_id], from_pos)
        if from_pos == 0:
            self._seq_adapter.pop(seq_id, None)

    def _check_slot(self, seq_id: int) -> None:
        if not 0 <= seq_id < self.n_seq_max:
            raise ValueError(f"sequence id {seq_id} is outside the {self.n_seq_max} slots")

    def _check_holder(self, holder: int, *, empty: bool) -> None:
        if not 0 <= holder < self.prefix_holders:
            raise ValueError(f"holder {holder} is outside the {self.prefix_holders} holders")
        if empty and holder in self._spans:
            raise ValueError(f"holder {holder} is not empty")

    def _span(self, holder: int) -> _Span:
        self._check_holder(holder, empty=False)
        span = self._spans.get(holder)
        if span is None:
            raise ValueError(f"holder {holder} is empty")
        return span

    def close(self) -> None:
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self._spans.clear()
        self.model = None
        self._logits = None
        self._fused_weights = []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def load_peft_adapter(
    name: str, adapter_dir: Path, n_layers: int, dtype: torch.dtype, device: torch.device | None = None
) -> LoraAdapter:
    """Read a peft LoRA directory (adapter_config.json + adapter_model.safetensors) into per-module A/B tensors."""
    import json
    import re

    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    rank = int(config.get("r", 8))
    alpha = float(config.get("lora_alpha", rank))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pattern = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = pattern.search(key)
        if match is None:
            continue
        layer, module, which = int(match.group(1)), match.group(2), match.group(3)
        if module not in LORA_TARGETS or layer >= n_layers:
            raise InvalidInputError(f"adapter {name!r} targets {key}, which this base model does not have")
        parts.setdefault((layer, module), {})[which] = tensor.to(device=device, dtype=dtype)
    weights = {k: (v["A"], v["B"]) for k, v in parts.items() if "A" in v and "B" in v}
    if not weights:
        raise InvalidInputError(f"adapter {name!r} holds no LoRA weights llmos can apply")
    return LoraAdapter(name, scale, weights)
