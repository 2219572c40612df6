"""One request's progress through the engine, and the tokens of one sequence scheduled for one step.

Contract: plain data. The scheduler owns the bookkeeping fields of a :class:`Sequence` (slot, positions, pending
and generated tokens, its prefix-cache lease, its drafter) and changes them in :meth:`Scheduler.schedule` and
:meth:`Scheduler.update` only; the engine core owns :attr:`Sequence.generation` (sampler, detokenizer, stop strings,
length limit), created when the first token is sampled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmos.engine.kv_cache import CacheLease
from llmos.engine.request import GenerationRequest
from llmos.engine.speculative import DraftLength, NgramDrafter

if TYPE_CHECKING:
    from llmos.engine.backends.base import SequenceSampler
    from llmos.engine.text import IncrementalDecoder, StopMatcher


@dataclass
class GenerationState:
    """What turns a sequence's sampled tokens into text and decides when it ends (engine core)."""

    sampler: SequenceSampler
    decoder: IncrementalDecoder
    stops: StopMatcher
    limit: int
    """Most tokens to generate: ``max_tokens`` capped by the room left in the context."""


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    order: int = 0
    slot: int | None = None
    prompt_done: int = 0
    """Tokens of :attr:`prefill_tokens` already in the KV cache (computed or loaded from the prefix cache)."""
    pending: int | None = None
    """The last sampled token, fed to the model in the next step."""
    position: int = 0
    """KV position of the next token fed (= tokens in this sequence's KV)."""
    generated: list[int] = field(default_factory=list)
    last_decode_step: int = 0
    """The scheduler step that last fed this sequence's pending token (round robin when decodes are split)."""
    replay: list[int] | None = None
    """After a preemption: the tokens to recompute into the KV cache (prompt + generated but the pending one)."""
    aborted: bool = False
    finished: bool = False
    lease: CacheLease | None = None
    """Its share of the prefix cache while it runs (None: it does not use the cache)."""
    cached_tokens: int = 0
    """Prompt tokens loaded from the prefix cache at its (first) admission."""
    admitted_at: float | None = None
    drafter: NgramDrafter | None = None
    draft_length: DraftLength | None = None
    generation: GenerationState | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_tokens)

    @property
    def prefill_tokens(self) -> list[int]:
        return self.replay if self.replay is not None else self.request.prompt_tokens

    @property
    def prefilling(self) -> bool:
        return self.prompt_done < len(self.prefill_tokens)

    @property
    def fairness_key(self) -> str | None:
        return self.request.fairness_key

    def fed_tokens(self) -> list[int]:
        """The tokens whose KV this sequence holds, in order."""
        if self.prefilling:
            return self.prefill_tokens[: self.prompt_done]
        fed = self.generated[:-1] if self.pending is not None else self.generated
        return (self.request.prompt_tokens + fed)[: self.position]


@dataclass
class Chunk:
    """Tokens of one sequence scheduled for this step."""

    seq: Sequence
    tokens: list[int]
    start_pos: int
    logits: str
    """"last", "all" or "none" (see BatchItem)."""
    samples: bool
    """True when the step's logits for this sequence produce its next token (decode, or the prompt's last chunk)."""
    drafts: int = 0
    """Speculative draft tokens after the pending one (their rows verify them; logits are "all")."""
