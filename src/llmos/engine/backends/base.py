"""The interface between the engine and an inference backend.

Contract: a backend holds one model and a KV cache for up to ``n_seq_max`` sequences (slots ``0..n_seq_max-1``),
each with room for ``n_ctx_seq`` tokens. The engine calls it from one thread only. :meth:`Backend.decode` appends
tokens to any mix of sequences in one forward pass and returns, per sequence, the output rows whose logits it
asked for; samplers and :meth:`Backend.logprobs` read those rows until the next ``decode``. Backends raise
:mod:`llmos.errors` exceptions, never backend-specific ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from llmos.types import SamplingParams


@dataclass(frozen=True)
class BatchItem:
    """Tokens of one sequence to append at ``start_pos``.

    ``logits``: ``"last"`` for the last token only (normal prefill and decode), ``"all"`` for every token (prompt
    scoring), ``"none"`` for a prefill chunk that is not the last.
    """

    seq_id: int
    tokens: Sequence[int]
    start_pos: int
    logits: str = "last"


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float


class SequenceSampler(Protocol):
    def sample(self, output_row: int) -> int:
        """Choose the next token from the logits at ``output_row`` of the last decode, and remember it."""
        ...

    def close(self) -> None: ...


class Backend(Protocol):
    backend_name: str
    n_seq_max: int
    n_ctx_seq: int
    n_batch: int
    n_vocab: int

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]: ...

    def token_bytes(self, token: int) -> bytes: ...

    def detokenize(self, tokens: Sequence[int]) -> str: ...

    def is_end_of_generation(self, token: int) -> bool: ...

    def new_sampler(self, params: SamplingParams, grammar: str | None = None) -> SequenceSampler: ...

    def decode(self, items: Sequence[BatchItem]) -> dict[int, list[int]]: ...

    def logprobs(self, output_row: int, token: int, top_n: int) -> tuple[float, list[TokenLogprob]]:
        """Log-probability of ``token`` and the ``top_n`` most likely tokens at ``output_row`` (raw distribution)."""
        ...

    def bind_adapter(self, seq_id: int, adapter: str | None) -> None:
        """Apply LoRA ``adapter`` (None: the plain base) to the tokens of sequence ``seq_id`` until it is forgotten."""
        ...

    def forget_sequence(self, seq_id: int) -> None: ...

    def close(self) -> None: ...
