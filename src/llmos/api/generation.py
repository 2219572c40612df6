"""Running a set of generation requests for one HTTP call: submit, merge streams, observe, cancel.

Contract: :func:`submit_all` queues every choice of a call on the model's engine before any response byte is sent,
so admission errors (503 with ``Retry-After``) are proper HTTP errors; if one choice is refused the others are
aborted. :class:`Call` then yields ``(choice_index, output)`` pairs as the engine produces them, records time to
first token, inter-token latency, tokens and finish reasons in the metrics, and aborts every unfinished choice if
the consumer goes away (client disconnect) or fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from llmos.engine.request import GenerationOutput, GenerationRequest
from llmos.engine.streams import AsyncOutputStream
from llmos.errors import OverloadedError
from llmos.observability.metrics import Metrics
from llmos.runtime.model import LoadedModel


@dataclass
class Call:
    model: LoadedModel
    requests: list[GenerationRequest]
    streams: list[AsyncOutputStream]
    metrics: Metrics
    arrived: float
    finished: set[int] = field(default_factory=set)

    async def outputs(self) -> AsyncIterator[tuple[int, GenerationOutput]]:
        label = self.model.name
        last_token_at: dict[int, float] = {}
        try:
            async for index, output in self._merged():
                if output.token_ids:
                    previous = last_token_at.get(index)
                    if previous is None:
                        self.metrics.time_to_first_token.labels(label).observe(output.time - self.arrived)
                    else:
                        self.metrics.inter_token_latency.labels(label).observe(output.time - previous)
                    last_token_at[index] = output.time
                if output.finished:
                    self.finished.add(index)
                    self.metrics.finished.labels(label, output.finish_reason or "unknown").inc()
                    self.metrics.completion_tokens.labels(label).inc(output.completion_tokens)
                yield index, output
        finally:
            self.abort_unfinished()

    def abort_unfinished(self) -> None:
        for index, request in enumerate(self.requests):
            if index not in self.finished:
                self.model.engine.abort(request.request_id)
                self.finished.add(index)
                self.metrics.finished.labels(self.model.name, "cancelled").inc()

    async def _merged(self) -> AsyncIterator[tuple[int, GenerationOutput]]:
        if len(self.streams) == 1:
            async for output in self.streams[0]:
                yield 0, output
            return
        queue: asyncio.Queue[tuple[int, GenerationOutput | BaseException | None]] = asyncio.Queue()

        async def pump(index: int, stream: AsyncOutputStream) -> None:
            try:
                async for output in stream:
                    await queue.put((index, output))
            except BaseException as exc:  # re-raised in the consumer
                await queue.put((index, exc))
            finally:
                await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()


def submit_all(
    model: LoadedModel, requests: list[GenerationRequest], metrics: Metrics, *, prompt_tokens: int, arrived: float
) -> Call:
    streams: list[AsyncOutputStream] = []
    submitted: list[GenerationRequest] = []
    try:
        for request in requests:
            stream = AsyncOutputStream()
            model.engine.submit(request, stream)
            streams.append(stream)
            submitted.append(request)
    except OverloadedError:
        metrics.rejected.labels(model.name).inc()
        for request in submitted:
            model.engine.abort(request.request_id)
        raise
    except BaseException:
        for request in submitted:
            model.engine.abort(request.request_id)
        raise
    metrics.prompt_tokens.labels(model.name).inc(prompt_tokens)
    return Call(model, requests, streams, metrics, arrived=arrived)
