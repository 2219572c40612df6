"""A deterministic in-memory backend for testing the engine, the server and the SDK without a model.

Contract: token ``i`` is the byte ``i`` (vocabulary of 256; token 0 ends generation). Given the tokens of a sequence
so far, the next token is ``script(tokens)``; the default script counts upward through printable ASCII from the
last token. :meth:`FakeBackend.decode` checks what a real KV cache would require (positions contiguous per
sequence, slots in range, batch within ``n_batch``, cells in use within ``kv_pool_tokens``) and raises
``AssertionError`` when the engine breaks a rule, so engine tests catch bookkeeping bugs. Its KV "cells" are
objects shared between sequences and prefix-cache holders exactly as llama.cpp's unified cache shares them, and a
cell remembers the token it was computed from, so a sequence that was given a wrong cached prefix (or another
adapter's) predicts from the wrong tokens and the test sees it. ``step_delay`` makes each decode take time.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence

from llmos.engine.backends.base import BatchItem, TokenLogprob
from llmos.types import SamplingParams

EOS = 0


def count_up(tokens: Sequence[int]) -> int:
    last = tokens[-1] if tokens else 32
    return 33 + (last - 32) % 94 if last >= 32 else 65


class Cell:
    """One KV cell: the token it was computed from, under which adapter."""

    __slots__ = ("adapter", "token")

    def __init__(self, token: int, adapter: str | None) -> None:
        self.token = token
        self.adapter = adapter


class FakeSampler:
    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend

    def sample(self, output_row: int) -> int:
        return self.backend.predict(output_row)

    def close(self) -> None:
        self.backend.closed_samplers += 1


class FakeBackend:
    backend_name = "fake"
    n_vocab = 256

    def __init__(
        self,
        *,
        n_seq_max: int = 4,
        n_ctx_seq: int = 256,
        n_batch: int = 64,
        step_delay: float = 0.0,
        script: Callable[[Sequence[int]], int] = count_up,
        kv_pool_tokens: int | None = None,
        prefix_holders: int = 16,
    ) -> None:
        self.n_seq_max = n_seq_max
        self.n_ctx_seq = n_ctx_seq
        self.kv_pool_tokens = kv_pool_tokens if kv_pool_tokens is not None else n_seq_max * n_ctx_seq
        self.prefix_holders = prefix_holders
        self.kv_shared_pool = True
        self.holders: dict[int, tuple[int, list[Cell]]] = {}
        """holder -> (start position, cells)."""
        self.cells: dict[int, list[Cell]] = {}
        """Running sequence -> its cells, position by position."""
        self.peak_cells = 0
        self.n_batch = n_batch
        self.step_delay = step_delay
        self.script = script
        self.row_owner: list[tuple[int, int]] = []
        """Per output row of the last decode: (seq_id, tokens of that sequence up to and including the row)."""
        self.batches: list[list[tuple[int, int]]] = []
        """Per decode call: (seq_id, number of tokens) for each item."""
        self.closed_samplers = 0
        self.adapters: dict[int, str | None] = {}
        self.fail_next_decode: Exception | None = None
        self.closed = False
        self._thread: int | None = None

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def token_bytes(self, token: int) -> bytes:
        return b"" if token == EOS else bytes([token])

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        return token == EOS

    def new_sampler(
        self, params: SamplingParams, grammar: str | None = None, grammar_trigger: str | None = None
    ) -> FakeSampler:
        return FakeSampler(self)

    def decode(self, items: Sequence[BatchItem]) -> dict[int, list[int]]:
        thread = threading.get_ident()
        assert self._thread in (None, thread), "decode called from two threads"
        self._thread = thread
        assert sum(len(i.tokens) for i in items) <= self.n_batch, "batch larger than n_batch"
        assert len({i.seq_id for i in items}) == len(items), "a sequence appears twice in one batch"
        if self.fail_next_decode is not None:
            error, self.fail_next_decode = self.fail_next_decode, None
            raise error
        if self.step_delay:
            time.sleep(self.step_delay)
        self.row_owner = []
        rows: dict[int, list[int]] = {}
        self.batches.append([(i.seq_id, len(i.tokens)) for i in items])
        for item in items:
            assert 0 <= item.seq_id < self.n_seq_max, f"slot {item.seq_id} out of range"
            cache = self.cells.setdefault(item.seq_id, [])
            assert item.start_pos == len(cache), f"slot {item.seq_id}: position {item.start_pos} != {len(cache)}"
            assert len(cache) + len(item.tokens) <= self.n_ctx_seq, "KV stream overflow"
            adapter = self.adapters.get(item.seq_id)
            for offset, token in enumerate(item.tokens):
                cache.append(Cell(token, adapter))
                if item.logits == "all" or (item.logits == "last" and offset == len(item.tokens) - 1):
                    rows.setdefault(item.seq_id, []).append(len(self.row_owner))
                    self.row_owner.append((item.seq_id, len(cache)))
        used = self.used_cells()
        self.peak_cells = max(self.peak_cells, used)
        assert used <= self.kv_pool_tokens, f"KV pool overflow: {used} cells > {self.kv_pool_tokens}"
        return rows

    @property
    def kv(self) -> dict[int, list[int]]:
        """Each running sequence's tokens, as its cells hold them."""
        return {seq: [cell.token for cell in cells] for seq, cells in self.cells.items()}

    def used_cells(self) -> int:
        ids = {id(cell) for cells in self.cells.values() for cell in cells}
        ids.update(id(cell) for _start, cells in self.holders.values() for cell in cells)
        return len(ids)

    def predict(self, output_row: int) -> int:
        seq_id, length = self.row_owner[output_row]
        cells = self.cells[seq_id][:length]
        adapter = self.adapters.get(seq_id)
        assert all(cell.adapter == adapter for cell in cells), "a sequence attends to another adapter's KV"
        return self.script([cell.token for cell in cells])

    def logprobs(self, output_row: int, token: int, top_n: int) -> tuple[float, list[TokenLogprob]]:
        predicted = self.predict(output_row)
        value = 0.0 if token == predicted else -math.inf
        top = [TokenLogprob(predicted, 0.0)][:top_n]
        return value, top

    def bind_adapter(self, seq_id: int, adapter: str | None) -> None:
        self.adapters[seq_id] = adapter

    def forget_sequence(self, seq_id: int, from_pos: int = 0) -> None:
        if from_pos == 0:
            self.cells.pop(seq_id, None)
            self.adapters.pop(seq_id, None)
        elif seq_id in self.cells:
            del self.cells[seq_id][from_pos:]

    def save_span(self, holder: int, seq_id: int, start: int, end: int) -> None:
        assert 0 <= holder < self.prefix_holders and holder not in self.holders, f"holder {holder} busy or invalid"
        cells = self.cells[seq_id]
        assert 0 <= start < end <= len(cells), f"span [{start}, {end}) outside sequence {seq_id}"
        self.holders[holder] = (start, cells[start:end])

    def load_span(self, holder: int, seq_id: int, start: int, end: int) -> None:
        first, cells = self.holders[holder]
        mine = self.cells.setdefault(seq_id, [])
        assert len(mine) == start, f"sequence {seq_id} holds {len(mine)} positions, not {start}"
        assert first <= start < end <= first + len(cells), "load outside the holder's span"
        mine.extend(cells[start - first : end - first])

    def split_span(self, holder: int, new_holder: int, at: int) -> None:
        assert new_holder not in self.holders
        start, cells = self.holders[holder]
        assert start < at < start + len(cells)
        self.holders[holder] = (start, cells[: at - start])
        self.holders[new_holder] = (at, cells[at - start :])

    def drop_span(self, holder: int) -> None:
        del self.holders[holder]

    def drop_all_spans(self) -> None:
        self.holders.clear()

    def close(self) -> None:
        self.closed = True
