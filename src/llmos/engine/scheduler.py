"""Continuous-batching scheduler: which tokens of which sequences go into the next forward pass.

Contract (pure Python; the engine core executes what it decides and reports back through :meth:`Scheduler.update`).
Each policy is a named piece of :meth:`Scheduler.schedule`:

* **Continuous batching**: sequences join the running batch as soon as a slot is free and leave it the step they
  finish; every step, each decoding sequence contributes its pending token (plus draft tokens, below).
* **Chunked prefill** (``_prefill_chunk``): a prompt enters the KV cache in slices. While any sequence is decoding,
  prompt tokens per step are capped at ``max_prefill_tokens`` so running streams keep flowing; with no decodes, a
  step may use the whole ``max_batch_tokens`` budget.
* **Prefix cache** (``_admit``, ``_prompt_done``, ``finish``): an admitted sequence starts from the longest cached
  prefix of its prompt (same adapter and scope); its prompt joins the cache when its prefill ends, its answer when
  it finishes (:mod:`llmos.engine.kv_cache`).
* **KV pool** (``_make_room_for_decodes``, ``_pool_room``): on a shared-pool backend, tokens are added only while
  the pool has room; unused cached prefixes are evicted first (LRU), then the lowest-priority, newest running
  sequence is preempted. A sequence is admitted only when its first chunk fits.
* **Speculative drafts** (``_drafts``): while at most ``speculative_max_decodes`` sequences decode, each may feed
  prompt-lookup draft tokens after its pending one; :meth:`update` keeps the confirmed ones.
* **Step-time target** (``_pick_decodes``, ``_time_capped``): on a *shared* engine (requests of two or more fairness
  keys within ``shared_window_seconds``) with ``step_target_seconds`` set, prompt tokens are capped to what fits
  beside the step's decodes (never below ``min_prefill_tokens``), and when the decodes alone would overrun it they
  are split: those of keys holding fewer slots first, then round robin. Tokens per step are learned by
  :class:`~llmos.engine.step_cost.StepBudget` from :meth:`Scheduler.record_step`.
* **Fair share** (``_best_waiting``, ``_preempt_for_fair_share``, ``_isolated_prompt_step``): a waiting sequence is
  admitted by ``priority`` (lower first), then by how many slots its fairness key holds (fewest first), then
  arrival. When every slot is taken and a key holding at most one slot waits behind a key holding two or more, the
  newest sequence of the largest holder is preempted (recomputed later from its prompt and tokens, mostly from the
  prefix cache; its stream just pauses). The prompt of such an outnumbered key runs in a step of its own.
  Requests that score their prompt are never preempted.
* **Admission control**: past ``max_waiting`` queued sequences, :meth:`Scheduler.add` raises
  :class:`~llmos.errors.OverloadedError` with a retry hint instead of queueing without bound.
* **Cancellation**: :meth:`Scheduler.abort` removes a waiting sequence at once, and a running one at the next
  :meth:`Scheduler.schedule`, which returns it in ``dropped`` (its KV already freed).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from llmos.engine.kv_cache import KvPool, PrefixCache
from llmos.engine.sequence import Chunk, Sequence
from llmos.engine.speculative import DraftLength, NgramDrafter
from llmos.engine.step_cost import StepBudget
from llmos.errors import OverloadedError

__all__ = ["Chunk", "Scheduler", "SchedulerConfig", "Sequence", "StepPlan"]


class KvOps(Protocol):
    """What the scheduler asks of the backend's KV memory (the rest goes through the prefix cache)."""

    def forget_sequence(self, seq_id: int, from_pos: int = 0) -> None: ...


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
    """An engine counts as shared while requests of two or more fairness keys arrived within this many seconds."""
    speculative: bool = False
    """Prompt-lookup drafts for decoding sequences (when few decode: see ``speculative_max_decodes``)."""
    speculative_max_draft: int = 8
    speculative_max_decodes: int = 2
    """Draft only while at most this many sequences decode (beyond that the batch already fills the CPU)."""


@dataclass
class StepPlan:
    chunks: list[Chunk] = field(default_factory=list)
    dropped: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    """Sequences sent back to the queue this step (their KV cache is already freed)."""
    admitted: list[Sequence] = field(default_factory=list)
    """Sequences that took a slot this step (the engine binds their adapter before the step runs)."""

    @property
    def num_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.chunks)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        clock: Callable[[], float] = time.monotonic,
        *,
        kv: KvOps | None = None,
        cache: PrefixCache | None = None,
        pool: KvPool | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self.kv = kv
        """The backend's KV memory (None in planning-only tests: then nothing is freed or cached)."""
        self.cache = cache
        self.pool = pool
        self._last_seen: dict[str | None, float] = {}
        self._steps = 0
        self._alone_last = False
        """The previous step ran an outnumbered key's prompt on its own (the next one may not)."""
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
        self._last_seen[seq.fairness_key] = self._clock()
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        self._waiting[seq.request_id] = seq
        entry = (seq.request.priority, seq.order, next(self._pushes), seq)
        heapq.heappush(self._queues.setdefault(seq.fairness_key, []), entry)

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
        """Release a running sequence: keep what it computed in the prefix cache, free its slot and KV."""
        if seq in self.running:
            self._release_slot(seq, keep=not seq.aborted)
        seq.finished = True

    def _release_slot(self, seq: Sequence, *, keep: bool) -> None:
        assert seq.slot is not None
        if seq.lease is not None and self.cache is not None:
            if keep:
                self.cache.insert(seq.lease, seq.slot, seq.fed_tokens())
            self.cache.release(seq.lease)
        if self.kv is not None:
            self.kv.forget_sequence(seq.slot)
        self.running.remove(seq)
        self._free_slots.append(seq.slot)
        self._held[seq.fairness_key] -= 1
        seq.slot = None

    def drain_waiting(self) -> list[Sequence]:
        """Remove and return every waiting sequence (engine shutdown)."""
        drained = list(self._waiting.values())
        self._waiting.clear()
        self._queues.clear()
        return drained

    def _head(self, key: str | None) -> Sequence | None:
        queue = self._queues.get(key)
        while queue:
            seq = queue[0][3]
            if self._waiting.get(seq.request_id) is seq:
                return seq
            heapq.heappop(queue)  # aborted or already admitted
        return None

    def _best_waiting(self) -> Sequence | None:
        """Priority first, then the fairness key holding the fewest slots, then arrival."""
        best: tuple[int, int, int] | None = None
        chosen = None
        for key in list(self._queues):
            head = self._head(key)
            if head is None:
                continue
            rank = (head.request.priority, self._held.get(key, 0), head.order)
            if best is None or rank < best:
                best, chosen = rank, head
        return chosen

    def _admit(self, seq: Sequence, plan: StepPlan) -> None:
        del self._waiting[seq.request_id]
        seq.slot = self._free_slots.pop()
        self.running.append(seq)
        self._held[seq.fairness_key] = self._held.get(seq.fairness_key, 0) + 1
        plan.admitted.append(seq)
        request = seq.request
        if self.cache is not None and self.cache.enabled and request.cache_prompt and not request.prompt_logprobs:
            seq.lease = self.cache.acquire((request.adapter, request.prefix_scope), seq.slot, seq.prefill_tokens)
            seq.prompt_done = seq.position = seq.lease.hit
            if seq.replay is None:
                seq.cached_tokens = seq.lease.hit

    def _preempt(self, victim: Sequence, plan: StepPlan) -> None:
        """Send a running sequence back to the head of its queue, to be recomputed from its prompt and the tokens it
        produced (what it computed stays in the prefix cache, so the recompute is mostly a cache hit)."""
        self._release_slot(victim, keep=not victim.aborted)
        if victim.generated:
            fed = victim.generated[:-1] if victim.pending is not None else victim.generated
            victim.replay = victim.request.prompt_tokens + fed
        victim.prompt_done = 0
        victim.position = 0
        victim.lease = None
        self._enqueue(victim)
        plan.preempted.append(victim)
        self.preemptions += 1

    def record_step(self, tokens: int, seconds: float) -> None:
        """How long the last step took (the engine thread reports it; step sizes for the time target follow)."""
        self.budget.observe(tokens, seconds)

    # --- update (after the engine ran a step) -----------------------------------------------------------------------

    def update(self, chunk: Chunk, new_tokens: list[int], accepted_drafts: int = 0) -> None:
        """Book what one step did for one sequence: ``new_tokens`` were sampled (in order; the last one becomes
        the pending token), and ``accepted_drafts`` of the chunk's draft tokens were confirmed (their KV stays;
        the KV of rejected drafts is dropped)."""
        seq = chunk.seq
        if seq.prefilling:
            seq.prompt_done += len(chunk.tokens)
            seq.position = seq.prompt_done
            if not seq.prefilling:
                self._prompt_done(seq)
        else:
            kept = min(accepted_drafts, max(len(new_tokens) - 1, 0))
            seq.position = chunk.start_pos + 1 + kept
            if chunk.drafts > kept and self.kv is not None and seq.slot is not None:
                self.kv.forget_sequence(seq.slot, seq.position)
            if seq.draft_length is not None:
                seq.draft_length.record(chunk.drafts, accepted_drafts, len(seq.generated))
        if new_tokens:
            seq.generated.extend(new_tokens)
            seq.pending = new_tokens[-1]
            if seq.drafter is not None:
                seq.drafter.extend(new_tokens)

    def _prompt_done(self, seq: Sequence) -> None:
        """The prompt (or a preempted sequence's replay) is in the KV cache: share it, start drafting."""
        if seq.lease is not None and self.cache is not None and seq.slot is not None:
            self.cache.insert(seq.lease, seq.slot, seq.prefill_tokens)
        if seq.replay is not None:
            seq.replay = None
        if self.config.speculative and seq.request.speculative and not seq.request.grammar and seq.drafter is None:
            seq.drafter = NgramDrafter()
            seq.drafter.extend(seq.request.prompt_tokens + seq.generated)
            seq.draft_length = DraftLength(self.config.speculative_max_draft)

    # --- planning ---------------------------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Plan the next step: drops, fair-share preemption, then an isolated prompt step for an outnumbered key, or
        the running decodes (with drafts) plus prompt chunks within the token, time and KV-pool budgets."""
        plan = StepPlan()
        self._drop_aborted(plan)
        if not self._free_slots and self._waiting:
            best = self._best_waiting()
            if best is not None:
                self._preempt_for_fair_share(best, plan)
        self._steps += 1
        decodes = [s for s in self.running if not s.prefilling and s.pending is not None]
        decodes = self._make_room_for_decodes(decodes, plan)
        prompt_cap = min(self.config.max_batch_tokens, self.config.max_prefill_tokens)

        if not self._alone_last and self._isolated_prompt_step(plan, prompt_cap if decodes else None):
            self._alone_last = bool(decodes)
            return plan
        self._alone_last = False

        chosen = self._pick_decodes(decodes)
        drafts = self._drafts(chosen)
        decode_tokens = len(chosen) + sum(len(d) for d in drafts.values())
        budget = self.config.max_batch_tokens - decode_tokens
        budget = self._time_capped(min(budget, prompt_cap) if chosen else budget, decode_tokens)
        for seq in self.running:
            if budget > 0 and seq.prefilling and seq not in plan.admitted:
                budget -= self._prefill_chunk(plan, seq, budget)
        self._admit_waiting(plan, budget, only_outnumbered=False)
        plan.chunks[:0] = [self._decode_chunk(seq, drafts.get(id(seq), [])) for seq in chosen]
        return plan

    def _drop_aborted(self, plan: StepPlan) -> None:
        for seq in self._to_drop:
            if seq in self.running:
                self.finish(seq)
                plan.dropped.append(seq)
        self._to_drop.clear()

    @staticmethod
    def _decode_chunk(seq: Sequence, drafts: list[int]) -> Chunk:
        assert seq.pending is not None
        tokens = [seq.pending, *drafts]
        return Chunk(seq, tokens, seq.position, "all" if drafts else "last", samples=True, drafts=len(drafts))

    # --- policy: speculative drafts ---------------------------------------------------------------------------------

    def _drafts(self, decodes: list[Sequence]) -> dict[int, list[int]]:
        """Prompt-lookup drafts per decoding sequence, while few sequences decode (a full batch has no idle compute
        for them), within each sequence's context and the KV pool."""
        if not self.config.speculative or not decodes or len(decodes) > self.config.speculative_max_decodes:
            return {}
        drafts: dict[int, list[int]] = {}
        room = self.config.max_batch_tokens - len(decodes)
        for seq in decodes:
            if seq.drafter is None or seq.draft_length is None:
                continue
            remaining = seq.request.params.max_tokens - len(seq.generated)
            want = min(seq.draft_length.wanted(len(seq.generated)), remaining - 1, room)
            proposal = seq.drafter.propose(want)
            if proposal and self._pool_room(len(proposal)):
                drafts[id(seq)] = proposal
                room -= len(proposal)
        return drafts

    # --- policy: KV pool --------------------------------------------------------------------------------------------

    def evict_cache(self) -> None:
        """Drop every cached prefix no running sequence uses."""
        if self.cache is not None:
            self.cache.clear()

    def kv_cells_used(self) -> int:
        """KV cells held by running sequences and the prefix cache (shared cells once)."""
        return self._private_cells() + (self.cache.tokens if self.cache is not None else 0)

    def _private_cells(self) -> int:
        return sum(s.position - (s.lease.shared if s.lease is not None else 0) for s in self.running)

    def _pool_room(self, tokens: int) -> bool:
        """True when ``tokens`` more cells fit the pool, after evicting unused cached prefixes if needed."""
        if self.pool is None:
            return True
        while self.pool.free(self._private_cells()) < tokens:
            if self.cache is None or not self.cache.evict_one():
                return False
        return True

    def _make_room_for_decodes(self, decodes: list[Sequence], plan: StepPlan) -> list[Sequence]:
        """Running sequences always win over cached prefixes; when evicting those is not enough, the lowest-priority
        (then newest) running sequence is preempted until every remaining decode has its cell."""
        while not self._pool_room(len(decodes)):
            candidates = [s for s in self.running if not s.request.prompt_logprobs]
            if len(candidates) <= 1:
                break
            victim = max(candidates, key=lambda s: (s.request.priority, s.order))
            self._preempt(victim, plan)
            decodes = [s for s in decodes if s is not victim]
        return decodes

    # --- policy: fair share -----------------------------------------------------------------------------------------

    def _preempt_for_fair_share(self, waiting: Sequence, plan: StepPlan) -> bool:
        """Free a slot for ``waiting`` from the key holding the most, when that is clearly unfair."""
        mine = self._held.get(waiting.fairness_key, 0)
        if mine > 1:
            return False
        candidates = [
            s for s in self.running if s.fairness_key != waiting.fairness_key and not s.request.prompt_logprobs
        ]
        if not candidates:
            return False
        victim_key = max({s.fairness_key for s in candidates}, key=lambda k: self._held.get(k, 0))
        if self._held.get(victim_key, 0) < mine + 2:
            return False
        victim = max((s for s in candidates if s.fairness_key == victim_key), key=lambda s: s.order)
        self._preempt(victim, plan)
        return True

    def _outnumbered(self, key: str | None) -> bool:
        """True when ``key`` holds at most one slot while another key holds two or more.

        Its prompt then runs in a step of its own: the other key's decodes wait one step, so a flood does not
        multiply the time to first token of everyone else.
        """
        if self._held.get(key, 0) > 1:
            return False
        return any(count >= 2 for other, count in self._held.items() if other != key)

    def _isolated_prompt_step(self, plan: StepPlan, cap: int | None) -> bool:
        """An outnumbered key's prompt runs in a step of its own, before anything else (``cap``: its token budget
        while others decode; None: the whole batch). True when such a step was planned."""
        budget = cap if cap is not None else self.config.max_batch_tokens
        for seq in self.running:
            if budget > 0 and seq.prefilling and self._outnumbered(seq.fairness_key):
                budget -= self._prefill_chunk(plan, seq, budget)
        self._admit_waiting(plan, budget, only_outnumbered=True)
        return bool(plan.chunks)

    # --- policy: step-time target -----------------------------------------------------------------------------------

    def _shared(self) -> bool:
        """True when requests of more than one fairness key reached this engine within the recent window."""
        horizon = self._clock() - self.config.shared_window_seconds
        for key in [k for k, seen in self._last_seen.items() if seen < horizon]:
            del self._last_seen[key]
        return len(self._last_seen) > 1

    def _pick_decodes(self, decodes: list[Sequence]) -> list[Sequence]:
        """All running decodes; on a shared engine whose decodes alone would overrun the step-time target, those of
        keys holding fewer slots first, then those that waited longest (round robin), leaving room for a minimum
        prompt chunk when one is pending."""
        capacity = self.budget.capacity()
        if capacity is None or len(decodes) <= 1 or not self._shared():
            chosen = decodes
        else:
            wants_prompt = bool(self._waiting and self._free_slots) or any(s.prefilling for s in self.running)
            room = max(capacity - (self.config.min_prefill_tokens if wants_prompt else 0), 1)
            ranked = sorted(decodes, key=lambda s: (self._held.get(s.fairness_key, 0), s.last_decode_step, s.order))
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

    # --- policy: chunked prefill and admission ----------------------------------------------------------------------

    def _admit_waiting(self, plan: StepPlan, budget: int, *, only_outnumbered: bool) -> int:
        """Admit waiting sequences (best first) into free slots while prompt budget and KV pool room last; returns
        the budget left. With ``only_outnumbered``, stop at the first candidate whose key is not outnumbered."""
        while budget > 0 and self._free_slots and self._waiting:
            candidate = self._best_waiting()
            if candidate is None or (only_outnumbered and not self._outnumbered(candidate.fairness_key)):
                break
            if not self._pool_room(min(len(candidate.prefill_tokens), budget) + 1):
                break  # the pool is full of running sequences: wait for one to finish
            self._admit(candidate, plan)
            budget -= self._prefill_chunk(plan, candidate, budget)
        return budget

    def _prefill_chunk(self, plan: StepPlan, seq: Sequence, budget: int) -> int:
        tokens_all = seq.prefill_tokens
        take = min(len(tokens_all) - seq.prompt_done, budget)
        if self.pool is not None and not self._pool_room(take):
            take = min(take, max(self.pool.free(self._private_cells()), 0))
            if take <= 0:
                return 0
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
