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
from llmos.engine.request import GenerationOutput, GenerationRequest, Logprob
from llmos.engine.scheduler import Chunk, Scheduler, SchedulerConfig, Sequence
from llmos.engine.streams import OutputStream, deliver
from llmos.engine.text import IncrementalDecoder, StopMatcher
from llmos.errors import ContextLengthExceededError, EngineStoppedError, LlmosError, ModelLoadError
from llmos.types import FinishReason

log = logging.getLogger("llmos.engine")


def _slot(seq: Sequence) -> int:
    assert seq.slot is not None, "only running sequences are scheduled"
    return seq.slot


@dataclass
class EngineConfig:
    max_waiting: int = 64
    max_prefill_tokens: int = 256
    step_target_seconds: float = 0.0
    """Aim for steps about this long while several sequences share the engine (0: no target); see the scheduler."""


@dataclass
class StepStats:
    """What one step did; handed to the step listener (metrics) from the engine thread."""

    sequences: int
    tokens: int
    seconds: float


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_cells_used: int = 0
    kv_cells_total: int = 0
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)


class EngineCore:
    def __init__(
        self,
        backend: Backend,
        config: EngineConfig | None = None,
        *,
        name: str = "model",
        step_listener: Callable[[StepStats], None] | None = None,
    ) -> None:
        self.backend = backend
        self.config = config or EngineConfig()
        self.name = name
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_running=backend.n_seq_max,
                max_waiting=self.config.max_waiting,
                max_batch_tokens=backend.n_batch,
                max_prefill_tokens=min(self.config.max_prefill_tokens, backend.n_batch),
                step_target_seconds=self.config.step_target_seconds,
            )
        )
        self.step_listener = step_listener
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._stopping = False
        self.crashed: str | None = None
        """Why the engine thread died, if it did (then every request on it failed and new ones are refused)."""
        self._stats = EngineStats(kv_cells_total=backend.n_seq_max * backend.n_ctx_seq)
        self._outbox: list[tuple[OutputStream, GenerationOutput]] | None = None
        """While a step runs, its events collect here and go out together at the end of the step."""
        self._thread = threading.Thread(target=self._run, name=f"llmos-engine-{name}", daemon=True)
        self._thread.start()

    # --- public API (any thread) ------------------------------------------------------------------------------------

    @property
    def max_context(self) -> int:
        """Tokens one sequence may hold: prompt plus completion."""
        return self.backend.n_ctx_seq

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
        seq.state["stream"] = stream
        with self._lock:
            if self._stopping:
                raise EngineStoppedError(f"the engine for {self.name} is shutting down")
            self.scheduler.add(seq)
            self._wakeup.notify()

    def abort(self, request_id: str) -> None:
        with self._lock:
            waiting = self.scheduler.abort(request_id)
            self._wakeup.notify()
        if waiting is not None:
            self._finish(waiting, "cancelled", notify_scheduler=False)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def outstanding(self) -> int:
        """Requests queued or running (read without the lock: good enough for load balancing)."""
        return self.scheduler.num_running + self.scheduler.num_waiting

    def stats(self) -> EngineStats:
        with self._lock:
            stats = EngineStats(**{**self._stats.__dict__, "finished": dict(self._stats.finished)})
            stats.running = self.scheduler.num_running
            stats.waiting = self.scheduler.num_waiting
            stats.kv_cells_used = sum(seq.position for seq in self.scheduler.running)
        return stats

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop, fail what is still queued or running, free the backend."""
        with self._lock:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join(timeout)
        self.backend.close()

    # --- engine thread ----------------------------------------------------------------------------------------------

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
                    plan = self.scheduler.schedule()
                for seq in plan.dropped:
                    self._finish(seq, "cancelled", notify_scheduler=False)
                for _preempted, old_slot in plan.preempted:  # recomputed later; its slot is someone else's now
                    self.backend.forget_sequence(old_slot)
                if plan.chunks:
                    self._step(plan.chunks)
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
        for seq in sequences:
            self._finish(seq, "error", error=error)

    def _step(self, chunks: list[Chunk]) -> None:
        self._outbox = []
        try:
            self._run_step(chunks)
        finally:
            outbox, self._outbox = self._outbox, None
            deliver(outbox)

    def _run_step(self, chunks: list[Chunk]) -> None:
        started = time.perf_counter()
        for chunk in list(chunks):
            if chunk.start_pos == 0 and chunk.seq.prompt_done == 0:  # the sequence just took its slot
                chunk.seq.state.setdefault("admitted_at", time.monotonic())  # the first time (not after a preemption)
                try:
                    self.backend.bind_adapter(_slot(chunk.seq), chunk.seq.request.adapter)
                except LlmosError as exc:
                    chunks.remove(chunk)
                    self._finish(chunk.seq, "error", error=exc)
        if not chunks:
            return
        items = [BatchItem(_slot(c.seq), c.tokens, c.start_pos, c.logits) for c in chunks]
        try:
            rows = self.backend.decode(items)
        except (LlmosError, ValueError) as exc:
            log.exception("decode failed for %d sequences", len(chunks))
            error = exc if isinstance(exc, LlmosError) else ModelLoadError(str(exc))
            for chunk in chunks:
                self._finish(chunk.seq, "error", error=error)
            return
        self._stats.steps += 1
        for chunk in chunks:
            seq = chunk.seq
            if seq.aborted or seq.finished:
                continue
            try:
                self._advance(seq, chunk, rows.get(_slot(seq), []))
            except LlmosError as exc:
                self._finish(seq, "error", error=exc)
        seconds = time.perf_counter() - started
        self.scheduler.record_step(sum(len(c.tokens) for c in chunks), seconds)
        if self.step_listener is not None:
            self.step_listener(StepStats(len(chunks), len(items), seconds))

    def _advance(self, seq: Sequence, chunk: Chunk, rows: list[int]) -> None:
        request = seq.request
        state = seq.state
        output = GenerationOutput(request.request_id, prompt_tokens=seq.prompt_len)
        if seq.prefilling:
            if request.prompt_logprobs:
                output.prompt_logprobs = self._prompt_logprobs(seq, chunk, rows)
            seq.prompt_done += len(chunk.tokens)
            seq.position = seq.prompt_done
            self._stats.prompt_tokens += len(chunk.tokens)
            if not chunk.samples:
                if output.prompt_logprobs:
                    self._push(seq, output)
                return
            if seq.replay is not None:  # recomputed after a preemption
                seq.replay = None
                if seq.pending is not None:
                    return  # its next token was already chosen; decoding resumes with it next step
            if "sampler" not in state:
                self._start_generation(seq)
        else:
            seq.position += 1
        if state["limit"] == 0:
            self._emit_finish(seq, output, "length")
            return
        row = rows[-1]
        token = state["sampler"].sample(row)
        if "first_token_at" not in state:
            state["first_token_at"] = time.monotonic()
        if self.backend.is_end_of_generation(token):
            self._emit_finish(seq, output, "stop")
            return
        seq.generated.append(token)
        self._stats.generated_tokens += 1
        output.token_ids = [token]
        if request.logprobs is not None:
            output.logprobs = [self._logprob(row, token, request.logprobs)]
        stops: StopMatcher = state["stops"]
        output.text = stops.feed(state["decoder"].feed(self.backend.token_bytes(token)))
        if stops.stopped:
            self._emit_finish(seq, output, "stop")
        elif len(seq.generated) >= state["limit"]:
            self._emit_finish(seq, output, "length")
        else:
            seq.pending = token
            output.completion_tokens = len(seq.generated)
            self._push(seq, output)

    def _start_generation(self, seq: Sequence) -> None:
        request = seq.request
        seq.state["limit"] = min(request.params.max_tokens, self.max_context - seq.prompt_len)
        seq.state["decoder"] = IncrementalDecoder()
        seq.state["stops"] = StopMatcher(request.params.stop)
        seq.state["sampler"] = self.backend.new_sampler(request.params, request.grammar)

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

    def _emit_finish(self, seq: Sequence, output: GenerationOutput, reason: FinishReason) -> None:
        if reason != "stop" or not seq.state["stops"].stopped:
            tail = seq.state["stops"].feed(seq.state["decoder"].flush()) + seq.state["stops"].flush()
            output.text += tail
        self._finish(seq, reason, output=output)

    def _finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        *,
        output: GenerationOutput | None = None,
        error: LlmosError | None = None,
        notify_scheduler: bool = True,
    ) -> None:
        if notify_scheduler:
            with self._lock:
                self.scheduler.finish(seq)
        seq.finished = True
        if seq.slot is not None:
            self.backend.forget_sequence(seq.slot)
        sampler = seq.state.pop("sampler", None)
        if sampler is not None:
            sampler.close()
        final = output or GenerationOutput(seq.request_id, prompt_tokens=seq.prompt_len)
        final.finished = True
        final.finish_reason = reason
        final.error = error
        final.completion_tokens = len(seq.generated)
        self._stats.finished[reason] = self._stats.finished.get(reason, 0) + 1
        self._push(seq, final)

    def _push(self, seq: Sequence, output: GenerationOutput) -> None:
        stream: OutputStream = seq.state["stream"]
        output.admitted_at = seq.state.get("admitted_at")
        if self._outbox is not None and threading.current_thread() is self._thread:
            self._outbox.append((stream, output))
        else:
            stream.push(output)
