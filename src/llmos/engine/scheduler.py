"""Continuous-batching scheduler: which tokens of which sequences go into the next forward pass.

Contract (pure Python, no model; the engine core executes what it decides):

* **Continuous batching**: sequences join the running batch as soon as a slot is free and leave it the step they
  finish; every step, each running sequence that is generating contributes its one pending token.
* **Chunked prefill**: a prompt enters the KV cache in slices. While any sequence is decoding, prompt tokens per
  step are capped at ``max_prefill_tokens`` so running streams keep flowing; with no decodes, a step may use the
  whole ``max_batch_tokens`` budget.
* **Caps**: at most ``max_running`` sequences hold slots (one KV stream each), at most ``max_batch_tokens`` tokens
  per step.
* **Step-time target** (isolation between tenants): on a *shared* engine (requests of two or more tenants within
  ``shared_window_seconds``) with ``step_target_seconds`` set, each step is kept near the target: prompt tokens are
  capped to what fits beside the step's decodes (never below ``min_prefill_tokens``), and when the decodes alone
  would overrun it they are split: those of tenants holding fewer slots first, then the ones that waited longest
  (round robin). A newcomer then waits at most one short step before its prompt starts. Tokens per step are learned
  by :class:`~llmos.engine.step_cost.StepBudget` from the step times the engine reports through
  :meth:`Scheduler.record_step`. An engine serving one tenant runs unthrottled steps (best throughput, and a burst
  of prompts is prefilled at full speed).
* **Order and fair share**: a waiting sequence is admitted by ``priority`` (lower first), then by how many slots
  its tenant (the request's fairness key) already holds (fewest first), then arrival (first come, first served).
  When every slot is taken and a tenant holding at most one slot waits behind a tenant holding two or more, the
  newest sequence of the largest holder is preempted: its KV cache is dropped and it goes back to the head of its
  tenant's queue, to be recomputed from its prompt and the tokens it already produced (its output stream just
  pauses). At most one preemption per step; requests that score their prompt are never preempted. The prompt of
  such an outnumbered tenant runs in a step of its own (the others' decodes wait that one step), so its time to
  first token stays close to what it is on an idle server; a prompt longer than one chunk alternates such steps
  with normal ones.
* **Admission control**: past ``max_waiting`` queued sequences, :meth:`Scheduler.add` raises
  :class:`~llmos.errors.OverloadedError` with a retry hint instead of queueing without bound.
* **Cancellation**: :meth:`Scheduler.abort` removes a waiting sequence at once, and a running one at the next
  :meth:`Scheduler.schedule`, which returns it in ``dropped`` so the engine frees its KV cache within one step.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmos.engine.request import GenerationRequest
from llmos.engine.step_cost import StepBudget
from llmos.errors import OverloadedError


@dataclass
class SchedulerConfig:
    max_running: int = 16
    max_waiting: int = 64
    max_batch_tokens: int = 512
    max_prefill_tokens: int = 256
    step_target_seconds: float = 0.0
    """0: no time target (prompt tokens per step are capped by the token limits only)."""
    min_prefill_tokens: int = 8
    shared_window_seconds: float = 10.0
    """An engine counts as shared while requests of two or more tenants arrived within this many seconds."""


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
    last_decode_step: int = 0
    """The scheduler step that last fed this sequence's pending token (round robin when decodes are split)."""
    replay: list[int] | None = None
    """After a preemption: the tokens to recompute into the KV cache (prompt + generated but the pending one)."""
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
    def prefill_tokens(self) -> list[int]:
        return self.replay if self.replay is not None else self.request.prompt_tokens

    @property
    def prefilling(self) -> bool:
        return self.prompt_done < len(self.prefill_tokens)

    @property
    def tenant(self) -> str | None:
        return self.request.tenant


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
    preempted: list[tuple[Sequence, int]] = field(default_factory=list)
    """Sequences sent back to the queue this step, with the slot whose KV cache the engine must clear first."""

    @property
    def num_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._last_seen: dict[str | None, float] = {}
        self._steps = 0
        self._alone_last = False
        """The previous step ran an outnumbered tenant's prompt on its own (the next one may not)."""
        self._order = itertools.count()
        self._queues: dict[str | None, list[tuple[int, int, int, Sequence]]] = {}
        self._pushes = itertools.count()
        self._waiting: dict[str, Sequence] = {}
        self.running: list[Sequence] = []
        self._held: dict[str | None, int] = {}
        self._free_slots = list(range(config.max_running - 1, -1, -1))
        self._to_drop: list[Sequence] = []
        self.preemptions = 0
        self.budget = StepBudget(config.step_target_seconds)

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
        self._last_seen[seq.tenant] = self._clock()
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        self._waiting[seq.request_id] = seq
        entry = (seq.request.priority, seq.order, next(self._pushes), seq)
        heapq.heappush(self._queues.setdefault(seq.tenant, []), entry)

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
            self._held[seq.tenant] -= 1
        seq.finished = True

    def drain_waiting(self) -> list[Sequence]:
        """Remove and return every waiting sequence (engine shutdown)."""
        drained = list(self._waiting.values())
        self._waiting.clear()
        self._queues.clear()
        return drained

    def _head(self, tenant: str | None) -> Sequence | None:
        queue = self._queues.get(tenant)
        while queue:
            seq = queue[0][3]
            if self._waiting.get(seq.request_id) is seq:
                return seq
            heapq.heappop(queue)  # aborted or already admitted
        return None

    def _best_waiting(self) -> Sequence | None:
        """Priority first, then the tenant holding the fewest slots, then arrival."""
        best: tuple[int, int, int] | None = None
        chosen = None
        for tenant in list(self._queues):
            head = self._head(tenant)
            if head is None:
                continue
            key = (head.request.priority, self._held.get(tenant, 0), head.order)
            if best is None or key < best:
                best, chosen = key, head
        return chosen

    def _admit(self, seq: Sequence) -> None:
        del self._waiting[seq.request_id]
        seq.slot = self._free_slots.pop()
        self.running.append(seq)
        self._held[seq.tenant] = self._held.get(seq.tenant, 0) + 1

    def _preempt_for(self, waiting: Sequence, plan: StepPlan) -> bool:
        """Free a slot for ``waiting`` from the tenant holding the most, when that is clearly unfair."""
        mine = self._held.get(waiting.tenant, 0)
        if mine > 1:
            return False
        candidates = [s for s in self.running if s.tenant != waiting.tenant and not s.request.prompt_logprobs]
        if not candidates:
            return False
        victim_tenant = max({s.tenant for s in candidates}, key=lambda t: self._held.get(t, 0))
        if self._held.get(victim_tenant, 0) < mine + 2:
            return False
        victim = max((s for s in candidates if s.tenant == victim_tenant), key=lambda s: s.order)
        slot = victim.slot
        assert slot is not None
        self.finish(victim)
        victim.finished = False
        victim.slot = None
        fed = victim.generated[:-1] if victim.pending is not None else victim.generated
        victim.replay = victim.request.prompt_tokens + fed
        victim.prompt_done = 0
        victim.position = 0
        self._enqueue(victim)
        plan.preempted.append((victim, slot))
        self.preemptions += 1
        return True

    def record_step(self, tokens: int, seconds: float) -> None:
        """How long the last step took (the engine thread reports it; step sizes for the time target follow)."""
        self.budget.observe(tokens, seconds)

    # --- planning ---------------------------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        for seq in self._to_drop:
            if seq in self.running:
                self.finish(seq)
                plan.dropped.append(seq)
        self._to_drop.clear()

        if not self._free_slots and self._waiting:
            best = self._best_waiting()
            if best is not None:
                self._preempt_for(best, plan)
        self._steps += 1
        decodes = [s for s in self.running if not s.prefilling and s.pending is not None]
        prompt_cap = min(self.config.max_batch_tokens, self.config.max_prefill_tokens)

        # an outnumbered tenant's prompt runs in a step of its own, before anything else; a long one alternates with
        # normal steps, so the others' streams slow down but never stop
        if not self._alone_last:
            budget = prompt_cap if decodes else self.config.max_batch_tokens
            for seq in self.running:
                if budget > 0 and seq.prefilling and self._outnumbered(seq.tenant):
                    budget -= self._prefill_chunk(plan, seq, budget)
            self._admit_waiting(plan, budget, only_outnumbered=True)
        self._alone_last = bool(plan.chunks) and bool(decodes)
        if plan.chunks:
            return plan

        chosen = self._pick_decodes(decodes)
        budget = self.config.max_batch_tokens - len(chosen)
        budget = self._time_capped(min(budget, prompt_cap) if chosen else budget, len(chosen))
        for seq in self.running:
            if budget > 0 and seq.prefilling:
                budget -= self._prefill_chunk(plan, seq, budget)
        self._admit_waiting(plan, budget, only_outnumbered=False)
        plan.chunks[:0] = [
            Chunk(seq, [seq.pending], seq.position, "last", samples=True) for seq in chosen if seq.pending is not None
        ]
        return plan

    def _shared(self) -> bool:
        """True when requests of more than one tenant reached this engine within the recent window."""
        horizon = self._clock() - self.config.shared_window_seconds
        for tenant in [t for t, seen in self._last_seen.items() if seen < horizon]:
            del self._last_seen[tenant]
        return len(self._last_seen) > 1

    def _pick_decodes(self, decodes: list[Sequence]) -> list[Sequence]:
        """All running decodes; on a shared engine whose decodes alone would overrun the step-time target, those of
        tenants holding fewer slots first, then those that waited longest (round robin), leaving room for a minimum
        prompt chunk when one is pending."""
        capacity = self.budget.capacity()
        if capacity is None or len(decodes) <= 1 or not self._shared():
            chosen = decodes
        else:
            wants_prompt = bool(self._waiting and self._free_slots) or any(s.prefilling for s in self.running)
            room = max(capacity - (self.config.min_prefill_tokens if wants_prompt else 0), 1)
            # tenants holding fewer slots first (fair share), then round robin
            ranked = sorted(decodes, key=lambda s: (self._held.get(s.tenant, 0), s.last_decode_step, s.order))
            picked = set(ranked[:room])
            chosen = [s for s in decodes if s in picked]
        for seq in chosen:
            seq.last_decode_step = self._steps
        return chosen

    def _time_capped(self, budget: int, decodes: int) -> int:
        """``budget`` lowered to the prompt tokens that fit the step-time target beside ``decodes`` decode tokens
        (never below ``min_prefill_tokens``), on a shared engine with more than one sequence in it."""
        capacity = self.budget.capacity()
        if capacity is None or len(self.running) + len(self._waiting) <= 1 or not self._shared():
            return budget
        return min(budget, max(capacity - decodes, self.config.min_prefill_tokens))

    def _admit_waiting(self, plan: StepPlan, budget: int, *, only_outnumbered: bool) -> int:
        """Admit waiting sequences (best first) into free slots while prompt budget lasts; returns what is left.

        With ``only_outnumbered``, stop at the first candidate whose tenant is not outnumbered.
        """
        while budget > 0 and self._free_slots and self._waiting:
            candidate = self._best_waiting()
            if candidate is None or (only_outnumbered and not self._outnumbered(candidate.tenant)):
                break
            self._admit(candidate)
            budget -= self._prefill_chunk(plan, candidate, budget)
        return budget

    def _outnumbered(self, tenant: str | None) -> bool:
        """True when ``tenant`` holds at most one slot while another tenant holds two or more.

        Its prompt then runs in a step of its own: the other tenant's decodes wait one step, so a flood does not
        multiply the time to first token of everyone else.
        """
        if self._held.get(tenant, 0) > 1:
            return False
        return any(count >= 2 for other, count in self._held.items() if other != tenant)

    @staticmethod
    def _prefill_chunk(plan: StepPlan, seq: Sequence, budget: int) -> int:
        tokens_all = seq.prefill_tokens
        take = min(len(tokens_all) - seq.prompt_done, budget)
        scoring = seq.request.prompt_logprobs
        if scoring and seq.replay is None:
            # the row of position p predicts token p + 1: positions before score_from - 1 predict unwanted tokens,
            # so they form a chunk of their own that needs no logits
            unscored = seq.request.score_from - 1 - seq.prompt_done
            if unscored > 0:
                take, scoring = min(take, unscored), False
        tokens = tokens_all[seq.prompt_done : seq.prompt_done + take]
        last = seq.prompt_done + take == len(tokens_all)
        logits = "all" if scoring else ("last" if last else "none")
        plan.chunks.append(Chunk(seq, tokens, seq.prompt_done, logits, samples=last))
        return take
