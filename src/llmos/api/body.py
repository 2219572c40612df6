"""Reading request bodies without trusting them.

Contract: :func:`parse_body` reads at most ``max_bytes`` (413 beyond, checked on the header and while streaming),
requires UTF-8, parses JSON refusing ``NaN`` / ``Infinity``, refuses nesting deep enough to exhaust the parser and
strings with lone surrogates, and validates the result into a pydantic model. Every failure is an
:class:`~llmos.errors.InvalidInputError` (400) naming the offending field, never FastAPI's default 422 body; an
unknown field is reported before any other error (``unknown field 'budget'``, with the fields the body takes).

Admin bodies derive from :class:`AdminBody`: strict types and no unknown fields, so a misspelt field is a 400
rather than silently ignored (the OpenAI routes ignore unknown fields, as OpenAI's API does). A route that takes no
body calls :func:`no_body`: an empty body or ``{}`` passes, any field is unknown.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ConfigDict, ValidationError

from llmos.errors import InvalidInputError, PayloadTooLargeError

T = TypeVar("T", bound=BaseModel)


class AdminBody(BaseModel):
    """Base of every admin request body: strict types, finite numbers, and an unknown field is a 400."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")


class NoBody(AdminBody):
    """The body of a route that takes none: only ``{}`` (or nothing at all)."""


def _reject_constant(name: str) -> Any:
    raise InvalidInputError(f"{name} is not a valid JSON number")


async def read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLargeError(f"request body of {declared} bytes exceeds the {max_bytes}-byte limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLargeError(f"request body exceeds the {max_bytes}-byte limit")
    return bytes(body)


def parse_json(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise InvalidInputError("the request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"the request body is not valid UTF-8 (byte {exc.start})") from exc
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise InvalidInputError("the request body is nested too deeply") from exc
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"the request body is not valid JSON: {exc.msg} at position {exc.pos}") from exc
    if not isinstance(data, dict):
        raise InvalidInputError("the request body must be a JSON object")
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError("the request contains invalid Unicode (a lone surrogate)") from exc
    except RecursionError as exc:  # pragma: no cover - json.loads hits the limit first
        raise InvalidInputError("the request body is nested too deeply") from exc
    return data


def validate(model: type[T], data: dict[str, Any]) -> T:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        unknown = [e for e in errors if e["type"] == "extra_forbidden"]
        first = (unknown or errors)[0]
        location = ".".join(str(p) for p in first["loc"])
        if unknown:
            known = f" (fields: {', '.join(model.model_fields) or 'none'})" if len(first["loc"]) == 1 else ""
            raise InvalidInputError(f"unknown field '{location}'{known}", param=location) from exc
        message = first["msg"]
        raise InvalidInputError(f"invalid value for '{location}': {message}", param=location or None) from exc


async def parse_body(request: Request, model: type[T], max_bytes: int) -> T:
    return validate(model, parse_json(await read_body(request, max_bytes)))


async def no_body(request: Request, max_bytes: int) -> None:
    """For a route that takes no body: nothing, or ``{}``; a field is a 400 naming it."""
    raw = await read_body(request, max_bytes)
    if raw.strip():
        validate(NoBody, parse_json(raw))
