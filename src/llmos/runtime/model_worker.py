"""Inside a model process: load one model instance and serve it over the channel to the server.

Contract (the child side of :mod:`llmos.runtime.model_process`):

* :func:`preload` imports a backend's libraries (the zygote calls it once, before forking; for llama.cpp it also
  settles the CPU path and reports its verdict).
* :func:`serve` reads ``("load", LoadSpec)``, loads the instance with the ordinary
  :class:`~llmos.runtime.loader.Loader` (engine, backend, sampling, detokenization all live here), answers
  ``("ready", info)`` or ``("failed", error)``, then serves until the server says ``("shutdown",)`` or its socket
  closes (the server died): then the process exits at once, whatever it was doing.
* Messages in: ``("submit", GenerationRequest)``, ``("abort", request_id)``, ``("call", id, method, args)`` (one of
  :data:`CALLS`, run on a small thread pool so that a long tokenization never delays an abort). Messages out:
  ``("outputs", [GenerationOutput], errors, steps)`` once per engine step with every sequence's new events (errors
  as :func:`~llmos.runtime.channel.portable_error` by index, and the steps' statistics for metrics),
  ``("reply", id, ok, value)``, and ``("alive",)`` after a second without any other message (the server's hang
  detector).
* The process writes no core dumps. Test hook: ``LLMOS_TEST_MODEL_FAULT=SIGNAL@first-decode`` (``SIGILL``,
  ``SIGSEGV``, ``abort``...) kills the process with that signal (``abort``: the C library's ``abort()``) just before
  its first decode while llama.cpp's extra buffer types are on, as a faulting CPU kernel would.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import signal
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from llmos.config import Settings
from llmos.engine.core import StepStats
from llmos.engine.request import GenerationOutput, GenerationRequest
from llmos.engine.streams import BatchSink, SinkStream
from llmos.errors import LlmosError, ModelLoadError
from llmos.registry.service import Registry, ResolvedModel
from llmos.runtime.channel import Channel, portable_error
from llmos.runtime.memory import process_rss

log = logging.getLogger("llmos.runtime")

FAULT_HOOK = "LLMOS_TEST_MODEL_FAULT"
HEARTBEAT_SECONDS = 1.0


@dataclass
class LoadSpec:
    """What a model process loads: the version, its files' directory, the backend and its limits."""

    resolved: ResolvedModel
    backend: str
    directory: Path
    max_running: int
    safe_path_reason: str | None = None
    """Set: run llama.cpp without extra buffer types (the fast path faulted in this model's last process)."""


def preload(backend: str, settings: Settings) -> dict[str, Any]:
    """Import ``backend``'s libraries into this process (the zygote of that backend's family, before it forks;
    sentence-transformers models fork from the torch zygote and import the rest themselves)."""
    from llmos.runtime.loader import import_backend

    import_backend(backend, settings)
    info: dict[str, Any] = {}
    if backend == "llama.cpp":
        from llmos.engine.backends import llamacpp_path

        verdict = llamacpp_path.chosen()
        info["llamacpp"] = verdict.to_json() if verdict is not None else None
    return info


class _Sink(BatchSink):
    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.steps: list[StepStats] = []
        self._lock = threading.Lock()

    def on_step(self, _name: str, stats: StepStats) -> None:
        with self._lock:
            self.steps.append(stats)

    def _take_steps(self) -> list[StepStats]:
        with self._lock:
            steps, self.steps = self.steps, []
        return steps

    def put_all(self, outputs: list[GenerationOutput]) -> None:
        errors = {}
        for index, output in enumerate(outputs):
            if output.error is not None:
                errors[index] = portable_error(output.error)
                output.error = None
        self.channel.send(("outputs", outputs, errors, self._take_steps()))

    def heartbeat(self) -> None:
        steps = self._take_steps()
        self.channel.send(("outputs", [], {}, steps) if steps else ("alive",))


def _install_fault(backend: Any, spec: LoadSpec) -> None:
    """The test hook of the module docstring: die like a faulting kernel before the first fast-path decode."""
    hook = os.environ.get(FAULT_HOOK, "")
    what, _, when = hook.partition("@")
    if not what or when != "first-decode" or spec.backend != "llama.cpp" or spec.safe_path_reason:
        return
    original = backend.decode

    def faulting_decode(items: Any) -> Any:
        if what == "abort":
            ctypes.CDLL(None).abort()
        os.kill(os.getpid(), signal.Signals[what])
        return original(items)

    backend.decode = faulting_decode


CALLS: dict[str, Callable[..., Any]] = {
    "tokenize": lambda m, text, add, parse: m.backend.tokenize(text, add_special=add, parse_special=parse),
    "detokenize": lambda m, tokens: m.backend.detokenize(tokens),
    "token_bytes": lambda m, token: m.backend.token_bytes(token),
    "stats": lambda m: m.engine.stats(),
    "add_adapter": lambda m, name, directory: m.backend.add_adapter(name, Path(directory)),
    "embed": lambda m, texts: m.embed(texts),
    "count_tokens": lambda m, texts: m.count_tokens(texts),
    "truncate": lambda m, texts: m.truncate(texts),
    "decode": lambda m, tokens: m.decode(tokens),
}


def _load(spec: LoadSpec, settings: Settings, sink: _Sink) -> tuple[Any, dict[str, Any]]:
    from llmos.runtime.loader import Loader

    if spec.safe_path_reason is not None:
        from llmos.engine.backends import llamacpp_path

        llamacpp_path.use_safe_path(spec.safe_path_reason)
    before = process_rss()
    loader = Loader(settings, cast(Registry, None), max_running=spec.max_running, step_listener=sink.on_step)
    instance = loader.load_from(spec.resolved, spec.backend, spec.directory)
    info: dict[str, Any] = {"pid": os.getpid(), "load_bytes": max(process_rss() - before, 0), "kind": instance.kind}
    if instance.kind == "embed":
        info.update(max_tokens=instance.max_tokens, dimension=instance.dimension, backend_name=instance.backend_name)
        return instance, info
    backend = instance.backend
    _install_fault(backend, spec)
    info.update(
        n_vocab=backend.n_vocab,
        n_seq_max=backend.n_seq_max,
        max_context=instance.engine.max_context,
        backend_name=instance.backend_name,
        adapters=hasattr(backend, "add_adapter"),
        capacity=backend.n_seq_max + settings.max_waiting,  # running plus waiting: more is refused (503)
    )
    if spec.backend == "llama.cpp":
        from llmos.engine.backends import llamacpp_path

        verdict = llamacpp_path.chosen()
        info["extra_buffers"] = bool(verdict and verdict.extra_buffers)
    return instance, info


def serve(sock: socket.socket, settings: Settings) -> int:
    """Run a model process on ``sock`` until told to stop or the server goes away; returns the exit code."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    channel = Channel(sock)
    message = channel.recv()
    if message is None or message[0] != "load":
        return 0
    spec: LoadSpec = message[1]
    sink = _Sink(channel)
    try:
        instance, info = _load(spec, settings, sink)
    except LlmosError as exc:
        channel.send(("failed", portable_error(exc)))
        return 1
    except Exception as exc:
        log.exception("loading %s failed", spec.resolved.view.name)
        channel.send(("failed", portable_error(ModelLoadError(f"{type(exc).__name__}: {exc}"))))
        return 1
    channel.send(("ready", info))
    calls = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llmos-call")

    def run_call(call_id: int, method: str, args: tuple[Any, ...]) -> None:
        try:
            channel.send(("reply", call_id, True, CALLS[method](instance, *args)))
        except LlmosError as exc:
            channel.send(("reply", call_id, False, portable_error(exc)))
        except Exception as exc:
            log.exception("call %s failed", method)
            channel.send(("reply", call_id, False, portable_error(ModelLoadError(f"{type(exc).__name__}: {exc}"))))

    while True:
        try:
            message = channel.recv(timeout=HEARTBEAT_SECONDS)
        except TimeoutError:
            sink.heartbeat()
            continue
        if message is None:  # the server is gone: exit now, without waiting for anything
            os._exit(0)
        kind = message[0]
        if kind == "submit":
            request: GenerationRequest = message[1]
            try:
                instance.engine.submit(request, SinkStream(sink))
            except LlmosError as exc:
                failed = GenerationOutput(request.request_id, finished=True, finish_reason="error", error=exc)
                sink.put_all([failed])
        elif kind == "abort":
            instance.engine.abort(message[1])
        elif kind == "call":
            calls.submit(run_call, message[1], message[2], message[3])
        elif kind == "shutdown":
            instance.close()
            return 0
