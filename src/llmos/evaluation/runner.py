"""Submitting many evaluation requests to a loaded model's engine at once and collecting what comes back.

Contract: :func:`run_requests` hands every request to the engine (low priority, so a shared engine serves
interactive requests first) keeping as many outstanding as the engine's queue accepts, so the scheduler always has
the next ones ready to batch; results come back in request order as :class:`Collected` (the text, the number of
generated tokens, the prompt's logprobs when asked for, the finish reason). ``progress(done, total)`` is called as
requests finish; whatever it raises (a cancellation) stops the run, and the requests still in the engine are
aborted. The first failed request fails the run with its error.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from llmos.engine.request import GenerationRequest, Logprob
from llmos.engine.streams import SyncOutputStream
from llmos.errors import LlmosError, OverloadedError
from llmos.runtime.model import LoadedModel

Progress = Callable[[int, int], None]


@dataclass
class Collected:
    text: str = ""
    completion_tokens: int = 0
    prompt_tokens: int = 0
    prompt_logprobs: list[Logprob] = field(default_factory=list)
    finish_reason: str | None = None


def _collect(stream: SyncOutputStream) -> Collected:
    result = Collected()
    parts: list[str] = []
    for output in stream:  # raises the request's error, if it failed
        parts.append(output.text)
        if output.prompt_logprobs:
            result.prompt_logprobs.extend(output.prompt_logprobs)
        if output.finished:
            result.finish_reason = output.finish_reason
            result.completion_tokens = output.completion_tokens
            result.prompt_tokens = output.prompt_tokens
    result.text = "".join(parts)
    return result


def run_requests(
    model: LoadedModel,
    requests: Sequence[GenerationRequest],
    progress: Progress | None = None,
    adapter: str | None = None,
) -> list[Collected]:
    """Run ``requests`` (at most the engine's queue limit in flight), applying ``adapter`` (a LoRA adapter loaded on
    the backend) to those that name none; the collected outputs come back in request order."""
    if adapter is not None:
        requests = [r if r.adapter else dataclasses.replace(r, adapter=adapter) for r in requests]
    engine = model.engine
    limit = max(1, engine.scheduler.config.max_waiting)
    pending: deque[tuple[GenerationRequest, SyncOutputStream]] = deque()
    results: list[Collected] = []
    queue = deque(requests)
    try:
        while queue or pending:
            while queue and len(pending) < limit:
                stream = SyncOutputStream()
                try:
                    engine.submit(queue[0], stream)
                except OverloadedError:
                    if not pending:  # nothing of ours to wait for: the queue is full of others' requests
                        raise
                    break
                pending.append((queue.popleft(), stream))
            _request, stream = pending.popleft()
            try:
                results.append(_collect(stream))
            except LlmosError:
                raise
            except Exception as exc:  # a backend bug surfaces as a plain exception in the stream
                raise LlmosError(str(exc)) from exc
            if progress is not None:
                progress(len(results), len(requests))
    finally:
        for request, _stream in pending:
            engine.abort(request.request_id)
    return results
