"""Starting model processes: one zygote per backend, forked on demand (the server side of
:mod:`llmos.runtime.zygote`).

Contract: :meth:`Launcher.spawn` returns a new model process (pid, the server's end of its
:class:`~llmos.runtime.channel.Channel`, its log file under ``<home>/logs/models``), forked from the backend's zygote,
which is started on first use (:meth:`Launcher.prepare`) and again if it died. :meth:`Launcher.exit_status` waits
(bounded) for the ``os.waitpid`` status of a model process that ended, which the zygote reports; :func:`describe_exit`
turns it into words ("killed by SIGSEGV", "exited with code 1"). :meth:`Launcher.close` ends the zygotes. If the
server dies, the zygotes and the model processes notice their sockets closing and exit: nothing is left behind.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmos.config import Settings
from llmos.errors import ModelLoadError
from llmos.runtime.channel import Channel

log = logging.getLogger("llmos.runtime")

KEPT_EXITS = 256
FAMILIES = {"sentence-transformers": "torch"}
"""Backends that share a zygote: sentence-transformers runs on torch, whose import is the cost worth sharing."""


def family(backend: str) -> str:
    """The zygote a backend's model processes are forked from."""
    return FAMILIES.get(backend, backend)


ZYGOTE_START_SECONDS = 300.0
"""A zygote imports its backend's libraries and, for llama.cpp, may probe the CPU path first (once per machine)."""


@dataclass
class Spawned:
    pid: int
    channel: Channel
    log_path: Path


def describe_exit(status: int | None) -> tuple[str, str | None, int | None]:
    """(words, signal name, exit code) for an ``os.waitpid`` status (None: unknown)."""
    if status is None:
        return "ended (exit status unknown)", None, None
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"killed by {name}", name, None
    code = os.waitstatus_to_exitcode(status)
    return f"exited with code {code}", None, code


def log_tail(path: Path, lines: int = 20, max_bytes: int = 16384) -> list[str]:
    """The last lines of a model process's log (what it printed before it died)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


@dataclass
class _Zygote:
    backend: str
    process: subprocess.Popen[bytes]
    control: socket.socket
    info: dict[str, Any]
    lock: threading.Lock = field(default_factory=threading.Lock)
    cond: threading.Condition = field(default_factory=threading.Condition)
    spawned: dict[int, int] = field(default_factory=dict)
    exited: dict[int, int] = field(default_factory=dict)
    dead: bool = False


class Launcher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log_dir = settings.home / "logs" / "models"
        self._zygotes: dict[str, _Zygote] = {}
        self._lock = threading.Lock()
        self._tokens = itertools.count(1)
        self._closed = False

    def prepare(self, backend: str) -> dict[str, Any]:
        """Start ``backend``'s zygote unless it runs; returns what it reported when ready."""
        return self._zygote(backend).info

    def _zygote(self, backend: str) -> _Zygote:
        backend = family(backend)
        with self._lock:
            zygote = self._zygotes.get(backend)
            if zygote is not None and not zygote.dead and zygote.process.poll() is None:
                return zygote
            zygote = self._start(backend)
            self._zygotes[backend] = zygote
            return zygote

    def _start(self, backend: str) -> _Zygote:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        log_path = self.log_dir / f"zygote-{backend.replace('.', '')}.log"
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "llmos.runtime.zygote", backend, str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        theirs.close()
        ours.send(pickle.dumps(("settings", self.settings)))
        ours.settimeout(ZYGOTE_START_SECONDS)
        try:
            packet = ours.recv(1 << 20)
        except TimeoutError:
            packet = b""
        ours.settimeout(None)
        message: tuple[Any, ...] = ("failed", "the zygote exited while starting")
        if packet:
            message = pickle.loads(packet)  # noqa: S301 - our own zygote
        if message[0] != "ready":
            process.kill()
            process.wait()
            ours.close()
            raise ModelLoadError(f"the {backend} backend cannot start: {message[1]} (see {log_path})")
        zygote = _Zygote(backend, process, ours, dict(message[1]))
        threading.Thread(target=self._listen, args=(zygote,), name=f"llmos-zygote-{backend}", daemon=True).start()
        log.info("%s zygote started (pid %d)", backend, process.pid)
        return zygote

    def _listen(self, zygote: _Zygote) -> None:
        while True:
            try:
                packet = zygote.control.recv(1 << 16)
            except OSError:
                packet = b""
            if not packet:
                break
            message = pickle.loads(packet)  # noqa: S301 - our own zygote
            with zygote.cond:
                if message[0] == "spawned":
                    zygote.spawned[message[1]] = message[2]
                elif message[0] == "exited":
                    zygote.exited[message[1]] = message[2]
                    while len(zygote.exited) > KEPT_EXITS:  # statuses nobody asked for (models shut down on purpose)
                        del zygote.exited[next(iter(zygote.exited))]
                zygote.cond.notify_all()
        with zygote.cond:
            zygote.dead = True
            zygote.cond.notify_all()
        zygote.process.wait()

    def spawn(self, backend: str, label: str) -> Spawned:
        """A new model process for ``backend`` (its log file named after ``label``), waiting for its load message."""
        zygote = self._zygote(backend)
        token = next(self._tokens)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:80]
        log_path = self.log_dir / f"{safe}-{token}.log"
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with zygote.lock:
                socket.send_fds(zygote.control, [pickle.dumps(("spawn", token))], [theirs.fileno(), log_fd])
        except OSError as exc:
            ours.close()
            raise ModelLoadError(f"the {backend} zygote does not answer ({exc})") from exc
        finally:
            theirs.close()
            os.close(log_fd)
        deadline = time.monotonic() + 30
        with zygote.cond:
            while token not in zygote.spawned:
                if zygote.dead or not zygote.cond.wait(max(0.0, deadline - time.monotonic())):
                    ours.close()
                    raise ModelLoadError(f"the {backend} zygote did not start a model process")
            pid = zygote.spawned.pop(token)
        return Spawned(pid, Channel(ours), log_path)

    def exit_status(self, pid: int, timeout: float = 2.0) -> int | None:
        """The ``os.waitpid`` status of model process ``pid`` once it ended (None if unknown within ``timeout``)."""
        deadline = time.monotonic() + timeout
        zygotes = list(self._zygotes.values())
        while True:
            for zygote in zygotes:
                with zygote.cond:
                    if pid in zygote.exited:
                        return zygote.exited.pop(pid)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(0.02, remaining))

    def pids(self) -> dict[str, int]:
        """The running zygotes' process ids, by backend."""
        with self._lock:
            return {name: z.process.pid for name, z in self._zygotes.items() if z.process.poll() is None}

    @property
    def llamacpp_verdict(self) -> dict[str, Any] | None:
        """The llama.cpp CPU-path verdict the llama.cpp zygote (so every llama.cpp model process) runs on."""
        zygote = self._zygotes.get("llama.cpp")
        return zygote.info.get("llamacpp") if zygote is not None else None

    def forget_llamacpp(self) -> None:
        """Stop the llama.cpp zygote, so the next model process starts from a fresh one (after the cached CPU-path
        verdict changed)."""
        with self._lock:
            zygote = self._zygotes.pop("llama.cpp", None)
        if zygote is not None:
            self._stop(zygote)

    def _stop(self, zygote: _Zygote) -> None:
        with contextlib.suppress(OSError):
            zygote.control.shutdown(socket.SHUT_RDWR)
        zygote.control.close()
        try:
            zygote.process.wait(5)
        except subprocess.TimeoutExpired:
            zygote.process.kill()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            zygotes, self._zygotes = list(self._zygotes.values()), {}
        for zygote in zygotes:
            self._stop(zygote)
