"""The engine: one model, one decode thread, a step loop of schedule -> execute -> update.

Contract:

* :meth:`EngineCore.submit` validates a request against the context window, then queues it (or raises
  :class:`~llmos.errors.OverloadedError` when the waiting queue is full). Its events arrive on the given
  :class:`~llmos.engine.streams.OutputStream` from the engine thread.
* The engine thread is the only thread that touches the backend's KV cache and samplers. Each step it asks the
  :class:`~llmos.engine.scheduler.Scheduler` for a plan, runs one batched ``decode``, then samples, detokenizes,
  applies stop strings and pushes one event per sequence that produced something.
* :meth:`EngineCore.abort` cancels a request; its KV cache is freed within one step and its stream gets a final
  ``cancelled`` event. A failing step fails only the sequences in it; the engine keeps serving.
* The engine knows nothing of HTTP, tenants or the registry: token ids and sampling parameters in, tokens out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from llmos.engine.backends.base import Backend, BatchItem
from llmos.engine.kv_cache import KvPool, PrefixCache
from llmos.engine.request import GenerationOutput, GenerationRequest, Logprob
from llmos.engine.scheduler import Scheduler, SchedulerConfig, StepPlan
from llmos.engine.sequence import Chunk, GenerationState, Sequence
from llmos.engine.streams import OutputStream, deliver
from llmos.engine.text import IncrementalDecoder, StopMatcher
from llmos.errors import ContextLengthExceededError, DecodeError, EngineStoppedError, KvPoolFullError, LlmosError
from llmos.types import FinishReason

log = logging.getLogger("llmos.engine")


def _slot(seq: Sequence) -> int:
    assert seq.slot is not None, "only running sequences are scheduled"
    return seq.slot


@dataclass
class EngineConfig:
    """Engine settings beyond the backend's own limits. The scheduler's configuration is derived from these and the
    backend (slots, tokens per step), in :meth:`EngineConfig.scheduler_config` only."""

    max_waiting: int = 64
    max_prefill_tokens: int = 256
    step_target_seconds: float = 0.0
    """Aim for steps about this long while several sequences share the engine (0: no target); see the scheduler."""
    prefix_cache: bool = True
    speculative: bool = False
    speculative_max_draft: int = 8

    def scheduler_config(self, backend: Backend) -> SchedulerConfig:
        return SchedulerConfig(
            max_running=backend.n_seq_max,
            max_waiting=self.max_waiting,
            max_batch_tokens=backend.n_batch,
            max_prefill_tokens=min(self.max_prefill_tokens, backend.n_batch),
            step_target_seconds=self.step_target_seconds,
            speculative=self.speculative,
            speculative_max_draft=self.speculative_max_draft,
        )


@dataclass
class StepStats:
    """What one step did; handed to the step listener (metrics) from the engine thread."""

    sequences: int
    tokens: int
    seconds: float
    draft_tokens: int = 0
    """Speculative draft tokens the step verified."""
    accepted_draft_tokens: int = 0
    """Of those, the ones the model confirmed (each saved a forward pass)."""


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_cells_used: int = 0
    kv_cells_total: int = 0
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    prefix_cached_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)


class EngineCore:
    def __init__(
        self,
        backend: Backend,
        config: EngineConfig | None = None,
        *,
        name: str = "model",
        step_listener: Callable[[StepStats], None] | None = None,
        background: bool = True,
    ) -> None:
        """``background``: run the step loop on a thread of its own (the server, the SDK); False leaves stepping to
        the caller (:meth:`step`), as tests do."""
        self.backend = backend
        self.config = config or EngineConfig()
        self.name = name
        holders = getattr(backend, "prefix_holders", 0)
        self.cache: PrefixCache | None = None
        if self.config.prefix_cache and holders > 0:
            self.cache = PrefixCache(backend, backend.kv_pool_tokens)
        pool = None
        if getattr(backend, "kv_shared_pool", False):  # headroom of one batch for cells llama.cpp cannot place
            pool = KvPool(max(backend.kv_pool_tokens - backend.n_batch, backend.kv_pool_tokens // 2), self.cache)
        self.scheduler = Scheduler(self.config.scheduler_config(backend), kv=backend, cache=self.cache, pool=pool)
        self.step_listener = step_listener
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._stopping = False
        self.crashed: str | None = None
        """Why the engine thread died, if it did (then every request on it failed and new ones are refused)."""
        self._stats = EngineStats(kv_cells_total=getattr(backend, "kv_pool_tokens", 0))
        self._streams: dict[str, OutputStream] = {}
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name=f"llmos-engine-{name}", daemon=True)
            self._thread.start()

    # --- public API (any thread) ------------------------------------------------------------------------------------

    @property
    def max_context(self) -> int:
        """Tokens one sequence may hold: prompt plus completion."""
        return min(self.backend.n_ctx_seq, getattr(self.backend, "kv_pool_tokens", self.backend.n_ctx_seq))

    def check_fits(self, prompt_tokens: int, max_tokens: int | None = None) -> None:
        if prompt_tokens >= self.max_context:
            raise ContextLengthExceededError(
                f"this model's maximum context length is {self.max_context} tokens, but the prompt is"
                f" {prompt_tokens} tokens (at least one must be left for the completion)",
                param="messages",
            )
        if max_tokens is not None and prompt_tokens + max_tokens > self.max_context:
            raise ContextLengthExceededError(
                f"this model's maximum context length is {self.max_context} tokens, but {prompt_tokens} prompt"
                f" tokens plus max_tokens={max_tokens} ask for {prompt_tokens + max_tokens}",
                param="max_tokens",
            )

    def submit(self, request: GenerationRequest, stream: OutputStream) -> None:
        if not request.prompt_tokens:
            raise ContextLengthExceededError("the prompt is empty after tokenization", param="prompt")
        self.check_fits(len(request.prompt_tokens))
        seq = Sequence(request)
        with self._lock:
            if self._stopping:
                raise EngineStoppedError(f"the engine for {self.name} is shutting down")
            self.scheduler.add(seq)
            self._streams[request.request_id] = stream
            self._wakeup.notify()

    def abort(self, request_id: str) -> None:
        with self._lock:
            waiting = self.scheduler.abort(request_id)
            self._wakeup.notify()
        if waiting is not None:
            self._deliver([self._finish(waiting, "cancelled", notify_scheduler=False)])

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def outstanding(self) -> int:
        """Requests queued or running (read without the lock: good enough for load balancing)."""
        return self.scheduler.num_running + self.scheduler.num_waiting

    def has_work(self) -> bool:
        with self._lock:
            return self.scheduler.has_work()

    def stats(self) -> EngineStats:
        with self._lock:
            stats = EngineStats(**{**self._stats.__dict__, "finished": dict(self._stats.finished)})
            stats.running = self.scheduler.num_running
            stats.waiting = self.scheduler.num_waiting
            stats.kv_cells_used = self.scheduler.kv_cells_used()
            if self.cache is not None:
                stats.prefix_cached_tokens = self.cache.tokens
        return stats

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop, fail what is still queued or running, free the backend."""
        with self._lock:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self._fail_all(EngineStoppedError(f"the engine for {self.name} stopped"))
        self.backend.close()

    # --- one step: schedule -> execute -> update --------------------------------------------------------------------

    def step(self) -> list[GenerationOutput]:
        """Run one step and return the events it produced (also pushed to the requests' streams): plain data, one
        unit per step, that could cross a process boundary."""
        with self._lock:
            plan = self.scheduler.schedule()
        outputs = [self._finish(seq, "cancelled", notify_scheduler=False) for seq in plan.dropped]
        if plan.chunks:
            outputs.extend(self._execute(plan))
        self._deliver(outputs)
        return outputs

    def _run(self) -> None:
        # Compute yields to the process's other threads (the HTTP event loop), so a busy engine never makes the
        # server slow to answer; ggml's worker threads inherit this niceness.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 5)
        try:
            while True:
                with self._lock:
                    while not self._stopping and not self.scheduler.has_work():
                        self._wakeup.wait()
                    if self._stopping:
                        break
                self.step()
        except BaseException as exc:  # a bug or a backend failure: fail cleanly, never leave a stream hanging
            log.exception("engine for %s crashed", self.name)
            with self._lock:
                self._stopping = True
            self.crashed = f"{type(exc).__name__}: {exc}"
            self._fail_all(EngineStoppedError(f"the engine for {self.name} failed ({type(exc).__name__}); retry"))
            return
        self._fail_all(EngineStoppedError(f"the engine for {self.name} stopped"))

    def _fail_all(self, error: LlmosError) -> None:
        with self._lock:
            sequences = list(self.scheduler.running)
            sequences.extend(self.scheduler.drain_waiting())
        self._deliver([self._finish(seq, "error", error=error) for seq in sequences])

    def _execute(self, plan: StepPlan) -> list[GenerationOutput]:
        started = time.perf_counter()
        accepted_before = self._stats.accepted_draft_tokens
        outputs: list[GenerationOutput] = []
        chunks = plan.chunks
        for seq in plan.admitted:
            if seq.admitted_at is None:
                seq.admitted_at = time.monotonic()
            try:
                assert seq.slot is not None
                self.backend.bind_adapter(seq.slot, seq.request.adapter)
            except LlmosError as exc:
                chunks = [c for c in chunks if c.seq is not seq]
                outputs.append(self._finish(seq, "error", error=exc))
        if not chunks:
            return outputs
        items = [BatchItem(_slot(c.seq), c.tokens, c.start_pos, c.logits) for c in chunks]
        try:
            try:
                rows = self.backend.decode(items)
            except KvPoolFullError:  # fragmentation the accounting did not foresee: drop every unused cached prefix
                log.warning("KV pool full for a step of %d tokens; evicting the prefix cache and retrying", len(items))
                with self._lock:
                    self.scheduler.evict_cache()
                rows = self.backend.decode(items)
        except (LlmosError, ValueError) as exc:
            log.exception("decode failed for %d sequences", len(chunks))
            error = exc if isinstance(exc, LlmosError) else DecodeError(str(exc))
            return outputs + [self._finish(chunk.seq, "error", error=error) for chunk in chunks]
        self._stats.steps += 1
        for chunk in chunks:
            seq = chunk.seq
            if seq.aborted or seq.finished:
                continue
            try:
                output = self._advance(seq, chunk, rows.get(_slot(seq), []))
            except LlmosError as exc:
                output = self._finish(seq, "error", error=exc)
            if output is not None:
                outputs.append(output)
        seconds = time.perf_counter() - started
        with self._lock:
            self.scheduler.record_step(sum(len(c.tokens) for c in chunks), seconds)
        if self.step_listener is not None:
            drafts = sum(c.drafts for c in chunks)
            accepted = self._stats.accepted_draft_tokens - accepted_before
            self.step_listener(StepStats(len(chunks), len(items), seconds, drafts, accepted))
        return outputs

    def _advance(self, seq: Sequence, chunk: Chunk, rows: list[int]) -> GenerationOutput | None:
        """Sample what the step's rows give this sequence, let the scheduler book it, and turn it into an event."""
        request = seq.request
        output = self._new_output(seq)
        if seq.prefilling:
            if request.prompt_logprobs:
                output.prompt_logprobs = self._prompt_logprobs(seq, chunk, rows)
            self._stats.prompt_tokens += len(chunk.tokens)
            resumed = seq.replay is not None and seq.pending is not None  # its next token was chosen before
            if not chunk.samples or resumed:
                with self._lock:
                    self.scheduler.update(chunk, [])
                return output if output.prompt_logprobs else None
            if seq.generation is None:
                self._start_generation(seq)
        generation = seq.generation
        assert generation is not None
        new_tokens: list[int] = []
        accepted = 0
        reason: FinishReason | None = "length" if generation.limit <= len(seq.generated) else None
        drafts = chunk.tokens[1:] if chunk.drafts else []
        for index, row in enumerate(rows[-(chunk.drafts + 1) :] if reason is None else []):
            token = generation.sampler.sample(row)
            if self.backend.is_end_of_generation(token):
                reason = "stop"
                break
            new_tokens.append(token)
            if request.logprobs is not None:
                output.logprobs = (output.logprobs or []) + [self._logprob(row, token, request.logprobs)]
            output.text += generation.stops.feed(generation.decoder.feed(self.backend.token_bytes(token)))
            if generation.stops.stopped:
                reason = "stop"
                break
            if len(seq.generated) + len(new_tokens) >= generation.limit:
                reason = "length"
                break
            if index >= len(drafts) or token != drafts[index]:
                break
            accepted += 1
        with self._lock:
            self.scheduler.update(chunk, new_tokens, accepted)
        self._stats.generated_tokens += len(new_tokens)
        self._stats.draft_tokens += chunk.drafts
        self._stats.accepted_draft_tokens += accepted
        output.token_ids = new_tokens
        if reason is not None:
            return self._emit_finish(seq, output, reason)
        output.completion_tokens = len(seq.generated)
        return output

    def _new_output(self, seq: Sequence) -> GenerationOutput:
        return GenerationOutput(
            seq.request_id, prompt_tokens=seq.prompt_len, cached_tokens=seq.cached_tokens, admitted_at=seq.admitted_at
        )

    def _start_generation(self, seq: Sequence) -> None:
        request = seq.request
        seq.generation = GenerationState(
            sampler=self.backend.new_sampler(request.params, request.grammar, request.grammar_trigger),
            decoder=IncrementalDecoder(),
            stops=StopMatcher(request.params.stop),
            limit=min(request.params.max_tokens, self.max_context - seq.prompt_len),
        )

    def _prompt_logprobs(self, seq: Sequence, chunk: Chunk, rows: list[int]) -> list[Logprob]:
        """Row j of a chunk predicts prompt token start+j+1; the very first prompt token has no logprob, nor have
        those before the request's ``score_from`` (a chunk of only those computed no logits)."""
        prompt = seq.request.prompt_tokens
        top_n = seq.request.logprobs or 0
        score_from = seq.request.score_from
        result: list[Logprob] = []
        if chunk.start_pos == 0:
            result.append(Logprob(prompt[0], self.backend.token_bytes(prompt[0]), None))
        end = min(chunk.start_pos + len(chunk.tokens) + 1, len(prompt))
        for index in range(chunk.start_pos + 1, end):
            j = index - chunk.start_pos - 1
            if chunk.logits == "all" and index >= score_from:
                result.append(self._logprob(rows[j], prompt[index], top_n))
            else:
                result.append(Logprob(prompt[index], self.backend.token_bytes(prompt[index]), None))
        return result

    def _logprob(self, row: int, token: int, top_n: int) -> Logprob:
        value, top = self.backend.logprobs(row, token, top_n)
        return Logprob(
            token,
            self.backend.token_bytes(token),
            value,
            tuple((t.token, self.backend.token_bytes(t.token), t.logprob) for t in top),
        )

    def _emit_finish(self, seq: Sequence, output: GenerationOutput, reason: FinishReason) -> GenerationOutput:
        generation = seq.generation
        if generation is not None and (reason != "stop" or not generation.stops.stopped):
            output.text += generation.stops.feed(generation.decoder.flush()) + generation.stops.flush()
        return self._finish(seq, reason, output=output)

    def _finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        *,
        output: GenerationOutput | None = None,
        error: LlmosError | None = None,
        notify_scheduler: bool = True,
    ) -> GenerationOutput:
        if notify_scheduler:
            with self._lock:
                self.scheduler.finish(seq)
        seq.finished = True
        matched: str | None = None
        if seq.generation is not None:
            matched = seq.generation.stops.matched
            seq.generation.sampler.close()
            seq.generation = None
        final = output or self._new_output(seq)
        final.stop_sequence = matched if reason == "stop" else None
        final.finished = True
        final.finish_reason = reason
        final.error = error
        final.completion_tokens = len(seq.generated)
        self._stats.finished[reason] = self._stats.finished.get(reason, 0) + 1
        return final

    def _deliver(self, outputs: list[GenerationOutput]) -> None:
        """Hand each event to its request's stream (all of a step's events together)."""
        batch: list[tuple[OutputStream, GenerationOutput]] = []
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished:
                with self._lock:
                    self._streams.pop(output.request_id, None)
            batch.append((stream, output))
        deliver(batch)
