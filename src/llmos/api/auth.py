"""Authentication on every route, and the permission checks routes call.

Contract: :class:`AuthMiddleware` runs before routing. Unless the path is ``/health``, ``/ready`` or the web
console's static files under ``/console``, it requires a valid ``Authorization: Bearer <key>`` (or
``x-api-key: <key>``, as Anthropic's clients send it) whenever authentication is on (a key exists, or
``Settings.auth``), and stores the :class:`~llmos.security.principal.Principal` in ``scope["state"]["principal"]``;
with authentication off, the caller is the local admin. It fails closed: an unexpected error while authenticating
denies the request (401 for a bad key, 503 when the key store cannot be read) and is audited without the key; its
error bodies have the shape of the route's API family. A state-changing request (any method but GET, HEAD and
OPTIONS, other than generation and embeddings) is refused with 503 before it runs unless the audit log can be
written. The usage records a request makes are committed before the rest of its response is sent (see
:mod:`llmos.security.usage`). Routes then call :func:`principal`, :func:`require_role` and :func:`visible_view`.
"""

from __future__ import annotations

import json
import logging

from anyio import to_thread
from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmos.api.errors import shaped
from llmos.errors import AuthenticationError, LlmosError, ModelNotFoundError, PermissionDeniedError
from llmos.registry.views import VersionView
from llmos.security import usage
from llmos.security.principal import LOCAL_ADMIN, Principal
from llmos.security.service import SecurityService

log = logging.getLogger("llmos.api")
OPEN_PATHS = {"/health", "/ready"}
READ_METHODS = {"GET", "HEAD", "OPTIONS"}
METERED_PATHS = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/api/show",
}
"""POST routes that change nothing but usage (recorded, not audited); ``/v1/responses`` stores the response for
its own tenant, as part of answering, and ``/api/show`` only reads."""
CONSOLE_PREFIX = "/console"
"""The web console's static shell (HTML, scripts, styles; no data) is served without a key."""


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path == CONSOLE_PREFIX or path.startswith(CONSOLE_PREFIX + "/")


class AuthMiddleware:
    def __init__(self, app: ASGIApp, security: SecurityService) -> None:
        self.app = app
        self.security = security

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        try:
            if self.security.auth_required():
                raw = headers.get(b"authorization")
                if raw is None and b"x-api-key" in headers:
                    raw = b"Bearer " + headers[b"x-api-key"]
                principal = self.security.authenticate(raw.decode("latin-1") if raw is not None else None)
            else:
                principal = LOCAL_ADMIN
        except AuthenticationError as exc:
            self.security.audit("unknown", None, "auth", scope["path"], "denied", reason=exc.message)
            body = shaped(scope["path"], 401, exc.message, exc.type, exc.code)
            await _reply(send, 401, body, {"WWW-Authenticate": "Bearer"})
            return
        except Exception:  # fail closed
            log.exception("authentication failed unexpectedly")
            body = shaped(
                scope["path"],
                503,
                "authentication is unavailable; the request was denied",
                "server_error",
                "auth_unavailable",
            )
            await _reply(send, 503, body, {})
            return
        if scope["method"] not in READ_METHODS and scope["path"] not in METERED_PATHS:
            try:  # fail closed: nothing changes unless its audit event can be written
                await to_thread.run_sync(self.security.check_audit, "this request")
            except LlmosError as exc:
                await _reply(send, exc.status, shaped(scope["path"], exc.status, exc.message, exc.type, exc.code), {})
                return
        scope.setdefault("state", {})["principal"] = principal
        with usage.collecting() as commits:

            async def send_when_recorded(message: Message) -> None:
                if commits:  # the request's usage is committed before the rest of its answer goes out
                    await usage.committed(commits)
                await send(message)

            await self.app(scope, receive, send_when_recorded)


async def _reply(send: Send, status: int, body: dict[str, object], headers: dict[str, str]) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


def principal(request: Request) -> Principal:
    found = request.scope.get("state", {}).get("principal")
    if not isinstance(found, Principal):  # fail closed: a route reached without the middleware
        raise AuthenticationError("not authenticated")
    return found


def require_role(request: Request, role: str) -> Principal:
    caller = principal(request)
    if not caller.at_least(role):
        raise PermissionDeniedError(f"this operation needs a {role} key; yours is {caller.role}")
    return caller


def _visible(caller: Principal, view: VersionView) -> bool:
    return caller.may_see(view.tenant_id) and caller.may_use(view.repository, view.name)


def visible_views(caller: Principal, views: list[VersionView]) -> list[VersionView]:
    """The models of ``views`` the caller may see and use (model lists show nothing else)."""
    return [view for view in views if _visible(caller, view)]


def visible_view(caller: Principal, view: VersionView, requested: str) -> VersionView:
    """``view`` if the caller may see and use it; otherwise the same 404 as a model that does not exist."""
    if not _visible(caller, view):
        raise ModelNotFoundError(f"model {requested!r} not found; `llmos list` shows what is available")
    return view


def set_response_headers(request: Request, headers: dict[str, str]) -> None:
    """Headers for the eventual response (rate-limit state), added by the request-context middleware."""
    request.scope.setdefault("state", {}).setdefault("response_headers", {}).update(headers)


__all__ = [
    "AuthMiddleware",
    "LlmosError",
    "principal",
    "require_role",
    "set_response_headers",
    "visible_view",
    "visible_views",
]


def tenant_scope(caller: Principal) -> int | None:
    """The tenant whose records ``caller`` may list: None (every tenant) for an admin."""
    return None if caller.is_admin else caller.tenant_id
