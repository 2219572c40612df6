"""Structured logs: JSON lines off a TTY, readable text on one, request context on every record."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from llmos.observability import context
from llmos.observability.logs import configure_logging, json_flag


@dataclass
class FakePrincipal:
    tenant: str


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    context.process_fields().clear()


def lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line]


def test_json_line_carries_request_id_tenant_and_model() -> None:
    stream = io.StringIO()
    configure_logging("info", None, stream=stream)  # not a TTY: JSON
    request = context.RequestContext("req_abc", {"principal": FakePrincipal("acme")})
    token = context.bind_request(request)
    try:
        logging.getLogger("llmos.test").info("before the model is known")
        context.set_model("smollm2:latest")
        logging.getLogger("llmos.access").info("POST done", extra={"route": "/v1/chat/completions", "status": 200})
    finally:
        context.reset_request(token)
    logging.getLogger("llmos.test").warning("outside any request")
    first, second, third = (json.loads(line) for line in lines(stream))
    assert first["request_id"] == "req_abc" and first["tenant"] == "acme" and "model" not in first
    assert first["level"] == "info" and first["logger"] == "llmos.test" and first["ts"].endswith("Z")
    assert second["model"] == "smollm2:latest" and second["route"] == "/v1/chat/completions"
    assert second["status"] == 200 and second["message"] == "POST done"
    assert "request_id" not in third and third["level"] == "warning"


def test_text_on_a_tty_and_the_override() -> None:
    terminal = Terminal()
    configure_logging("info", None, stream=terminal)
    token = context.bind_request(context.RequestContext("req_tty", {}))
    try:
        logging.getLogger("llmos.test").info("hello %s", "there")
    finally:
        context.reset_request(token)
    (line,) = lines(terminal)
    assert "INFO" in line and "llmos.test" in line and "hello there" in line and "request_id=req_tty" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)
    forced = Terminal()
    configure_logging("info", json_flag("json"), stream=forced)  # LLMOS_LOG_FORMAT=json on a terminal
    logging.getLogger("llmos.test").info("forced")
    assert json.loads(lines(forced)[0])["message"] == "forced"
    assert json_flag("auto") is None and json_flag("text") is False


def test_reconfiguring_replaces_the_handler_and_levels_apply() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", True, stream=first)
    configure_logging("warning", True, stream=second)
    logging.getLogger("llmos.test").info("dropped")
    logging.getLogger("llmos.test").error("kept")
    assert lines(first) == [] and [json.loads(x)["message"] for x in lines(second)] == ["kept"]


def test_process_fields_and_exceptions() -> None:
    stream = io.StringIO()
    configure_logging("info", True, stream=stream)
    context.bind_process(job_id="j0123456789ab")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("llmos.jobs").exception("step failed")
    record = json.loads(lines(stream)[0])
    assert record["job_id"] == "j0123456789ab" and "ValueError: boom" in record["exc"]
