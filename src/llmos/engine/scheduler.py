"""Continuous-batching scheduler: which tokens of which sequences go into the next forward pass.

Contract (pure Python, no model; the engine core executes what it decides):

* **Continuous batching**: sequences join the running batch as soon as a slot is free and leave it the step they
  finish; every step, each running sequence that is generating contributes its one pending token.
* **Chunked prefill**: a prompt enters the KV cache in slices. While any sequence is decoding, prompt tokens per
  step are capped at ``max_prefill_tokens`` so running streams keep flowing; with no decodes, a step may use the
  whole ``max_batch_tokens`` budget.
* **Caps**: at most ``max_running`` sequences hold slots (one KV stream each), at most ``max_batch_tokens`` tokens
  per step.
* **Order**: waiting sequences are admitted by ``priority`` (lower first), then arrival (first come, first served).
  Running sequences are never preempted.
* **Admission control**: past ``max_waiting`` queued sequences, :meth:`Scheduler.add` raises
  :class:`~llmos.errors.OverloadedError` with a retry hint instead of queueing without bound.
* **Cancellation**: :meth:`Scheduler.abort` removes a waiting sequence at once, and a running one at the next
  :meth:`Scheduler.schedule`, which returns it in ``dropped`` so the engine frees its KV cache within one step.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any

from llmos.engine.request import GenerationRequest
from llmos.errors import OverloadedError


@dataclass
class SchedulerConfig:
    max_running: int = 16
    max_waiting: int = 64
    max_batch_tokens: int = 512
    max_prefill_tokens: int = 256


@dataclass(eq=False)
class Sequence:
    """One request's progress through the engine."""

    request: GenerationRequest
    order: int = 0
    slot: int | None = None
    prompt_done: int = 0
    """Prompt tokens already in the KV cache."""
    pending: int | None = None
    """The last sampled token, fed to the model in the next step."""
    position: int = 0
    """KV position of the next token fed."""
    generated: list[int] = field(default_factory=list)
    aborted: bool = False
    finished: bool = False
    state: dict[str, Any] = field(default_factory=dict)
    """Engine-owned per-sequence objects (sampler, detokenizer, stop matcher, stream, timestamps)."""

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_tokens)

    @property
    def prefilling(self) -> bool:
        return self.prompt_done < self.prompt_len


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


@dataclass
class StepPlan:
    chunks: list[Chunk] = field(default_factory=list)
    dropped: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._order = itertools.count()
        self._waiting_heap: list[tuple[int, int, Sequence]] = []
        self._waiting: dict[str, Sequence] = {}
        self.running: list[Sequence] = []
        self._free_slots = list(range(config.max_running - 1, -1, -1))
        self._to_drop: list[Sequence] = []

    # --- queue ------------------------------------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self._waiting or self.running or self._to_drop)

    def add(self, seq: Sequence) -> None:
        if len(self._waiting) >= self.config.max_waiting:
            raise OverloadedError(
                f"the server is at capacity ({self.num_running} running, {self.num_waiting} waiting); retry shortly",
                retry_after=1.0,
            )
        seq.order = next(self._order)
        self._waiting[seq.request_id] = seq
        heapq.heappush(self._waiting_heap, (seq.request.priority, seq.order, seq))

    def abort(self, request_id: str) -> Sequence | None:
        """Cancel a request. Returns the sequence if it was waiting (already removed), else None."""
        waiting = self._waiting.pop(request_id, None)
        if waiting is not None:
            waiting.aborted = True
            return waiting
        for seq in self.running:
            if seq.request_id == request_id and not seq.aborted:
                seq.aborted = True
                self._to_drop.append(seq)
        return None

    def finish(self, seq: Sequence) -> None:
        """Release a running sequence's slot (the engine frees its KV cache)."""
        if seq in self.running:
            self.running.remove(seq)
            assert seq.slot is not None
            self._free_slots.append(seq.slot)
        seq.finished = True

    def drain_waiting(self) -> list[Sequence]:
        """Remove and return every waiting sequence (engine shutdown)."""
        drained = []
        while (seq := self._pop_waiting()) is not None:
            drained.append(seq)
        return drained

    def _pop_waiting(self) -> Sequence | None:
        while self._waiting_heap:
            _, _, seq = heapq.heappop(self._waiting_heap)
            if self._waiting.pop(seq.request_id, None) is seq:
                return seq
        return None

    # --- planning ---------------------------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        for seq in self._to_drop:
            if seq in self.running:
                self.finish(seq)
                plan.dropped.append(seq)
        self._to_drop.clear()

        budget = self.config.max_batch_tokens
        for seq in self.running:
            if not seq.prefilling and seq.pending is not None:
                plan.chunks.append(Chunk(seq, [seq.pending], seq.position, "last", samples=True))
                budget -= 1
        decoding = bool(plan.chunks)
        prefill_budget = min(budget, self.config.max_prefill_tokens) if decoding else budget

        for seq in self.running:
            if prefill_budget <= 0:
                break
            if seq.prefilling:
                prefill_budget -= self._prefill_chunk(plan, seq, prefill_budget)

        while prefill_budget > 0 and self._free_slots and self._waiting:
            admitted = self._pop_waiting()
            if admitted is None:
                break
            admitted.slot = self._free_slots.pop()
            self.running.append(admitted)
            prefill_budget -= self._prefill_chunk(plan, admitted, prefill_budget)
        return plan

    @staticmethod
    def _prefill_chunk(plan: StepPlan, seq: Sequence, budget: int) -> int:
        prompt = seq.request.prompt_tokens
        take = min(len(prompt) - seq.prompt_done, budget)
        tokens = prompt[seq.prompt_done : seq.prompt_done + take]
        last = seq.prompt_done + take == len(prompt)
        logits = "all" if seq.request.prompt_logprobs else ("last" if last else "none")
        plan.chunks.append(Chunk(seq, tokens, seq.prompt_done, logits, samples=last))
        return take
