"""Hand generation events from the engine thread to their consumer.

Contract: the engine hands events over with :func:`deliver` (or :meth:`OutputStream.push`) from its own thread and
never blocks doing so. A :class:`SinkStream` hands them to a :class:`BatchSink` shared by many requests, all of a
step's events in one call. An :class:`AsyncOutputStream` delivers events to an asyncio task (``async for``); a
:class:`SyncOutputStream` to a plain thread (``for``). :func:`deliver` wakes each event loop once for a whole step's
events rather than once per event. Iteration ends after the event with ``finished=True``; an event carrying an
error raises it in the consumer after any text already delivered. An :class:`AsyncOutputStream` also keeps, as events
arrive and whether or not anyone reads them, the completion tokens the engine reports having produced
(:attr:`~AsyncOutputStream.produced`), so a consumer that stopped reading can still wait for the final count
(:meth:`~AsyncOutputStream.ended`) and charge for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
from collections.abc import AsyncIterator, Iterator

from llmos.engine.request import GenerationOutput


class OutputStream:
    def push(self, output: GenerationOutput) -> None:
        raise NotImplementedError


class BatchSink:
    """Takes a whole step's events for many requests at once (a model process sends them as one message)."""

    def put_all(self, outputs: list[GenerationOutput]) -> None:
        raise NotImplementedError


class SinkStream(OutputStream):
    """A request's stream whose events go to a shared :class:`BatchSink`, a step's worth at a time."""

    def __init__(self, sink: BatchSink) -> None:
        self.sink = sink

    def push(self, output: GenerationOutput) -> None:
        self.sink.put_all([output])


class SyncOutputStream(OutputStream):
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[GenerationOutput] = queue.SimpleQueue()

    def push(self, output: GenerationOutput) -> None:
        self._queue.put(output)

    def __iter__(self) -> Iterator[GenerationOutput]:
        while True:
            output = self._queue.get()
            if output.error is not None:
                raise output.error
            yield output
            if output.finished:
                return


class AsyncOutputStream(OutputStream):
    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.queue: asyncio.Queue[GenerationOutput] = asyncio.Queue()
        self.produced = 0
        """Completion tokens the engine produced for the request so far (its final count once :meth:`ended`)."""
        self._ended = asyncio.Event()

    def push(self, output: GenerationOutput) -> None:
        with contextlib.suppress(RuntimeError):  # the consumer's loop is closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self._put, output)

    def _put(self, output: GenerationOutput) -> None:
        """On the consumer's loop: count the tokens, then queue the event."""
        self.produced = max(self.produced, output.completion_tokens)  # the engine reports a running total
        if output.finished:
            self._ended.set()
        self.queue.put_nowait(output)

    @property
    def finished(self) -> bool:
        """Whether the final event arrived (read or not)."""
        return self._ended.is_set()

    async def ended(self) -> None:
        """Wait for the final event (after an abort, the engine sends it within a step)."""
        await self._ended.wait()

    async def __aiter__(self) -> AsyncIterator[GenerationOutput]:
        while True:
            output = await self.queue.get()
            if output.error is not None:
                raise output.error
            yield output
            if output.finished:
                return


def _put_all(items: list[tuple[AsyncOutputStream, GenerationOutput]]) -> None:
    for stream, output in items:
        stream._put(output)


def deliver(items: list[tuple[OutputStream, GenerationOutput]]) -> None:
    """Hand over one step's events: one wake-up per event loop, plain pushes for everything else."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[AsyncOutputStream, GenerationOutput]]] = {}
    by_sink: dict[BatchSink, list[GenerationOutput]] = {}
    for stream, output in items:
        if isinstance(stream, AsyncOutputStream):
            by_loop.setdefault(stream.loop, []).append((stream, output))
        elif isinstance(stream, SinkStream):
            by_sink.setdefault(stream.sink, []).append(output)
        else:
            stream.push(output)
    for sink, outputs in by_sink.items():
        sink.put_all(outputs)
    for loop, batch in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            loop.call_soon_threadsafe(_put_all, batch)
