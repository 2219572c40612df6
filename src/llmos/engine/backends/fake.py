"""A deterministic in-memory backend for testing the engine, the server and the SDK without a model.

Contract: token ``i`` is the byte ``i`` (vocabulary of 256; token 0 ends generation). Given the tokens of a sequence
so far, the next token is ``script(tokens)``; the default script counts upward through printable ASCII from the
last token. :meth:`FakeBackend.decode` checks what a real KV cache would require (positions contiguous per
sequence, slots in range, batch within ``n_batch``) and raises ``AssertionError`` when the engine breaks a rule, so
engine tests catch bookkeeping bugs. ``step_delay`` makes each decode take time, for concurrency tests.
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
    ) -> None:
        self.n_seq_max = n_seq_max
        self.n_ctx_seq = n_ctx_seq
        self.n_batch = n_batch
        self.step_delay = step_delay
        self.script = script
        self.kv: dict[int, list[int]] = {}
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

    def new_sampler(self, params: SamplingParams, grammar: str | None = None) -> FakeSampler:
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
            cache = self.kv.setdefault(item.seq_id, [])
            assert item.start_pos == len(cache), f"slot {item.seq_id}: position {item.start_pos} != {len(cache)}"
            assert len(cache) + len(item.tokens) <= self.n_ctx_seq, "KV stream overflow"
            for offset, token in enumerate(item.tokens):
                cache.append(token)
                if item.logits == "all" or (item.logits == "last" and offset == len(item.tokens) - 1):
                    rows.setdefault(item.seq_id, []).append(len(self.row_owner))
                    self.row_owner.append((item.seq_id, len(cache)))
        return rows

    def predict(self, output_row: int) -> int:
        seq_id, length = self.row_owner[output_row]
        return self.script(self.kv[seq_id][:length])

    def logprobs(self, output_row: int, token: int, top_n: int) -> tuple[float, list[TokenLogprob]]:
        predicted = self.predict(output_row)
        value = 0.0 if token == predicted else -math.inf
        top = [TokenLogprob(predicted, 0.0)][:top_n]
        return value, top

    def bind_adapter(self, seq_id: int, adapter: str | None) -> None:
        self.adapters[seq_id] = adapter

    def forget_sequence(self, seq_id: int) -> None:
        self.kv.pop(seq_id, None)

    def close(self) -> None:
        self.closed = True
