"""ASGI middleware: request ids, request context for logs and traces, access log, per-route and per-model metrics.

Contract: every HTTP response carries ``x-request-id`` (the client's, if it sent a well-formed one, else a new
one), basic security headers (nosniff, no framing, no referrer), and any headers a handler left in
``scope["state"]["response_headers"]`` (rate-limit state); the id is also in ``scope["state"]["request_id"]`` for
handlers. A :class:`~llmos.observability.context.RequestContext` is bound for the request's duration, so every log
record carries the request id, tenant and (once resolved) model, and, when tracing is on, the request gets a SERVER
span. When the request ends: it is counted by method, route template and status and its duration observed;
generation and embedding routes are also counted by endpoint, model, tenant and final status (a stream's outcome
overrides the 200 it started with) with their end-to-end latency; one access-log line is written (``llmos.access``:
method, route template, status, duration, plus the context fields; probes and scrapes at DEBUG). Never the raw
path, headers, bodies or keys. Pure ASGI, so streaming responses pass through untouched.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmos.observability.context import RequestContext, bind_request, reset_request
from llmos.observability.metrics import METHODS, Metrics
from llmos.observability.tracing import Tracing

access_log = logging.getLogger("llmos.access")
ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
    "/api/chat": "ollama_chat",
    "/api/generate": "ollama_generate",
    "/api/embed": "ollama_embed",
    "/api/embeddings": "ollama_embed",
}
"""Routes counted per model and tenant (``llmos_requests_total``), by their endpoint label."""
QUIET_ROUTES = {"/health", "/ready", "/metrics"}
"""Probes and scrapes: logged at DEBUG so a 1 s scrape interval does not drown the access log."""
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, tracing: Tracing | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.tracing = tracing or Tracing()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or []
        incoming = dict(headers).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _VALID_ID.match(incoming) else f"req_{uuid.uuid4().hex}"
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        context = RequestContext(request_id, state)
        if self.tracing.enabled:
            context.span, context.tracing = self.tracing.start_request(scope["method"], headers), self.tracing
        token = bind_request(context)
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
            try:
                self._finish(scope, context, status, time.monotonic() - started)
            finally:
                reset_request(token)

    def _finish(self, scope: Scope, context: RequestContext, status: int, seconds: float) -> None:
        route: Any = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        method = scope["method"]
        self.metrics.observe_http(method, template, status, seconds)
        endpoint = ENDPOINTS.get(template)
        final = context.outcome if context.outcome is not None and status < 400 else status
        if endpoint is not None:
            self.metrics.observe_request(endpoint, context.model, context.tenant, final, seconds)
        self.tracing.end_request(context.span, template, final, context)
        level = logging.DEBUG if template in QUIET_ROUTES else logging.INFO
        if access_log.isEnabledFor(level):
            shown = method if method in METHODS else "OTHER"
            extra = {"method": shown, "route": template, "status": final, "duration_ms": round(seconds * 1000, 1)}
            access_log.log(level, "%s %s %d %.1fms", shown, template, final, seconds * 1000, extra=extra)


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
