"""The zygote: one process per backend that imports the backend's libraries once and forks model processes from
itself (``python -m llmos.runtime.zygote BACKEND FD``; started by :class:`~llmos.runtime.launcher.Launcher`).

A model process forked from a zygote starts in milliseconds with llama.cpp, or torch and transformers, already
imported, instead of paying those imports (seconds for torch) at every load, and shares their pages with its
siblings. The zygote itself runs no model code and starts no thread, so forking it is safe.

Protocol on the control socket (a ``SOCK_SEQPACKET`` pair: one pickled message per packet):

* server -> zygote: ``("settings", Settings)`` first; then ``("spawn", token)`` carrying two file descriptors (the
  model process's end of its channel, and its log file, which becomes its stdout and stderr).
* zygote -> server: ``("ready", info)`` once the libraries are imported (``info["llamacpp"]``: the llama.cpp
  CPU-path verdict as JSON, for llama.cpp); ``("spawned", token, pid)`` per spawn; ``("exited", pid, status)`` when
  a model process ends (``status`` as :func:`os.waitpid` reports it: signal or exit code).

The zygote exits when the server closes the control socket (or dies); its model processes exit on their own when
their channel closes.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import socket
import sys
import traceback
from typing import Any

PACKET = 1 << 20


def _send(control: socket.socket, message: Any) -> None:
    control.send(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _reap(control: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(control, ("exited", pid, status))


def _run_child(fds: list[int], control: socket.socket, wake: tuple[int, int], settings: Any) -> None:
    """In the forked child: become a model process; never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        control.close()
        for fd in wake:
            os.close(fd)
        channel_fd, log_fd = fds
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        from llmos.runtime.model_worker import serve

        code = serve(socket.socket(fileno=channel_fd), settings)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> int:
    backend, fd = sys.argv[1], int(sys.argv[2])
    control = socket.socket(fileno=fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the server, which shuts its models down
    first = control.recv(PACKET)
    if not first:
        return 0
    _, settings = pickle.loads(first)  # noqa: S301 - our own server, over a socket pair it created
    from llmos.runtime.model_worker import preload

    try:
        info = preload(backend, settings)
    except Exception as exc:
        _send(control, ("failed", f"{type(exc).__name__}: {exc}"))
        return 1
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    _send(control, ("ready", info))
    while True:
        readable, _, _ = select.select([control.fileno(), read_fd], [], [])
        if read_fd in readable:
            os.read(read_fd, 4096)
        if control.fileno() in readable:
            try:
                packet, fds, _, _ = socket.recv_fds(control, PACKET, 4)
            except OSError:
                packet, fds = b"", []
            if not packet:
                return 0
            _, token = pickle.loads(packet)  # noqa: S301 - see above
            pid = os.fork()
            if pid == 0:
                _run_child(fds, control, (read_fd, write_fd), settings)
            for received in fds:
                os.close(received)
            _send(control, ("spawned", token, pid))
        _reap(control)


if __name__ == "__main__":
    sys.exit(main())
