"""Hand generation events from the engine thread to their consumer.

Contract: the engine hands events over with :func:`deliver` (or :meth:`OutputStream.push`) from its own thread and
never blocks doing so. An :class:`AsyncOutputStream` delivers events to an asyncio task (``async for``); a
:class:`SyncOutputStream` to a plain thread (``for``). :func:`deliver` wakes each event loop once for a whole step's
events rather than once per event. Iteration ends after the event with ``finished=True``; an event carrying an
error raises it in the consumer after any text already delivered.
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

    def push(self, output: GenerationOutput) -> None:
        with contextlib.suppress(RuntimeError):  # the consumer's loop is closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, output)

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
        stream.queue.put_nowait(output)


def deliver(items: list[tuple[OutputStream, GenerationOutput]]) -> None:
    """Hand over one step's events: one wake-up per event loop, plain pushes for everything else."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[AsyncOutputStream, GenerationOutput]]] = {}
    for stream, output in items:
        if isinstance(stream, AsyncOutputStream):
            by_loop.setdefault(stream.loop, []).append((stream, output))
        else:
            stream.push(output)
    for loop, batch in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            loop.call_soon_threadsafe(_put_all, batch)
