"""A call that ends early is charged for every token the engine generated for it, read or not (real engine)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import anyio

from llmos.api.generation import Call
from llmos.engine.backends.fake import FakeBackend
from llmos.engine.core import EngineCore
from llmos.engine.request import GenerationRequest
from llmos.engine.streams import AsyncOutputStream
from llmos.observability.metrics import Metrics
from llmos.types import SamplingParams


class Recorder:
    """Stands in for the quota and usage metering: what the call settles with."""

    def __init__(self) -> None:
        self.settled: list[tuple[str, int, int, int]] = []
        self.caller = SimpleNamespace(tenant="acme")

    def finish(self, model: str, prompt_tokens: int, completion_tokens: int, status: int = 200) -> None:
        self.settled.append((model, prompt_tokens, completion_tokens, status))


class Lease:
    released = 0

    def release(self, keep_alive: float | None = None) -> None:
        self.released += 1


def run(consume: Callable[[Call], Awaitable[int]], choices: int = 1) -> tuple[Recorder, int, int, Lease]:
    """Submit ``choices`` long generations, let ``consume`` stop early; (metering, tokens read, generated, lease)."""
    engine = EngineCore(FakeBackend(step_delay=0.01))
    lease = Lease()
    recorder = Recorder()

    async def scenario() -> int:
        target: Any = SimpleNamespace(name="bot:prod", model=SimpleNamespace(engine=engine), release=lease.release)
        requests = [GenerationRequest([65, 66], SamplingParams(max_tokens=200)) for _ in range(choices)]
        streams = [AsyncOutputStream() for _ in requests]
        for request, stream in zip(requests, streams, strict=True):
            engine.submit(request, stream)
        metering: Any = recorder
        call = Call(target, requests, streams, Metrics(), time.monotonic(), metering=metering, prompt_tokens=2)
        return await consume(call)

    try:
        read = asyncio.run(scenario())
        return recorder, read, engine.stats().generated_tokens, lease
    finally:
        engine.shutdown()


def test_a_consumer_that_stops_reading_pays_for_the_tokens_generated_meanwhile() -> None:
    async def read_one_then_stop(call: Call) -> int:
        outputs = call.outputs()
        _index, first = await outputs.__anext__()
        await asyncio.sleep(0.3)  # the engine goes on generating; nobody reads
        await outputs.aclose()  # the client went away
        return len(first.token_ids)

    recorder, read, generated, lease = run(read_one_then_stop)
    [(model, prompt, completion, status)] = recorder.settled
    assert (model, prompt, status) == ("bot:prod", 2, 499) and lease.released == 1
    assert completion == generated > read + 5  # the unread tokens too, and the abort's final count


def test_a_cancelled_consumer_is_settled_with_the_engines_count() -> None:
    """As when the server cancels a streaming response on disconnect: the count is awaited despite the cancel."""

    async def cancel_midway(call: Call) -> int:
        read = 0
        with anyio.move_on_after(0.3):
            async for _index, output in call.outputs():
                read += len(output.token_ids)
        return read

    recorder, read, generated, _lease = run(cancel_midway, choices=2)
    [(_model, _prompt, completion, status)] = recorder.settled
    assert status == 499 and completion == generated >= read > 0
