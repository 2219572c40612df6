"""Messages between the server and a model process: length-prefixed pickle frames over a Unix stream socket.

Contract: :meth:`Channel.send` writes one message (any picklable value) atomically with respect to other senders
(a lock); :meth:`Channel.recv` returns the next message, ``None`` when the peer closed the connection (or died), or
raises :class:`TimeoutError` when nothing arrived within ``timeout`` seconds. One thread receives; any thread sends.
Both ends are llmos processes of the same installation started by the same user (the socket pair never leaves the
machine and is never bound to a path), which is why pickle is acceptable here and nowhere else.

Errors travel as :func:`portable_error` triples and come back as the same llmos error class with the same message
and ``param`` (:func:`rebuild_error`); a class the receiver does not know becomes an
:class:`~llmos.errors.EngineStoppedError`.
"""

from __future__ import annotations

import contextlib
import pickle
import select
import socket
import struct
import threading
from typing import Any

from llmos import errors as llmos_errors
from llmos.errors import EngineStoppedError, LlmosError

_HEADER = struct.Struct("!I")
MAX_FRAME = 1 << 30


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self._buffer = bytearray()

    def send(self, message: Any) -> None:
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            self.sock.sendall(_HEADER.pack(len(payload)) + payload)

    def recv(self, timeout: float | None = None) -> Any:
        """The next message; None at end of stream; TimeoutError after ``timeout`` seconds of silence."""
        while True:
            if len(self._buffer) >= _HEADER.size:
                (size,) = _HEADER.unpack_from(self._buffer)
                if size > MAX_FRAME:
                    raise ConnectionError(f"frame of {size} bytes is larger than the channel allows")
                end = _HEADER.size + size
                if len(self._buffer) >= end:
                    payload = bytes(self._buffer[_HEADER.size : end])
                    del self._buffer[:end]
                    return pickle.loads(payload)  # noqa: S301 - our own child process, see the module docstring
            if timeout is not None:
                readable, _, _ = select.select([self.sock], [], [], timeout)
                if not readable:
                    raise TimeoutError
            try:
                chunk = self.sock.recv(1 << 20)
            except (ConnectionResetError, OSError):
                return None
            if not chunk:
                return None
            self._buffer += chunk

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def portable_error(error: LlmosError) -> tuple[str, str, str | None]:
    """An llmos error as plain data (class name, message, param): not every error class pickles its arguments."""
    return type(error).__name__, error.message, error.param


def rebuild_error(name: str, message: str, param: str | None = None) -> LlmosError:
    cls = getattr(llmos_errors, name, None)
    if isinstance(cls, type) and issubclass(cls, LlmosError):
        try:
            return cls(message, param=param)
        except TypeError:
            try:
                return cls(message)
            except TypeError:
                pass
    return EngineStoppedError(message)
