"""Structured logs: JSON lines for machines, readable lines for people, request context on every record.

Contract:

* :func:`configure_logging` installs one handler on the root logger, writing to ``stream`` (stderr by default).
  ``json=None`` picks the format from the stream: JSON lines when it is not a TTY (a container, a file, a pipe),
  human-readable lines when it is. Calling it again replaces its own handler (never duplicates lines).
* Every record carries ``request_id``, ``tenant`` and ``model`` of the current request (from
  :mod:`llmos.observability.context`, bound by the request middleware) and the process fields (``job_id`` in a job
  worker) when they are known; unknown ones are left out.
* A JSON line is one object: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, the context fields, the
  primitive ``extra=`` fields the caller passed (e.g. the access log's ``method``, ``route``, ``status``,
  ``duration_ms``) and ``exc`` (the formatted traceback) when there is one.
* This module never reads requests: what reaches a log line is what the code logs. The access log (see
  :mod:`llmos.api.middleware`) logs the route template, never the raw path, headers, bodies or keys.
"""

from __future__ import annotations

import json as jsonlib
import logging
import sys
import time
from typing import IO, Any

from llmos.observability.context import current_request, process_fields

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}
_CONTEXT = ("request_id", "tenant", "model", "job_id")


class ContextFilter(logging.Filter):
    """Adds the current request's (and process's) context fields to every record that passes the handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in process_fields().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        context = current_request()
        if context is not None:
            if not hasattr(record, "request_id"):
                record.request_id = context.request_id
            tenant = context.tenant
            if tenant is not None and not hasattr(record, "tenant"):
                record.tenant = tenant
            if context.model is not None and not hasattr(record, "model"):
                record.model = context.model
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, value in record.__dict__.items():
        if key in _STANDARD or key.startswith("_"):
            continue
        if value is None or isinstance(value, str | int | float | bool):
            fields[key] = value
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _extras(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.stack_info:
            line["stack"] = record.stack_info
        return jsonlib.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``2024-05-01 12:00:00 INFO  llmos.access  GET /v1/models 200 3.1ms  request_id=... tenant=...``"""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        extras = _extras(record)
        context = " ".join(f"{key}={extras[key]}" for key in _CONTEXT if extras.get(key) is not None)
        text = f"{stamp} {record.levelname:<7} {record.name}  {record.getMessage()}"
        if context:
            text += f"  [{context}]"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _LlmosHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marker class, so a second :func:`configure_logging` replaces the first handler instead of adding one."""


def json_flag(log_format: str) -> bool | None:
    """The ``json`` argument of :func:`configure_logging` for a ``log_format`` setting (auto, json, text)."""
    return {"json": True, "text": False}.get(log_format)


def configure_logging(
    level: str | int = "info", json: bool | None = None, *, stream: IO[str] | None = None
) -> logging.Handler:
    """Send every log record of the process to ``stream`` (stderr), as JSON lines or readable text.

    ``json=None``: JSON unless the stream is a TTY. Returns the installed handler.
    """
    target = stream if stream is not None else sys.stderr
    isatty = getattr(target, "isatty", None)
    as_json = not (callable(isatty) and isatty()) if json is None else json
    handler = _LlmosHandler(target)
    handler.setFormatter(JsonFormatter() if as_json else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _LlmosHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
