"""Response bodies of the OpenAI-compatible routes, in the shapes of the OpenAI API reference.

Contract: pure functions from engine outputs to JSON-ready dicts: chat completion objects and chunks, text
completion objects, both logprob formats, usage (with ``prompt_tokens_details.cached_tokens``: prompt tokens taken
from the prefix cache, as OpenAI reports its prompt caching), model objects, and the SSE framing
(``data: ...\\n\\n`` and the final ``data: [DONE]``).
"""

from __future__ import annotations

from typing import Any

from llmos.api.sse import sse
from llmos.engine.request import Logprob
from llmos.registry.views import VersionView


def token_text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="backslashreplace")


SSE_DONE = sse("[DONE]")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    return value if value > -1e30 else -9999.0  # JSON has no -inf; OpenAI reports -9999.0 for impossible tokens


def chat_logprobs(items: list[Logprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": token_text(lp.text),
                "logprob": _finite(lp.logprob),
                "bytes": list(lp.text),
                "top_logprobs": [
                    {"token": token_text(text), "logprob": _finite(value), "bytes": list(text)}
                    for _token, text, value in lp.top
                ],
            }
            for lp in items
        ],
        "refusal": None,
    }


def completion_logprobs(items: list[Logprob], start_offset: int = 0) -> dict[str, Any]:
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = start_offset
    for lp in items:
        text = token_text(lp.text)
        tokens.append(text)
        token_logprobs.append(_finite(lp.logprob))
        top.append(None if lp.logprob is None else {token_text(t): _finite(v) or 0.0 for _i, t, v in lp.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_completion(
    completion_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    prompt_tokens: int,
    completion_tokens: int,
    fingerprint: str | None = None,
    cached_tokens: int = 0,
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
    }


def chat_chunk(
    completion_id: str,
    created: int,
    model: str,
    index: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def usage_chunk(completion_id: str, created: int, model: str, obj: str, usage_value: dict[str, Any]) -> dict[str, Any]:
    return {"id": completion_id, "object": obj, "created": created, "model": model, "choices": [], "usage": usage_value}


def text_completion(
    completion_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage_value: dict[str, Any] | None,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": choices,
    }
    if usage_value is not None:
        body["usage"] = usage_value
    return body


def model_object(view: VersionView) -> dict[str, Any]:
    namespace, _, _ = view.repository.rpartition("/")
    return {
        "id": view.name,
        "object": "model",
        "created": int(view.created_at.timestamp()),
        "owned_by": namespace or "library",
    }
