"""Server-sent events as the HTTP APIs send them.

Contract: :func:`sse` is one ``data:`` event (OpenAI chat and completion chunks, ``[DONE]``); :func:`typed_sse`
is one event whose ``event:`` line names its ``type`` field, as the Responses API and Anthropic's Messages API
send them. JSON is compact and keeps non-ASCII text as is.
"""

from __future__ import annotations

import json
from typing import Any


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else _json(data)
    return f"data: {payload}\n\n".encode()


def typed_sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {_json(event)}\n\n".encode()
