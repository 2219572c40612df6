"""Bad input to `llmos serve`: each gets an OpenAI-shaped error with the right status; the server stays healthy."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llmos.config import Settings
from tests.helpers import ServerProcess

OK_MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server(pulled_settings: Settings) -> Iterator[ServerProcess]:
    process = ServerProcess(
        pulled_settings.home, "--model", "smollm2", env={"LLMOS_MAX_REQUEST_BYTES": str(256 * 1024)}
    )
    yield process
    process.stop()


def post(server: ServerProcess, path: str, content: bytes) -> httpx.Response:
    return httpx.post(f"{server.base}{path}", content=content, headers={"content-type": "application/json"}, timeout=60)


def chat(**fields: Any) -> bytes:
    body = {"model": "smollm2", "messages": OK_MESSAGES, "max_tokens": 4, **fields}
    return json.dumps(body).encode()


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    assert body["error"]["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if code is not None:
        assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param
    assert response.headers["x-request-id"]


def assert_healthy(server: ServerProcess) -> None:
    assert httpx.get(f"{server.base}/health").status_code == 200
    answer = httpx.post(
        f"{server.base}/v1/chat/completions",
        json={
            "model": "smollm2",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0,
            "max_tokens": 16,
        },
        timeout=60,
    )
    assert "Paris" in answer.json()["choices"][0]["message"]["content"]


CASES: dict[str, tuple[bytes, int, str | None, str | None]] = {
    "not json": (b"hello", 400, "invalid_input", None),
    "truncated body": (chat()[:-10], 400, "invalid_input", None),
    "empty body": (b"", 400, "invalid_input", None),
    "array body": (b"[1, 2]", 400, "invalid_input", None),
    "messages as string": (json.dumps({"model": "smollm2", "messages": "hi"}).encode(), 400, None, "messages"),
    "max_tokens as string": (chat(max_tokens="10"), 400, None, "max_tokens"),
    "stream as string": (chat(stream="yes"), 400, None, "stream"),
    "empty messages": (json.dumps({"model": "smollm2", "messages": []}).encode(), 400, None, "messages"),
    "missing model": (json.dumps({"messages": OK_MESSAGES}).encode(), 400, None, "model"),
    "bad role": (
        json.dumps({"model": "smollm2", "messages": [{"role": "god", "content": "x"}]}).encode(),
        400,
        None,
        None,
    ),
    "NaN": (chat().replace(b'"max_tokens": 4', b'"temperature": NaN'), 400, "invalid_input", None),
    "Infinity": (chat().replace(b'"max_tokens": 4', b'"top_p": Infinity'), 400, "invalid_input", None),
    "temperature -1": (chat(temperature=-1), 400, None, "temperature"),
    "top_p 2": (chat(top_p=2), 400, None, "top_p"),
    "max_tokens 0": (chat(max_tokens=0), 400, None, "max_tokens"),
    "max_tokens negative": (chat(max_tokens=-5), 400, None, "max_tokens"),
    "max_tokens beyond context": (chat(max_tokens=10**6), 400, "context_length_exceeded", "max_tokens"),
    "n above cap": (chat(n=9), 400, None, "n"),
    "top_logprobs above cap": (chat(logprobs=True, top_logprobs=21), 400, None, "top_logprobs"),
    "too many stops": (chat(stop=["a", "b", "c", "d", "e"]), 400, None, "stop"),
    "logit_bias out of vocabulary": (chat(logit_bias={"999999": 5}), 400, None, "logit_bias"),
    "invalid utf-8": (chat().replace(b"Hi", b"H\xff\xfe"), 400, "invalid_input", None),
    "lone surrogate": (chat().replace(b"Hi", b"\\ud800"), 400, "invalid_input", None),
    "deeply nested": (b'{"model": "smollm2", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None, None),
    "invalid json schema": (
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}),
        400,
        None,
        "response_format",
    ),
    "unknown model": (chat(model="does-not-exist"), 404, "model_not_found", None),
    "invalid model name": (chat(model="../../etc/passwd"), 400, "invalid_name", None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_chat_requests(server: ServerProcess, case: str) -> None:
    body, status, code, param = CASES[case]
    response = post(server, "/v1/chat/completions", body)
    assert_error(response, status, code, param)
    if status == 404:
        assert "/" not in response.json()["error"]["message"].split("`")[0].replace("../", "")


def test_prompt_longer_than_context_is_refused_without_tokenizing_it_all(server: ServerProcess) -> None:
    long = "word " * 9000  # ~9000 tokens, beyond the 8192-token window
    response = post(server, "/v1/chat/completions", chat(messages=[{"role": "user", "content": long}]))
    assert_error(response, 400, "context_length_exceeded", "messages")
    huge = "x" * 200_000  # far beyond any window: refused by its size before tokenization
    response = post(server, "/v1/completions", json.dumps({"model": "smollm2", "prompt": huge}).encode())
    assert_error(response, 400, "context_length_exceeded")


def test_body_over_the_size_limit_gets_413(server: ServerProcess) -> None:
    body = chat(messages=[{"role": "user", "content": "y" * 300_000}])
    assert_error(post(server, "/v1/chat/completions", body), 413, "request_too_large")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"suffix": "x"}, "suffix"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 6}, "logprobs"),
        ({"prompt": [999999999]}, "prompt"),
        ({"prompt": []}, "prompt"),
    ],
)
def test_bad_completion_requests(server: ServerProcess, fields: dict[str, Any], param: str) -> None:
    body = json.dumps({"model": "smollm2", "prompt": "Hello", **fields}).encode()
    assert_error(post(server, "/v1/completions", body), 400, None, param)


def test_unknown_route_and_method(server: ServerProcess) -> None:
    assert_error(httpx.get(f"{server.base}/v1/nothing"), 404)
    assert_error(httpx.get(f"{server.base}/v1/chat/completions"), 405)


async def _burst(base: str, count: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
        return list(
            await asyncio.gather(*(client.post(f"{base}/v1/chat/completions", json=body) for _ in range(count)))
        )


def test_overload_is_refused_with_retry_after_and_the_server_recovers(server: ServerProcess) -> None:
    rss_before = server.rss_bytes()
    responses = asyncio.run(_burst(server.base, 300))
    statuses = [r.status_code for r in responses]
    assert 500 not in statuses
    refused = [r for r in responses if r.status_code in (429, 503)]
    served = [r for r in responses if r.status_code == 200]
    assert len(served) >= 64  # at least the whole queue (plus whatever was running or finished meanwhile)
    assert refused, "300 simultaneous requests must overflow a queue of 64"
    for response in refused:
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["code"] == "server_overloaded"
    assert len(served) + len(refused) == 300
    assert server.rss_bytes() < rss_before + 200 * 1024 * 1024
    assert_healthy(server)


def test_server_is_healthy_after_all_of_the_above(server: ServerProcess) -> None:
    assert_healthy(server)
