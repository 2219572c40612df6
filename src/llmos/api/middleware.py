"""ASGI middleware: a request id on every response, and per-route HTTP metrics.

Contract: every HTTP response carries ``x-request-id`` (the client's, if it sent a well-formed one, else a new
one), basic security headers (nosniff, no framing, no referrer), and any headers a handler left in
``scope["state"]["response_headers"]`` (rate-limit state); the id is also in ``scope["state"]["request_id"]`` for
handlers and logs. Each request is counted by method, route template and status, and its duration observed. Pure
ASGI, so streaming responses pass through untouched.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmos.observability.metrics import Metrics

_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _VALID_ID.match(incoming) else f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.monotonic()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                extra = scope.get("state", {}).get("response_headers", {})
                headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
                headers += SECURITY_HEADERS
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.http_requests.labels(scope["method"], template, str(status)).inc()
            self.metrics.request_duration.labels(template).observe(time.monotonic() - started)


class HardeningMiddleware:
    """Refuse oversized headers (431) and clients that trickle their body past a deadline (408)."""

    def __init__(self, app: ASGIApp, max_header_bytes: int, read_seconds: float) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.read_seconds = read_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or []
        if len(headers) > 100 or sum(len(k) + len(v) for k, v in headers) > self.max_header_bytes:
            await _refuse(send, 431, "request headers are too large", "headers_too_large")
            return
        deadline = time.monotonic() + self.read_seconds
        body_done = False

        async def receive_with_deadline() -> Message:
            nonlocal body_done
            if body_done:  # afterwards receive() only waits for a disconnect (streaming responses): no deadline
                return await receive()
            remaining = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(remaining, 0.001))
            except TimeoutError:
                raise RequestTimeout() from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        try:
            await self.app(scope, receive_with_deadline, send)
        except RequestTimeout:
            await _refuse(send, 408, "the request body did not arrive in time", "request_timeout")


class RequestTimeout(Exception):
    pass


async def _refuse(send: Send, status: int, message: str, code: str) -> None:
    import json

    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})
