"""ONNX Runtime backend for decoder graphs with a KV cache (``llmos convert --to onnx``, or optimum's layout).

Contract: implements :class:`llmos.engine.backends.base.Backend` over a graph with inputs ``input_ids``,
``attention_mask``, ``position_ids`` and ``past_key_values.N.key/value`` and outputs ``logits`` and
``present.N.key/value`` (:mod:`llmos.formats.onnx_export`). Several sequences run in one ``session.run``:

* the KV memory lives in **groups**: one group is the ``present`` arrays of the last run that involved its sequences,
  ``[rows, kv_heads, cells, head_dim]`` per layer, with the position each cell holds (-1: an empty or padded cell,
  masked out). A sequence belongs to exactly one group;
* each :meth:`OnnxBackend.decode` runs the single-token items (decodes) together as one batch, and the multi-token
  items (prefill chunks, scored prompts) in runs of similar length (padding at most :data:`PREFILL_PADDING` of their
  tokens), so a long prompt never pads the decodes of other sequences;
* a run over exactly the sequences of an existing group feeds that group's arrays back as they are (the steady state
  of continuous batching costs no copying outside the graph); a run over another set of sequences first builds a new
  group from their cells (each row compacted to its valid cells, padded to the longest), so copies happen only when
  the set of running sequences changes.

Positions are fed explicitly, so a padded or compacted cell layout changes no position and masked cells get zero
weight. Plain numpy sampling (:mod:`~llmos.engine.backends.numpy_sampling`); no prefix cache (``prefix_holders = 0``),
no LoRA adapters and no grammar-constrained output (each refused with a clear error). Not thread-safe (engine thread
only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmos.engine.backends.base import BatchItem, TokenLogprob, check_unconstrained
from llmos.engine.backends.hf_vocab import HfVocabulary, read_json_object
from llmos.engine.backends.numpy_sampling import NumpySampler
from llmos.errors import InvalidInputError, ModelLoadError
from llmos.formats.onnx_session import graph_file, open_session
from llmos.types import SamplingParams

COMPACT_MIN_CELLS = 64
"""Groups at least this wide are compacted when more than half their cells are empty in every row. (Rows of different
lengths pad each other; that padding is not compacted, since a rebuild would pad them the same way.)"""


@dataclass
class _Group:
    """The KV of some sequences, as the graph returned it: ``kv[2i]`` keys and ``kv[2i+1]`` values of layer ``i``."""

    order: list[int | None]
    kv: list[np.ndarray]
    positions: np.ndarray
    """``[rows, cells]``: the position each cell holds, -1 where it holds nothing."""
    rows: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rows = {seq: row for row, seq in enumerate(self.order) if seq is not None}


PREFILL_PADDING = 1.25
"""Multi-token items share a run while its padded cells stay within this factor of their real tokens."""


def _prefill_runs(items: list[BatchItem]) -> list[list[BatchItem]]:
    """Multi-token items grouped by length, so prompts of similar length prefill in one run with little padding."""
    runs: list[list[BatchItem]] = []
    for item in sorted(items, key=lambda i: len(i.tokens)):
        run = runs[-1] if runs else None
        if run is not None:
            tokens = sum(len(i.tokens) for i in run) + len(item.tokens)
            if len(item.tokens) * (len(run) + 1) <= PREFILL_PADDING * tokens:
                run.append(item)
                continue
        runs.append([item])
    return runs


class OnnxBackend:
    backend_name = "onnx"
    kv_shared_pool = False
    prefix_holders = 0

    def __init__(
        self,
        model_dir: Path,
        *,
        n_seq_max: int = 4,
        n_ctx_seq: int = 2048,
        n_batch: int = 512,
        threads: int | None = None,
    ) -> None:
        self.session = open_session(graph_file(model_dir), threads=threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self._past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        if not self._past_names or not {"input_ids", "attention_mask", "position_ids"} <= set(inputs):
            raise ModelLoadError("the ONNX backend needs a decoder graph with a KV cache (past_key_values inputs)")
        shape = inputs[self._past_names[0]].shape
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self._output_names = ["logits"] + [name.replace("past_key_values.", "present.") for name in self._past_names]
        self.vocab = HfVocabulary(model_dir)
        config = read_json_object(model_dir / "config.json")
        logits_shape = self.session.get_outputs()[0].shape
        self.n_vocab = int(logits_shape[2]) if isinstance(logits_shape[2], int) else int(config["vocab_size"])
        self.n_seq_max = n_seq_max
        self.n_ctx_seq = min(n_ctx_seq, int(config.get("max_position_embeddings") or n_ctx_seq))
        self.n_batch = n_batch
        self.kv_pool_tokens = self.n_ctx_seq
        """Nominal (no prefix cache here): the engine caps a sequence's context at min(n_ctx_seq, this)."""
        self._groups: list[_Group] = []
        self._group_of: dict[int, _Group] = {}
        self._logits: np.ndarray | None = None
        self._log_z: np.ndarray | None = None

    # --- vocabulary -------------------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.vocab.tokenize(text, add_special=add_special, parse_special=parse_special)

    def token_bytes(self, token: int) -> bytes:
        return self.vocab.token_bytes(token)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.vocab.detokenize(tokens)

    def is_end_of_generation(self, token: int) -> bool:
        return token in self.vocab.eos

    # --- sampling ---------------------------------------------------------------------------------------------------

    def new_sampler(
        self, params: SamplingParams, grammar: str | None = None, grammar_trigger: str | None = None
    ) -> NumpySampler:
        check_unconstrained(params, grammar, self.n_vocab)
        return NumpySampler(params, self._row_logits, [])

    def _row_logits(self, row: int) -> np.ndarray:
        assert self._logits is not None, "sample() before decode()"
        logits: np.ndarray = self._logits[row]
        return logits

    def logprobs(self, output_row: int, token: int, top_n: int) -> tuple[float, list[TokenLogprob]]:
        assert self._logits is not None, "logprobs() before decode()"
        if self._log_z is None:  # every row at once: scoring a prompt asks for each of its rows
            peak = self._logits.max(axis=1, keepdims=True)
            self._log_z = (np.log(np.exp(self._logits - peak).sum(axis=1, keepdims=True)) + peak)[:, 0]
        logits = self._logits[output_row]
        log_z = float(self._log_z[output_row])
        chosen = float(logits[token]) - log_z
        if top_n <= 0:
            return chosen, []
        top = np.argsort(-logits, kind="stable")[: min(top_n, self.n_vocab)]
        return chosen, [TokenLogprob(int(t), float(logits[t]) - log_z) for t in top]

    def bind_adapter(self, seq_id: int, adapter: str | None) -> None:
        if adapter is not None:
            raise InvalidInputError("LoRA adapters run on the torch backend, not on ONNX Runtime")

    # --- compute ----------------------------------------------------------------------------------------------------

    def decode(self, items: Sequence[BatchItem]) -> dict[int, list[int]]:
        if not items:
            return {}
        singles = [item for item in items if len(item.tokens) == 1]
        runs = ([singles] if singles else []) + _prefill_runs([item for item in items if len(item.tokens) > 1])
        rows: dict[int, list[int]] = {}
        pieces: list[np.ndarray] = []
        count = 0
        for run in runs:
            picked, wanted = self._run(run)
            for item, picks in zip(run, wanted, strict=True):
                rows[item.seq_id] = list(range(count, count + picks))
                count += picks
            pieces.append(picked)
        self._logits = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
        self._log_z = None
        return rows

    def _run(self, run: list[BatchItem]) -> tuple[np.ndarray, list[int]]:
        """One ``session.run`` over ``run``'s sequences: the logits rows its items asked for, in item order, and how
        many each item got."""
        for item in run:
            if not 0 <= item.seq_id < self.n_seq_max:
                raise ValueError(f"sequence {item.seq_id} is outside 0..{self.n_seq_max - 1}")
            held = self._held(item.seq_id)
            if item.start_pos > held:
                raise ValueError(f"sequence {item.seq_id} holds {held} positions; cannot append at {item.start_pos}")
            if item.start_pos < held:
                self.forget_sequence(item.seq_id, item.start_pos)
            if item.start_pos + len(item.tokens) > self.n_ctx_seq:
                raise ValueError(f"sequence {item.seq_id} would exceed its {self.n_ctx_seq}-token context")
        group = self._group_for([item.seq_id for item in run])
        by_row = sorted(run, key=lambda item: group.rows[item.seq_id])
        rows, width = len(group.order), max(len(item.tokens) for item in run)
        input_ids = np.zeros((rows, width), np.int64)
        position_ids = np.zeros((rows, width), np.int64)
        fresh = np.zeros((rows, width), bool)
        for item in by_row:
            row, n = group.rows[item.seq_id], len(item.tokens)
            input_ids[row, :n] = item.tokens
            position_ids[row, :n] = np.arange(item.start_pos, item.start_pos + n)
            fresh[row, :n] = True
        feeds: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": np.concatenate([group.positions >= 0, fresh], axis=1).astype(np.int64),
            "position_ids": position_ids,
            **dict(zip(self._past_names, group.kv, strict=True)),
        }
        outputs = self.session.run(self._output_names, feeds)
        picks_row, picks_col, counts = [], [], []
        for item in run:
            n, row = len(item.tokens), group.rows[item.seq_id]
            cols = [n - 1] if item.logits == "last" else list(range(n)) if item.logits == "all" else []
            picks_row += [row] * len(cols)
            picks_col += cols
            counts.append(len(cols))
        picked = outputs[0][picks_row, picks_col]
        group.kv = list(outputs[1:])
        group.positions = np.concatenate([group.positions, np.where(fresh, position_ids, -1)], axis=1)
        empty = ~(group.positions >= 0).any(axis=0)  # cells no row holds (after truncation): compaction frees them
        if group.positions.shape[1] >= COMPACT_MIN_CELLS and empty.mean() > 0.5:
            self._replace(group, self._build([s for s in group.order if s is not None]))
        return picked, counts

    def _held(self, seq_id: int) -> int:
        group = self._group_of.get(seq_id)
        if group is None:
            return 0
        return int((group.positions[group.rows[seq_id]] >= 0).sum())

    def _group_for(self, seqs: list[int]) -> _Group:
        """The group holding exactly ``seqs`` (no copy), or a new one built from their cells."""
        wanted = set(seqs)
        for group in self._groups:
            if set(group.rows) == wanted and len(group.rows) == len(group.order):
                return group
        group = self._build(seqs)
        for seq in seqs:
            old = self._group_of.get(seq)
            if old is not None:
                self._release(old, seq)
        self._groups.append(group)
        for seq in seqs:
            self._group_of[seq] = group
        return group

    def _build(self, seqs: list[int]) -> _Group:
        """A new group of ``seqs``: each row's valid cells in position order, padded to the longest row."""
        cells: list[tuple[_Group | None, int, np.ndarray]] = []
        for seq in seqs:
            old = self._group_of.get(seq)
            if old is None:
                cells.append((None, 0, np.zeros(0, np.int64)))
                continue
            row = old.rows[seq]
            keep = np.flatnonzero(old.positions[row] >= 0)
            keep = keep[np.argsort(old.positions[row, keep], kind="stable")]
            cells.append((old, row, keep))
        width = max(len(keep) for _, _, keep in cells)
        layers = len(self._past_names)
        kv = [np.zeros((len(seqs), self.kv_heads, width, self.head_dim), np.float32) for _ in range(layers)]
        positions = np.full((len(seqs), width), -1, np.int64)
        for index, (old, row, keep) in enumerate(cells):
            if old is None or not len(keep):
                continue
            positions[index, : len(keep)] = old.positions[row, keep]
            for layer in range(layers):
                kv[layer][index, :, : len(keep)] = old.kv[layer][row][:, keep]
        return _Group(list(seqs), kv, positions)

    def _replace(self, old: _Group, new: _Group) -> None:
        self._groups[self._groups.index(old)] = new
        for seq in new.rows:
            self._group_of[seq] = new
        old.kv, old.order, old.rows = [], [], {}

    def _release(self, group: _Group, seq: int) -> None:
        """Take ``seq`` out of ``group`` (its row becomes dead; an empty group is dropped)."""
        row = group.rows.pop(seq)
        group.order[row] = None
        group.positions[row] = -1
        if not group.rows and group in self._groups:
            self._groups.remove(group)
        if self._group_of.get(seq) is group:
            del self._group_of[seq]

    def forget_sequence(self, seq_id: int, from_pos: int = 0) -> None:
        group = self._group_of.get(seq_id)
        if group is None:
            return
        if from_pos <= 0:
            self._release(group, seq_id)
            return
        row = group.rows[seq_id]
        group.positions[row][group.positions[row] >= from_pos] = -1

    # --- prefix cache: none on this backend (prefix_holders = 0) ----------------------------------------------------

    def save_span(self, holder: int, seq_id: int, start: int, end: int) -> None:
        raise ValueError("the ONNX backend keeps no prefix cache")

    def load_span(self, holder: int, seq_id: int, start: int, end: int) -> None:
        raise ValueError("the ONNX backend keeps no prefix cache")

    def split_span(self, holder: int, new_holder: int, at: int) -> None:
        raise ValueError("the ONNX backend keeps no prefix cache")

    def drop_span(self, holder: int) -> None:
        raise ValueError("the ONNX backend keeps no prefix cache")

    def drop_all_spans(self) -> None:
        return None

    def close(self) -> None:
        self._groups.clear()
        self._group_of.clear()
        self._logits = None
        self.session = None
