"""Int8 weights with dynamic int8 activations for the PyTorch backend (checkpoints from ``llmos quantize --type int8``).

Contract: the checkpoint format (which tensors are int8, the per-row scales, the config.json marker) is
:mod:`llmos.formats.int8`; this module runs it.

:func:`load_int8_model` builds the Hugging Face module tree on the meta device, swaps those modules for
:class:`Int8Linear` / :class:`Int8Embedding` and assigns the remaining float tensors, so float copies of the
quantized weights never exist at rest. :class:`Int8Linear` keeps the int8 weights twice (plain and packed for
fbgemm; together half of float32): decode-sized calls (at most :data:`DECODE_ROWS` tokens) run fbgemm's dynamic
quantized linear (``torch.ops.quantized.linear_dynamic``, the kernel behind ``torch.ao.quantization.quantize_dynamic``
without its deprecated module API) once per token, so activations are quantized per token; prompt-sized calls
multiply by the dequantized weights in float32 (weight-only int8: outlier tokens such as the first one would ruin a
shared activation range, and per-token kernel calls would be slow). Without the quantized ops every call takes the
float path. :func:`fuse_int8` concatenates projections that read the same input (q/k/v, gate/up) into one matrix,
as the backend does for float weights (per-row scales make the concatenation exact); :func:`pack_remaining` packs
the rest.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmos.errors import ModelLoadError
from llmos.formats.int8 import SCALE_SUFFIX

DECODE_ROWS = 8
"""Calls with at most this many rows (tokens) use the int8 kernel; larger ones compute on dequantized weights."""


def _pack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> Any:
    with warnings.catch_warnings():  # the quantized tensor API warns about its deprecation on every call
        warnings.simplefilter("ignore")
        zeros = torch.zeros(q.shape[0], dtype=torch.long)
        qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zeros, 0)
        return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.float())


class Int8Linear(torch.nn.Module):
    """``y = x W^T + b`` with int8 ``W`` (per-row scales).

    Calls of at most :data:`DECODE_ROWS` rows (decode steps) run fbgemm's int8 kernel one row at a time, so each
    token's activations are quantized with their own range (per-token dynamic quantization; a batch's results do not
    depend on its other rows). Larger calls (prompt prefill, scoring) multiply by the dequantized weights in float,
    where a per-tensor activation range would be ruined by outlier tokens and per-row kernel calls are too slow.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = int(q.shape[0]), int(q.shape[1])
        self.q, self.scale, self.bias = q, scale.float(), None if bias is None else bias.float()
        try:
            self._packed: Any = _pack(q, self.scale, self.bias)
        except (AttributeError, RuntimeError, NotImplementedError):  # pragma: no cover - torch without fbgemm ops
            self._packed = None

    @property
    def weight(self) -> torch.Tensor:
        """A shape-only stand-in (meta tensor): the weights are int8 (``q``) and packed for the kernel."""
        return torch.empty(self.out_features, self.in_features, dtype=torch.int8, device="meta")

    def dequantized(self) -> torch.Tensor:
        return self.q.to(torch.float32) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
        if self._packed is not None and flat.shape[0] <= DECODE_ROWS:
            rows = [torch.ops.quantized.linear_dynamic(flat[i : i + 1], self._packed, True) for i in range(len(flat))]
            out = torch.cat(rows) if len(rows) != 1 else rows[0]
        else:
            out = F.linear(flat, self.dequantized(), self.bias)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class Int8Embedding(torch.nn.Module):
    """Token embeddings stored as int8 rows with one scale per row (the tied LM head shares the same numbers)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.q, self.scale, self.dtype = q, scale.float(), dtype
        self.num_embeddings, self.embedding_dim = int(q.shape[0]), int(q.shape[1])

    @property
    def weight(self) -> torch.Tensor:
        return torch.empty(self.num_embeddings, self.embedding_dim, dtype=torch.int8, device="meta")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (F.embedding(ids, self.q).to(torch.float32) * self.scale[ids].unsqueeze(-1)).to(self.dtype)


class _Slice(torch.nn.Module):
    """One projection of a fused group: the group's output columns ``[begin, end)``."""

    def __init__(self, fused: Int8Linear, begin: int, end: int) -> None:
        super().__init__()
        self.fused, self.begin, self.end = fused, begin, end
        self.out_features, self.in_features = end - begin, fused.in_features

    @property
    def weight(self) -> torch.Tensor:
        return torch.empty(self.out_features, self.in_features, dtype=torch.int8, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fused(x)
        return out[..., self.begin : self.end]


class _PendingInt8(torch.nn.Module):
    """An int8 linear before the backend fuses it (kept unpacked so the fusion can concatenate rows)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.q, self.scale, self.bias = q, scale, bias
        self.out_features, self.in_features = int(q.shape[0]), int(q.shape[1])
        self._linear: Int8Linear | None = None

    @property
    def weight(self) -> torch.Tensor:
        return torch.empty(self.out_features, self.in_features, dtype=torch.int8, device="meta")

    def packed(self) -> Int8Linear:
        if self._linear is None:
            self._linear = Int8Linear(self.q, self.scale, self.bias)
            self.q = torch.empty(0, dtype=torch.int8)  # the packed copy is the one that is used from now on
        return self._linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.packed()(x)
        return out


def is_int8_module(module: Any) -> bool:
    return isinstance(module, Int8Linear | _PendingInt8 | _Slice)


def fuse_int8(owner: torch.nn.Module, names: Sequence[str]) -> Int8Linear:
    """One packed int8 matrix for the projections ``names`` of ``owner``; each becomes a slice of it."""
    modules = [getattr(owner, name) for name in names]
    if not all(isinstance(m, _PendingInt8) for m in modules):
        raise ModelLoadError("int8 projections of one group must all be unfused int8 modules")
    biases = [m.bias for m in modules]
    bias = torch.cat([b.float() for b in biases if b is not None]) if all(b is not None for b in biases) else None
    if bias is None and any(b is not None for b in biases):
        raise ModelLoadError("int8 fusion needs biases on all or none of the projections of a group")
    fused = Int8Linear(torch.cat([m.q for m in modules]), torch.cat([m.scale for m in modules]), bias)
    offset = 0
    for name, module in zip(names, modules, strict=True):
        setattr(owner, name, _Slice(fused, offset, offset + module.out_features))
        offset += module.out_features
    return fused


def pack_remaining(model: torch.nn.Module) -> None:
    """Pack every int8 projection that no fusion took (call after :func:`fuse_int8`)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, _PendingInt8):
            _set_module(model, name, module.packed())


def _set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def load_int8_model(model_dir: Path, dtype: torch.dtype) -> Any:
    """The Hugging Face causal LM of an int8 checkpoint, with int8 modules in place of the quantized ones."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config: Any = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"transformers could not read the int8 model's config: {exc}") from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # describes llmos's own format; transformers has no quantizer for it
    with torch.device("meta"):
        model: Any = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    quantized = sorted(k[: -len(f".weight{SCALE_SUFFIX}")] for k in tensors if k.endswith(f".weight{SCALE_SUFFIX}"))
    for name in quantized:
        q, scale = tensors.pop(f"{name}.weight"), tensors.pop(f"{name}.weight{SCALE_SUFFIX}")
        module = model.get_submodule(name)
        if isinstance(module, torch.nn.Embedding):
            _set_module(model, name, Int8Embedding(q, scale, dtype))
            if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in tensors:
                model.lm_head = Int8Linear(q, scale)
        elif isinstance(module, torch.nn.Linear):
            bias = tensors.pop(f"{name}.bias", None)
            _set_module(model, name, _PendingInt8(q, scale, bias))
        else:
            raise ModelLoadError(f"int8 weights for {name}, which is neither a linear layer nor an embedding")
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False, assign=True)
    inner = model.model
    inner.rotary_emb = type(inner.rotary_emb)(config=config)  # its buffers were computed on the meta device
    missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.device.type == "meta"]
    if missing:
        raise ModelLoadError(f"the int8 checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    return model.eval()
