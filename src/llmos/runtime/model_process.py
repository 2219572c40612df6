"""A model instance in its own OS process, as the server sees it (the child side is
:mod:`llmos.runtime.model_worker`).

Contract:

* :func:`start` forks a model process from the backend's zygote (:class:`~llmos.runtime.launcher.Launcher`), has it
  load the version and returns a :class:`~llmos.runtime.model.LoadedModel` whose ``engine`` is a
  :class:`ProcessEngine` and ``backend`` a :class:`ProcessBackend` (or a :class:`ProcessEmbedding`): the API uses it
  exactly as an in-process model. A process that dies or fails while loading is a
  :class:`~llmos.errors.ModelLoadError` naming how it ended and its last log line.
* One socket per process carries everything: requests and aborts in, one message per engine step with every
  sequence's new events out (delivered with one wake-up per event loop), and calls (tokenize, stats, adapters,
  embeddings) with their replies.
* **Supervision**: when the process dies (any signal, an OOM kill, a native abort) or sends nothing for
  ``model_process_timeout_seconds`` (it is then killed), every request in flight on it ends at once with a
  :class:`~llmos.errors.ModelCrashedError` event (streams get their final error, never a hang), pending calls fail,
  ``alive`` turns False and the :class:`~llmos.runtime.failures.ModelFailure` (signal or exit code, last log lines)
  goes to ``on_failure``. Who restarts it: the residency manager on the next request, or the replica set.
* **The safe CPU path**: a llama.cpp process with extra buffer types on that dies before its first decode completed
  is restarted once, at once, without them, and the requests it held (which had produced nothing) are resubmitted
  to it; ``on_failure`` gets that failure with ``recovered`` set.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from llmos.engine.backends.base import Backend
from llmos.engine.core import EngineCore, EngineStats, StepStats
from llmos.engine.request import GenerationOutput, GenerationRequest
from llmos.engine.streams import OutputStream, deliver
from llmos.errors import EngineStoppedError, LlmosError, ModelCrashedError, ModelLoadError, OverloadedError
from llmos.registry.views import VersionView
from llmos.runtime.channel import rebuild_error
from llmos.runtime.failures import ModelFailure
from llmos.runtime.launcher import Launcher, Spawned, describe_exit, log_tail
from llmos.runtime.model import LoadedModel
from llmos.runtime.model_worker import LoadSpec
from llmos.runtime.remote import BackendClient, EngineClient

log = logging.getLogger("llmos.runtime")

CALL_SECONDS = 120.0
SHUTDOWN_SECONDS = 10.0
Respawn = Callable[[str], tuple[Spawned, dict[str, Any]]]
"""Start a replacement process on llama.cpp's safe CPU path (the argument says why)."""


def load(launcher: Launcher, spec: LoadSpec, label: str, timeout: float) -> tuple[Spawned, dict[str, Any]]:
    """Fork a model process for ``spec`` and wait until it has loaded (or failed to)."""
    spawned = launcher.spawn(spec.backend, label)
    try:
        spawned.channel.send(("load", spec))
        message = spawned.channel.recv(timeout=timeout)
    except TimeoutError:
        message = ("timeout",)
    except OSError:
        message = None
    if message is not None and message[0] == "ready":
        return spawned, message[1]
    spawned.channel.close()
    if message is not None and message[0] == "timeout":
        with contextlib.suppress(ProcessLookupError):
            os.kill(spawned.pid, signal.SIGKILL)
        raise ModelLoadError(f"its model process did not finish loading within {timeout:.0f} s")
    if message is not None and message[0] == "failed":
        raise rebuild_error(*message[1])
    words, _, _ = describe_exit(launcher.exit_status(spawned.pid))
    tail = log_tail(spawned.log_path, 1)
    raise ModelLoadError(f"its model process {words} while loading" + (f": {tail[-1]}" if tail else ""))


@dataclass
class _InFlight:
    request: GenerationRequest
    stream: OutputStream
    produced: bool = False


@dataclass
class _Hooks:
    on_step: Callable[[StepStats], None] | None = None
    on_failure: Callable[[ModelFailure], None] | None = None
    respawn: Respawn | None = None


class ProcessEngine(EngineClient):
    def __init__(
        self,
        name: str,
        launcher: Launcher,
        spawned: Spawned,
        info: dict[str, Any],
        *,
        hang_seconds: float,
        on_step: Callable[[StepStats], None] | None = None,
        on_failure: Callable[[ModelFailure], None] | None = None,
        respawn: Respawn | None = None,
    ) -> None:
        super().__init__(name, int(info.get("max_context", info.get("max_tokens", 0))))
        self.launcher = launcher
        self.hang_seconds = hang_seconds
        self.hooks = _Hooks(on_step, on_failure, respawn)
        self.failure: ModelFailure | None = None
        self._lock = threading.Lock()
        self._streams: dict[str, _InFlight] = {}
        self._calls: dict[int, Future[Any]] = {}
        self._call_ids = itertools.count(1)
        self._respawning = False
        self._safe_retried = False
        self._attach(spawned, info)

    def _attach(self, spawned: Spawned, info: dict[str, Any]) -> None:
        self.process = spawned
        self.info = info
        self.started = time.monotonic()
        self.decoded = False
        self._receiver = threading.Thread(
            target=self._receive, args=(spawned,), name=f"llmos-model-{spawned.pid}", daemon=True
        )
        self._receiver.start()

    # --- what the API calls -----------------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def resident_bytes(self) -> int:
        """What loading the model added to its process's memory."""
        return int(self.info.get("load_bytes", 0))

    @property
    def outstanding(self) -> int:
        return len(self._streams)

    def _gone(self) -> LlmosError:
        if self.crashed is not None:
            return ModelCrashedError(f"the model process of {self.name} died ({self.crashed}); retry the request")
        return EngineStoppedError(f"the engine for {self.name} is shutting down")

    def submit(self, request: GenerationRequest, stream: OutputStream) -> None:
        self.check_request(request)
        with self._lock:
            if not self.alive:
                raise self._gone()
            capacity = int(self.info.get("capacity", 0))
            if capacity and len(self._streams) >= capacity:  # refused here, as the engine would, but synchronously
                slots = int(self.info.get("n_seq_max", 0))
                raise OverloadedError(
                    f"the server is at capacity ({slots} running, {len(self._streams) - slots} waiting); retry shortly",
                    retry_after=1.0,
                )
            self._streams[request.request_id] = _InFlight(request, stream)
            if self._respawning:  # sent once the replacement is up
                return
            channel = self.process.channel
        with contextlib.suppress(OSError):  # it just died: the receiver fails this request with the others
            channel.send(("submit", request))

    def abort(self, request_id: str) -> None:
        if self.alive:
            with contextlib.suppress(OSError):
                self.process.channel.send(("abort", request_id))

    def call(self, method: str, *args: Any, timeout: float = CALL_SECONDS) -> Any:
        """Run ``method`` (see :data:`~llmos.runtime.model_worker.CALLS`) in the model process; its result."""
        future: Future[Any] = Future()
        with self._lock:
            if not self.alive:
                raise self._gone()
            call_id = next(self._call_ids)
            self._calls[call_id] = future
            channel = self.process.channel
        with contextlib.suppress(OSError):
            channel.send(("call", call_id, method, args))
        try:
            return future.result(timeout)
        except FutureTimeout:
            with self._lock:
                self._calls.pop(call_id, None)
            why = f"the model process of {self.name} did not answer within {timeout:.0f} s"
            raise EngineStoppedError(why) from None

    def stats(self) -> EngineStats:
        if not self.alive:
            return EngineStats()
        try:
            return cast(EngineStats, self.call("stats", timeout=5))
        except LlmosError:
            return EngineStats()

    def shutdown(self, timeout: float = SHUTDOWN_SECONDS) -> None:
        with self._lock:
            already = self._closed
            self._closed = True
            process = self.process
        if already or self.crashed is not None:  # a dead process was reaped when its socket closed
            return
        with contextlib.suppress(OSError):
            process.channel.send(("shutdown",))
        self._receiver.join(timeout)  # it ends when the process closes its socket, that is when the process exits
        if self._receiver.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            self._receiver.join(5)

    # --- the receiving thread ---------------------------------------------------------------------------------------

    def _receive(self, spawned: Spawned) -> None:
        hung = False
        while True:
            try:
                message = spawned.channel.recv(timeout=self.hang_seconds)
            except TimeoutError:
                if not hung:
                    hung = True
                    log.error("the model process of %s (pid %d) sent nothing for %.0f s; killing it",
                              self.name, spawned.pid, self.hang_seconds)  # fmt: skip
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(spawned.pid, signal.SIGKILL)
                continue
            if message is None:
                break
            kind = message[0]
            if kind == "outputs":
                self._on_outputs(message[1], message[2], message[3])
            elif kind == "reply":
                with self._lock:
                    future = self._calls.pop(message[1], None)
                if future is not None:
                    future.set_result(message[3]) if message[2] else future.set_exception(rebuild_error(*message[3]))
        self._ended(spawned, hung)

    def _on_outputs(self, outputs: list[GenerationOutput], errors: dict[int, Any], steps: list[StepStats]) -> None:
        if steps:
            self.decoded = True
            if self.hooks.on_step is not None:
                for step in steps:
                    self.hooks.on_step(step)
        batch: list[tuple[OutputStream, GenerationOutput]] = []
        with self._lock:
            for index, output in enumerate(outputs):
                if index in errors:
                    output.error = rebuild_error(*errors[index])
                request_id = output.request_id
                entry = self._streams.pop(request_id, None) if output.finished else self._streams.get(request_id)
                if entry is None:
                    continue
                entry.produced = entry.produced or bool(output.token_ids or output.text)
                batch.append((entry.stream, output))
        deliver(batch)

    def _ended(self, spawned: Spawned, hung: bool) -> None:
        spawned.channel.close()
        if self._closed:  # shut down on purpose: whatever is left just stops
            self._fail_everything(EngineStoppedError(f"the engine for {self.name} stopped"))
            return
        words, signal_name, exit_code = describe_exit(self.launcher.exit_status(spawned.pid))
        reason = f"stopped answering for {self.hang_seconds:.0f} s and was killed" if hung else words
        failure = ModelFailure(
            self.name, spawned.pid, reason, signal_name, exit_code, log_tail(spawned.log_path),
            time.monotonic() - self.started,
        )  # fmt: skip
        log.error("the model process of %s (pid %d) %s; its last log lines:\n%s",
                  self.name, spawned.pid, reason, "\n".join(failure.log_tail) or "(none)")  # fmt: skip
        if self._retry_on_safe_path(failure):
            return
        with self._lock:
            self.failure = failure
            self.crashed = reason
        if self.hooks.on_failure is not None:
            self.hooks.on_failure(failure)
        self._fail_everything(self._gone())

    def _retry_on_safe_path(self, failure: ModelFailure) -> bool:
        """Restart once without extra buffer types if the fast path died before its first decode completed."""
        respawn = self.hooks.respawn
        with self._lock:
            eligible = (
                respawn is not None and not self.decoded and not self._safe_retried and bool(self._streams)
                and bool(self.info.get("extra_buffers"))
            )  # fmt: skip
            if not eligible:
                return False
            self._safe_retried = True
            self._respawning = True
        assert respawn is not None
        why = (
            f"a model process of {self.name} was {failure.reason} on its first decode with llama.cpp's extra buffer"
            " types on; llmos runs the safe path (extra buffer types off) since"
        )
        failure.recovered = why
        self._fail_calls(self._gone_for_now())
        try:
            spawned, info = respawn(why)
        except LlmosError as exc:
            log.error("restarting %s on the safe CPU path failed: %s", self.name, exc.message)
            with self._lock:
                self._respawning = False
            failure.recovered = None
            return False
        log.warning("%s: %s; its %d request(s) were resubmitted", self.name, why, len(self._streams))
        if self.hooks.on_failure is not None:
            self.hooks.on_failure(failure)
        with self._lock:
            self._attach(spawned, info)
            self._respawning = False
            requests = [entry.request for entry in self._streams.values()]
        for request in requests:
            with contextlib.suppress(OSError):
                spawned.channel.send(("submit", request))
        return True

    def _gone_for_now(self) -> LlmosError:
        return EngineStoppedError(f"the model process of {self.name} is restarting; retry")

    def _fail_calls(self, error: LlmosError) -> None:
        with self._lock:
            calls, self._calls = self._calls, {}
        for future in calls.values():
            future.set_exception(error)

    def _fail_everything(self, error: LlmosError) -> None:
        self._fail_calls(error)
        with self._lock:
            streams, self._streams = self._streams, {}
        deliver(
            [
                (entry.stream, GenerationOutput(entry.request.request_id, finished=True, finish_reason="error",
                                                error=error, prompt_tokens=len(entry.request.prompt_tokens)))
                for entry in streams.values()
            ]
        )  # fmt: skip


class ProcessBackend(BackendClient):
    """The backend as the API sees it: fields from the process's load report, tokenization by call."""

    def __init__(self, engine: ProcessEngine, info: dict[str, Any]) -> None:
        super().__init__(info, info["backend_name"])
        self._engine = engine
        self.adapters: dict[str, bool] = {}
        if info.get("adapters"):
            self.add_adapter = self._add_adapter

    def _call(self, method: str, *args: Any) -> Any:
        return self._engine.call(method, *args)

    def _add_adapter(self, name: str, directory: Path) -> None:
        self._engine.call("add_adapter", name, str(directory), timeout=600)
        self.adapters[name] = True


class ProcessEmbedding:
    """A sentence-embedding model in its own process: the methods of
    :class:`~llmos.runtime.embedding.EmbeddingModel`, by call."""

    kind = "embed"

    def __init__(self, view: VersionView, engine: ProcessEngine, info: dict[str, Any]) -> None:
        self.view = view
        self.engine = engine
        self.max_tokens: int = info["max_tokens"]
        self.dimension: int = info["dimension"]
        self.backend_name: str = info.get("backend_name", "sentence-transformers")

    @property
    def name(self) -> str:
        return self.view.name

    @property
    def alive(self) -> bool:
        return self.engine.alive

    @property
    def resident_bytes(self) -> int:
        return self.engine.resident_bytes

    def count_tokens(self, texts: list[str]) -> list[int]:
        return cast(list[int], self.engine.call("count_tokens", texts))

    def truncate(self, texts: list[str]) -> list[str]:
        return cast(list[str], self.engine.call("truncate", texts))

    def decode(self, tokens: list[int]) -> str:
        return cast(str, self.engine.call("decode", tokens))

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        return cast(tuple[np.ndarray, int], self.engine.call("embed", texts, timeout=600))

    def close(self) -> None:
        self.engine.shutdown()


@dataclass
class ProcessOptions:
    launcher: Launcher
    hang_seconds: float
    load_seconds: float
    on_step: Callable[[str, StepStats], None] | None = None
    on_failure: Callable[[ModelFailure], None] | None = None
    labels: itertools.count[int] = field(default_factory=lambda: itertools.count(1))


def start(options: ProcessOptions, spec: LoadSpec, respawn: Respawn | None) -> Any:
    """A :class:`LoadedModel` (or :class:`ProcessEmbedding`) for ``spec``, running in a new model process."""
    view = spec.resolved.view
    spawned, info = load(options.launcher, spec, view.name, options.load_seconds)
    on_step = options.on_step
    engine = ProcessEngine(
        view.name,
        options.launcher,
        spawned,
        info,
        hang_seconds=options.hang_seconds,
        on_step=(lambda stats: on_step(view.name, stats)) if on_step is not None else None,
        on_failure=options.on_failure,
        respawn=respawn,
    )
    if info.get("kind") == "embed":
        return ProcessEmbedding(view, engine, info)
    return LoadedModel(view, cast(Backend, ProcessBackend(engine, info)), cast(EngineCore, engine))
