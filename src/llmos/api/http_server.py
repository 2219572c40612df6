"""The HTTP/1.1 server of ``llmos serve``: uvicorn on httptools, with limits enforced in the parser, per connection.

Contract: :func:`run` serves an ASGI app with uvicorn, always through :class:`LimitedHttpProtocol` (httptools; no
WebSocket upgrades), which enforces, before any request reaches the app and without buffering past the limits:

* **head deadline** (``request_head_seconds``): a connection must deliver a complete request line and headers within
  this many seconds of connecting, and each later request on a kept-alive connection within as many seconds of its
  first byte after the previous response (a response, however long, is never timed). Slower gets ``408`` and the
  connection is closed, however steadily the bytes trickle in. The idle time between requests stays uvicorn's
  keep-alive timeout.
* **head size** (``max_header_bytes``): the bytes of an incomplete head are counted as they arrive; past the cap the
  client gets ``431`` and the connection is closed, so at most the cap plus one socket read is ever held.
* **body deadline** (``request_read_seconds`` + 1 s): a request's body must be complete within this of its head,
  whether or not the app reads it (the app's own 408 at ``request_read_seconds`` comes first where it reads). Past it
  the connection gets ``408`` (if no response has started) and is closed.
* **connection caps** (``max_connections``, ``max_connections_per_client`` by peer address): a connection beyond
  either gets ``503`` before anything is parsed and is closed (after reading, for at most :data:`LINGER_SECONDS`,
  what it had already sent, so the 503 is not lost to a reset); the others are untouched. The total cap is
  lowered at start to fit the process's open-file limit (the soft ``RLIMIT_NOFILE`` is first raised toward the hard
  one), keeping :data:`FD_RESERVE` descriptors for the database, model files and logs.

Refusals are plain ``connection: close`` responses with an OpenAI-shaped JSON body, written by the protocol itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from llmos.config import Settings

log = logging.getLogger("llmos.serve")

FD_RESERVE = 256
"""Descriptors kept free of connections (database, blobs, model files, logs); a quarter of a smaller limit."""
BODY_GRACE_SECONDS = 1.0
"""The parser's body deadline trails the app's (``request_read_seconds``) so the app answers first where it reads."""
LINGER_SECONDS = 1.0
"""A connection refused for the caps is half-closed after its 503 and read (discarding) until the client closes or
this long, so the request it already sent does not turn the close into a reset that loses the 503."""
MAX_LINGERING = 64
"""Refused connections lingering at once (they hold descriptors beyond the cap); more are closed at once."""


def _refusal(status: int, message: str, code: str, extra: bytes = b"") -> bytes:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    head = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n" % len(body)
    return STATUS_LINE[status] + head + extra + b"\r\n" + body


HEAD_TIMEOUT = _refusal(408, "the request headers did not arrive in time", "request_timeout")
BODY_TIMEOUT = _refusal(408, "the request body did not arrive in time", "request_timeout")
HEAD_TOO_LARGE = _refusal(431, "request headers are too large", "headers_too_large")
TOO_MANY_CONNECTIONS = _refusal(
    503, "too many open connections; retry later", "too_many_connections", b"retry-after: 1\r\n"
)


@dataclass(frozen=True)
class HttpLimits:
    """The limits one server enforces (see the module docstring)."""

    head_seconds: float
    body_seconds: float
    max_head_bytes: int
    max_connections: int
    max_connections_per_client: int

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        """The limits ``settings`` ask for, the connection cap fitted to the open-file limit (raised if it can be)."""
        total = fit_descriptor_limit(settings.max_connections)
        return cls(
            head_seconds=settings.request_head_seconds,
            body_seconds=settings.request_read_seconds + BODY_GRACE_SECONDS,
            max_head_bytes=settings.max_header_bytes,
            max_connections=total,
            max_connections_per_client=min(settings.max_connections_per_client, total),
        )


def fit_descriptor_limit(connections: int) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` toward what ``connections`` need; return the connection cap that fits it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # pragma: no cover - a hard limit below the soft one cannot happen
            pass
    if soft == resource.RLIM_INFINITY or soft >= need:
        return connections
    fitted = max(1, soft - min(FD_RESERVE, soft // 4))  # a tiny limit keeps a quarter for the server
    log.warning(
        "max_connections lowered from %d to %d: the open-file limit is %d (raise it with `ulimit -n`)",
        connections,
        fitted,
        soft,
    )
    return fitted


class ConnectionCounter:
    """Open connections, in total and per client address; one per server, used from its event loop only."""

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        self.total = 0
        self.by_client: dict[str, int] = {}
        self.refused = 0
        self.lingering = 0

    def admit(self, client: str) -> bool:
        """Count a new connection from ``client`` and say True, or say False (counting a refusal) beyond a cap."""
        held = self.by_client.get(client, 0)
        if self.total >= self.limits.max_connections or held >= self.limits.max_connections_per_client:
            self.refused += 1
            return False
        self.total += 1
        self.by_client[client] = held + 1
        return True

    def release(self, client: str) -> None:
        self.total -= 1
        held = self.by_client[client] - 1
        if held:
            self.by_client[client] = held
        else:
            del self.by_client[client]


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the head/body deadlines, the head-size cap and the connection caps.

    Use a subclass made by :func:`protocol_class`, which binds the limits and one shared counter.
    """

    limits: ClassVar[HttpLimits]
    counter: ClassVar[ConnectionCounter]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._peer = ""
        self._admitted = False
        self._refused = False
        self._lingering = False
        self._in_head = True  # the next bytes belong to a request's head
        self._head_bytes = 0
        self._awaiting_body = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    # --- connection -------------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if not self.counter.admit(self._peer):
            self.transport = transport
            self._refused = True
            transport.write(TOO_MANY_CONNECTIONS)
            if self.counter.lingering < MAX_LINGERING and transport.can_write_eof():
                self.counter.lingering += 1
                self._lingering = True
                transport.write_eof()  # the client reads the 503, then closes; what it sent is read and dropped
                self._head_timer = self.loop.call_later(LINGER_SECONDS, transport.close)
            else:
                transport.close()
            return
        self._admitted = True
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.limits.head_seconds, self._head_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self._lingering:
            self._lingering = False
            self.counter.lingering -= 1
        if not self._admitted:
            return  # refused at connection_made: uvicorn never saw it
        self._admitted = False
        self.counter.release(self._peer)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:  # a chunk that also ends the previous request is not counted: at most one read more
            self._head_bytes += len(data)
        super().data_received(data)  # feeds the parser; the callbacks below move the state
        if self._refused or self.transport.is_closing():
            return
        if self._in_head:
            if self._head_bytes > self.limits.max_head_bytes:
                self._refuse(HEAD_TOO_LARGE, before_request=True)
            elif self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
                # bytes of a later request on an idle kept-alive connection; while a response is under way (this
                # read may just have completed its request), the next head is not timed until that one is done
                self._head_timer = self.loop.call_later(self.limits.head_seconds, self._head_expired)
        elif self._awaiting_body and self._body_timer is None:
            self._body_timer = self.loop.call_later(self.limits.body_seconds, self._body_expired)

    # --- parser callbacks -------------------------------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        if self._refused:  # the rest of a read after a refusal is parsed, and ignored
            return
        self._in_head = False
        self._awaiting_body = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        # a head that arrived in one read was not counted as it came: measure it (the headers as the app sees them)
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_head_bytes:
            self._refuse(HEAD_TOO_LARGE, before_request=True)  # uvicorn never starts this request
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._in_head = True
        self._head_bytes = 0
        self._awaiting_body = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    # --- limits -----------------------------------------------------------------------------------------------------

    def _head_expired(self) -> None:
        self._head_timer = None
        if not self._refused and not self.transport.is_closing():
            self._refuse(HEAD_TIMEOUT, before_request=True)

    def _body_expired(self) -> None:
        self._body_timer = None
        if not self._refused and not self.transport.is_closing():
            self._refuse(BODY_TIMEOUT, before_request=False)

    def _refuse(self, response: bytes, *, before_request: bool) -> None:
        """Answer ``response`` where no other response is due, and close the connection.

        ``before_request``: the refused request never reached uvicorn (its cycle, if any, is the previous request's,
        so ``response`` is written once that one is complete); otherwise it is the current cycle's request, answered
        only if the app has not started a response of its own.
        """
        self._refused = True
        self._cancel_timers()
        cycle = self.cycle
        if cycle is None or (cycle.response_complete if before_request else not cycle.response_started):
            self.transport.write(response)
        if cycle is not None and not cycle.response_complete:  # the app's request ends as a disconnect; its sends
            cycle.disconnected = True  # are dropped, not written after ours
            cycle.message_event.set()
        self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None


def protocol_class(limits: HttpLimits) -> type[LimitedHttpProtocol]:
    """A :class:`LimitedHttpProtocol` bound to ``limits`` and a fresh counter shared by its connections."""

    class BoundLimitedHttpProtocol(LimitedHttpProtocol):
        pass

    BoundLimitedHttpProtocol.limits = limits
    BoundLimitedHttpProtocol.counter = ConnectionCounter(limits)
    return BoundLimitedHttpProtocol


def run(app: Any, settings: Settings) -> None:
    """Serve ``app`` on ``settings.host``/``port`` until interrupted, with the limits of ``settings``."""
    import uvicorn

    limits = HttpLimits.from_settings(settings)
    # log_config=None: uvicorn's own records go through the handler configure_logging installed
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol_class(limits),
        ws="none",
        log_level="warning",
        access_log=False,
        log_config=None,
        # without a bound, a shutdown waits for every request in flight, however long it still has to generate
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_seconds)),
    )


__all__ = ["HttpLimits", "LimitedHttpProtocol", "fit_descriptor_limit", "protocol_class", "run"]
