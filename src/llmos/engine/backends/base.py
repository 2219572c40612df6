"""The interface between the engine and an inference backend.

Contract: a backend holds one model and KV memory for up to ``n_seq_max`` running sequences (slots
``0..n_seq_max-1``), each of at most ``n_ctx_seq`` tokens. With ``kv_shared_pool`` the sequences and the prefix
cache share one pool of ``kv_pool_tokens`` cells (the engine keeps the sum within it); without, each slot has its own
memory and the prefix cache's holders are extra copies of at most ``kv_pool_tokens`` tokens. Holders
``0..prefix_holders-1`` keep spans of positions of cached token paths (:meth:`Backend.save_span` and friends); 0
holders turns the prefix cache off. The engine calls a backend from one thread only. :meth:`Backend.decode` appends
tokens to any mix of sequences in one forward pass and returns, per sequence, the output rows whose logits it
asked for; samplers and :meth:`Backend.logprobs` read those rows until the next ``decode``. Backends raise
:mod:`llmos.errors` exceptions, never backend-specific ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from llmos.errors import InvalidInputError
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

    def new_sampler(
        self, params: SamplingParams, grammar: str | None = None, grammar_trigger: str | None = None
    ) -> SequenceSampler:
        """A sampler for one sequence; with ``grammar`` (GBNF) its output follows it, from the first token or, with
        ``grammar_trigger``, from where the output first contains that text (lazy)."""
        ...

    def decode(self, items: Sequence[BatchItem]) -> dict[int, list[int]]: ...

    def logprobs(self, output_row: int, token: int, top_n: int) -> tuple[float, list[TokenLogprob]]:
        """Log-probability of ``token`` and the ``top_n`` most likely tokens at ``output_row`` (raw distribution)."""
        ...

    def bind_adapter(self, seq_id: int, adapter: str | None) -> None:
        """Apply LoRA ``adapter`` (None: the plain base) to the tokens of sequence ``seq_id`` until it is forgotten."""
        ...

    def forget_sequence(self, seq_id: int, from_pos: int = 0) -> None:
        """Drop sequence ``seq_id``'s KV at positions ``>= from_pos`` (all of it, and its adapter, by default)."""
        ...

    # --- prefix cache: spans of positions [start, end) of a cached token path, kept under a holder -----------------

    prefix_holders: int
    kv_shared_pool: bool
    kv_pool_tokens: int

    def save_span(self, holder: int, seq_id: int, start: int, end: int) -> None:
        """Keep the KV of sequence ``seq_id``'s positions ``[start, end)`` under ``holder`` (an empty one)."""
        ...

    def load_span(self, holder: int, seq_id: int, start: int, end: int) -> None:
        """Give ``seq_id`` (which holds exactly positions ``[0, start)``) the holder's KV of ``[start, end)``."""
        ...

    def split_span(self, holder: int, new_holder: int, at: int) -> None:
        """``holder`` keeps ``[start, at)``; ``new_holder`` (empty) gets ``[at, end)``."""
        ...

    def drop_span(self, holder: int) -> None: ...

    def drop_all_spans(self) -> None:
        """Empty every holder (a new prefix cache starts from nothing)."""
        ...

    def close(self) -> None: ...


def check_unconstrained(params: SamplingParams, grammar: str | None, n_vocab: int) -> None:
    """For backends without grammar support (torch, onnx): refuse constrained output and out-of-vocabulary biases."""
    if grammar is not None:
        raise InvalidInputError(
            "constrained output (response_format json_object / json_schema, tool_choice) needs the llama.cpp"
            " backend (GGUF models)",
            param="response_format",
        )
    for token, _bias in params.logit_bias:
        if not 0 <= token < n_vocab:
            raise InvalidInputError(f"logit_bias token id {token} is outside the vocabulary", param="logit_bias")
