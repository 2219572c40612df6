"""The one place where errors become HTTP responses.

Contract: every error body has the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``.
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

from llmos.errors import LlmosError, OverloadedError, RateLimitError

log = logging.getLogger("llmos.api")


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict[str, object]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: LlmosError) -> JSONResponse:
    headers: dict[str, str] = {}
    if isinstance(exc, OverloadedError | RateLimitError):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if isinstance(exc, RateLimitError):
        headers.update(exc.headers)
    return JSONResponse(error_body(exc.message, exc.type, exc.code, exc.param), status_code=exc.status, headers=headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type"}


def install(app: FastAPI) -> None:
    @app.exception_handler(LlmosError)
    async def _llmos(_request: Request, exc: LlmosError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(
            error_body(
                f"invalid request: {first.get('msg', 'validation failed')}",
                "invalid_request_error",
                "invalid_input",
                param,
            ),
            status_code=400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(
            error_body(str(exc.detail), type_, _HTTP_CODES.get(exc.status_code)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body("internal server error", "server_error", "internal_error"), status_code=500)
