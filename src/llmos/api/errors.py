"""The one place where errors become HTTP responses.

Contract: every error body has the shape of the API family its route belongs to (:func:`shaped`): OpenAI's
``{"error": {"message", "type", "param", "code"}}`` by default, Anthropic's ``{"type": "error", "error": {"type",
"message"}}`` under ``/v1/messages``, Ollama's ``{"error": "message"}`` under ``/api/``.
:class:`llmos.errors.LlmosError` subclasses map through their own ``status`` / ``type`` / ``code``; overload errors
add ``Retry-After``; anything unexpected becomes a 500 with a generic message (details go to the log, never to
the client). No message contains a filesystem path of the store.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmos.errors import LlmosError, ModelRestartingError, OverloadedError, RateLimitError

log = logging.getLogger("llmos.api")


ANTHROPIC_PREFIX = "/v1/messages"
OLLAMA_PREFIX = "/api/"
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, object]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def anthropic_error(status: int, message: str) -> dict[str, object]:
    """Anthropic's error body: the type follows the status (``invalid_request_error``, ``not_found_error``, ...)."""
    kind = ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def shaped(
    path: str, status: int, message: str, type_: str, code: str | None, param: str | None = None
) -> dict[str, object]:
    """The error body for a route at ``path``, in its API family's shape (see the module contract)."""
    if path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/"):
        return anthropic_error(status, message)
    if path.startswith(OLLAMA_PREFIX):
        return {"error": message}
    return error_body(message, type_, code, param)


def error_response(exc: LlmosError, path: str = "") -> JSONResponse:
    headers: dict[str, str] = {}
    if isinstance(exc, OverloadedError | RateLimitError | ModelRestartingError):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if isinstance(exc, RateLimitError):
        headers.update(exc.headers)
    body = shaped(path, exc.status, exc.message, exc.type, exc.code, exc.param)
    return JSONResponse(body, status_code=exc.status, headers=headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type"}


def install(app: FastAPI) -> None:
    @app.exception_handler(LlmosError)
    async def _llmos(request: Request, exc: LlmosError) -> JSONResponse:
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(
            shaped(
                request.url.path,
                400,
                f"invalid request: {first.get('msg', 'validation failed')}",
                "invalid_request_error",
                "invalid_input",
                param,
            ),
            status_code=400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(
            shaped(request.url.path, exc.status_code, str(exc.detail), type_, _HTTP_CODES.get(exc.status_code)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        body = shaped(request.url.path, 500, "internal server error", "server_error", "internal_error")
        return JSONResponse(body, status_code=500)
