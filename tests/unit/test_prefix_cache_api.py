"""The HTTP side of the prefix cache and speculative decoding (issue 18), over a recording engine.

The routes run for real (FastAPI app, auth, quotas, usage records, metrics, the official ``openai`` client); the
model is a :class:`~llmos.runtime.model.LoadedModel` over the fake backend whose engine is :class:`CachingEngine`: it
records every request it is given and answers with a toy prefix cache that follows the engine contract (requests
reuse a cached prompt prefix only when their ``prefix_scope`` and adapter are equal and both cache prompts; the last
prompt token is always computed). So these tests check what the API sends and how it reports what the engine
answers, whatever the real engine's cache does; one test runs the real engine over the fake backend end to end.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from llmos.api.app import create_app
from llmos.api.generation import Call, EngineOptions, engine_options
from llmos.api.openai import render
from llmos.config import Settings
from llmos.engine.backends.fake import FakeBackend
from llmos.engine.core import EngineConfig, EngineCore
from llmos.engine.request import GenerationOutput, GenerationRequest
from llmos.engine.streams import AsyncOutputStream, OutputStream
from llmos.observability.metrics import Metrics
from llmos.registry.views import VersionView
from llmos.runtime.model import LoadedModel
from llmos.sdk import Model
from llmos.security.principal import LOCAL_ADMIN, Principal
from llmos.types import SamplingParams

MODEL = "fake:latest"
VIEW = VersionView(
    name=MODEL, repository="fake", tag="latest", tags=["latest"], digest="sha256:" + "1" * 64, format="gguf",
    architecture="llama", parameter_count=1, quantization=None, context_length=256, size=1,
    created_at=datetime.now(UTC), files=[],
)  # fmt: skip
ANSWER = b"ok!"


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class CachingEngine:
    """Records requests; answers ``ok!`` with ``cached_tokens`` from a toy prefix cache keyed by (scope, adapter)."""

    max_context = 256

    def __init__(self) -> None:
        self.requests: list[GenerationRequest] = []
        self.cache: dict[tuple[str | None, str | None], list[list[int]]] = {}
        self.aborted: list[str] = []

    def check_fits(self, prompt_tokens: int, max_tokens: int | None = None) -> None:
        assert prompt_tokens < self.max_context

    def submit(self, request: GenerationRequest, stream: OutputStream) -> None:
        self.requests.append(request)
        prompt = request.prompt_tokens
        cached = 0
        if request.cache_prompt:
            stored = self.cache.setdefault((request.prefix_scope, request.adapter), [])
            cached = min(len(prompt) - 1, max((common_prefix(p, prompt) for p in stored), default=0))
            stored.append(list(prompt))
        common = {"prompt_tokens": len(prompt), "cached_tokens": cached}
        for i, byte in enumerate(ANSWER):
            last = i == len(ANSWER) - 1
            stream.push(
                GenerationOutput(
                    request.request_id,
                    text=chr(byte),
                    token_ids=[byte],
                    completion_tokens=i + 1,
                    finished=last,
                    finish_reason="stop" if last else None,
                    admitted_at=time.monotonic(),
                    **common,  # type: ignore[arg-type]
                )
            )

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self) -> None:
        pass


class Residency:
    """Stands in for the memory manager: the one fake model is always resident."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model

    def lease(self, name: object, keep_alive: float | None = None) -> Any:
        return SimpleNamespace(instance=self.model, release=lambda keep_alive=None: None)


class Server:
    def __init__(self, client: TestClient, engine: Any, keys: dict[str, str]) -> None:
        self.client = client
        self.engine = engine
        self.keys = keys

    def post(self, path: str, body: dict[str, Any], tenant: str | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"} if tenant else {}
        response = self.client.post(path, json={"model": MODEL, **body}, headers=headers)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def chat(self, text: str, tenant: str | None = None, **extra: Any) -> dict[str, Any]:
        return self.post("/v1/chat/completions", {"messages": [{"role": "user", "content": text}], **extra}, tenant)

    def openai(self, tenant: str | None = None) -> OpenAI:
        key = self.keys[tenant] if tenant else "unused"
        return OpenAI(base_url="http://testserver/v1", api_key=key, http_client=self.client, max_retries=0)

    def counters(self) -> dict[str, float]:
        state = self.client.app.state.llmos  # type: ignore[attr-defined]
        return prefix_counters(state.metrics)


def prefix_counters(metrics: Metrics) -> dict[str, float]:
    found = {"hit": 0.0, "miss": 0.0}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            for kind in found:
                if sample.name == f"llmos_prefix_cache_{kind}_tokens_total" and sample.labels == {"model": MODEL}:
                    found[kind] = sample.value
    return found


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    started: list[TestClient] = []
    engines: list[EngineCore] = []

    def start(real_engine: bool = False, **overrides: Any) -> Server:
        settings = Settings(home=tmp_path / f"home{len(started)}", usage_records=False, **overrides)
        app = create_app(settings)
        client = TestClient(app)
        client.__enter__()
        started.append(client)
        state = app.state.llmos
        backend = FakeBackend()
        engine: Any = EngineCore(backend, EngineConfig(speculative=True)) if real_engine else CachingEngine()
        if real_engine:
            engines.append(engine)
        model = LoadedModel(VIEW, backend, engine)
        state.registry.show = lambda name: VIEW
        state.residency = Residency(model)
        keys: dict[str, str] = {}
        if settings.auth:
            for tenant in ("acme", "beta"):
                state.security.create_tenant(tenant)
                keys[tenant], _ = state.security.create_key(tenant, "developer")
        return Server(client, engine, keys)

    yield start
    for client in started:
        client.__exit__(None, None, None)
    for engine in engines:
        engine.shutdown()


# --- what reaches the engine ----------------------------------------------------------------------------------------


def test_body_fields_reach_the_engine_request_and_default_to_on(serve: Any) -> None:
    server = serve(speculative=True)  # the server's default is off; with it on, requests default to on
    server.chat("hello")
    server.chat("hello", cache_prompt=False, speculative=False)
    server.post("/v1/completions", {"prompt": "hello", "cache_prompt": False, "speculative": True})
    default, off, completion = server.engine.requests
    assert (default.cache_prompt, default.speculative) == (True, True)
    assert (off.cache_prompt, off.speculative) == (False, False)
    assert (completion.cache_prompt, completion.speculative) == (False, True)
    # auth off: one local owner, nothing to scope; the fairness key is the (local) tenant
    assert {r.prefix_scope for r in server.engine.requests} == {None}
    assert {r.fairness_key for r in server.engine.requests} == {LOCAL_ADMIN.tenant}


def test_body_fields_are_strict_booleans(serve: Any) -> None:
    server = serve()
    for field in ("cache_prompt", "speculative"):
        response = server.client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], field: "no"},
        )
        assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text
    assert server.engine.requests == []


def test_server_settings_turn_the_request_fields_off(serve: Any) -> None:
    server = serve(prefix_cache=False, speculative=False)
    first = server.chat("the same prompt", cache_prompt=True, speculative=True)
    second = server.chat("the same prompt")
    assert all(not r.cache_prompt and not r.speculative for r in server.engine.requests)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_scoring_a_prompt_never_uses_the_prefix_cache(serve: Any) -> None:
    server = serve()
    server.post("/v1/completions", {"prompt": "score me", "echo": True, "logprobs": 0, "max_tokens": 1})
    server.post("/v1/completions", {"prompt": "score me", "echo": True, "max_tokens": 1})  # echo alone: no scoring
    scored, echoed = server.engine.requests
    assert scored.prompt_logprobs and not scored.cache_prompt
    assert not echoed.prompt_logprobs and echoed.cache_prompt


def test_with_auth_each_tenant_has_its_own_prefix_scope(serve: Any) -> None:
    server = serve(auth=True)
    prompt = "You are a helpful assistant. What is the capital of France?"
    acme_first = server.chat(prompt, tenant="acme")
    beta_first = server.chat(prompt, tenant="beta")
    acme_again = server.chat(prompt, tenant="acme")
    scopes = [(r.prefix_scope, r.fairness_key) for r in server.engine.requests]
    assert scopes == [("acme", "acme"), ("beta", "beta"), ("acme", "acme")]
    cached = [u["usage"]["prompt_tokens_details"]["cached_tokens"] for u in (acme_first, beta_first, acme_again)]
    assert cached[0] == 0 and cached[1] == 0  # beta does not hit what acme sent: no timing side channel
    assert cached[2] == acme_again["usage"]["prompt_tokens"] - 1


def test_shared_prefix_cache_lets_tenants_hit_each_other(serve: Any) -> None:
    server = serve(auth=True, prefix_cache_shared=True)
    prompt = "You are a helpful assistant. What is the capital of France?"
    server.chat(prompt, tenant="acme")
    beta = server.chat(prompt, tenant="beta")
    assert [r.prefix_scope for r in server.engine.requests] == [None, None]
    assert [r.fairness_key for r in server.engine.requests] == ["acme", "beta"]  # fairness still per tenant
    assert beta["usage"]["prompt_tokens_details"]["cached_tokens"] == beta["usage"]["prompt_tokens"] - 1


def test_engine_options_rules() -> None:
    keyed = Principal(tenant="acme", tenant_id=1, role="consumer", key_prefix="abc")
    default = Settings()
    assert engine_options(default, LOCAL_ADMIN, cache_prompt=True, speculative=True).prefix_scope is None
    assert engine_options(default, keyed, cache_prompt=True, speculative=False) == EngineOptions(
        fairness_key="acme", prefix_scope="acme", cache_prompt=True, speculative=False
    )
    assert not engine_options(default, keyed, cache_prompt=False, speculative=True).cache_prompt
    shared = Settings(prefix_cache_shared=True)
    assert engine_options(shared, keyed, cache_prompt=True, speculative=True).prefix_scope is None
    off = Settings(prefix_cache=False, speculative=False)
    options = engine_options(off, keyed, cache_prompt=True, speculative=True)
    assert not options.cache_prompt and not options.speculative


# --- usage.prompt_tokens_details.cached_tokens ----------------------------------------------------------------------


def test_cached_tokens_in_plain_and_streamed_usage_parsed_by_the_openai_client(serve: Any) -> None:
    server = serve()
    client = server.openai()
    messages: Any = [{"role": "user", "content": "Tell me about the sea."}]
    first = client.chat.completions.create(model=MODEL, messages=messages)
    again = client.chat.completions.create(model=MODEL, messages=messages)
    assert first.usage is not None and first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1 > 0

    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER.decode()

    completion = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3)
    completion_again = client.completions.create(model=MODEL, prompt="Once upon a time, far away", max_tokens=3)
    assert completion.usage is not None and completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 0
    assert completion_again.usage is not None and completion_again.usage.prompt_tokens_details is not None
    assert completion_again.usage.prompt_tokens_details.cached_tokens == len("Once upon a time")

    streamed = list(
        client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=3, stream=True, stream_options={"include_usage": True}
        )
    )
    assert streamed[-1].usage is not None and streamed[-1].usage.prompt_tokens_details is not None
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens == len("Once upon a time") - 1


def test_cached_tokens_never_exceed_the_prompt_tokens_usage_counts(serve: Any) -> None:
    """Usage counts a prompt once for its ``n`` choices: it is cached as far as every choice found it cached."""
    server = serve()
    body = {"prompt": ["first prompt", "second prompt!"], "n": 2, "max_tokens": 3}
    cold = server.post("/v1/completions", body)
    # the toy engine caches each prompt as it is submitted: choice 1 of each prompt hit choice 0's copy
    assert [r.cache_prompt for r in server.engine.requests] == [True] * 4
    assert cold["usage"]["prompt_tokens"] == len("first prompt") + len("second prompt!")
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    warm = server.post("/v1/completions", body)
    expected = len("first prompt") - 1 + len("second prompt!") - 1
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == expected <= warm["usage"]["prompt_tokens"]
    chat = server.chat("n choices", n=3)
    chat_again = server.chat("n choices", n=3)
    assert chat["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert chat_again["usage"]["prompt_tokens_details"]["cached_tokens"] == chat_again["usage"]["prompt_tokens"] - 1


def test_raw_stream_usage_chunk_carries_cached_tokens(serve: Any) -> None:
    server = serve()
    body = {"messages": [{"role": "user", "content": "stream"}], "stream": True}
    server.chat("stream")
    with server.client.stream(
        "POST", "/v1/chat/completions", json={"model": MODEL, **body, "stream_options": {"include_usage": True}}
    ) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": usage["prompt_tokens"] - 1}


def test_render_usage_shape() -> None:
    assert render.usage(10, 3, 7) == {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "total_tokens": 13,
        "prompt_tokens_details": {"cached_tokens": 7},
    }
    assert render.usage(10, 3)["prompt_tokens_details"] == {"cached_tokens": 0}


# --- metrics --------------------------------------------------------------------------------------------------------


def test_prefix_cache_counters_move_once_per_finished_request(serve: Any) -> None:
    server = serve()
    prompt = "count these prompt tokens"
    assert server.counters() == {"hit": 0.0, "miss": 0.0}
    first = server.chat(prompt)
    tokens = first["usage"]["prompt_tokens"]
    assert server.counters() == {"hit": 0.0, "miss": float(tokens)}
    server.chat(prompt)
    assert server.counters() == {"hit": float(tokens - 1), "miss": float(tokens + 1)}
    server.chat(prompt, n=2)  # per engine request: two choices, two hits
    assert server.counters() == {"hit": float(3 * (tokens - 1)), "miss": float(tokens + 3)}
    scraped = server.client.get("/metrics").text
    assert f'llmos_prefix_cache_hit_tokens_total{{model="{MODEL}"}} {float(3 * (tokens - 1))}' in scraped


def test_a_choice_whose_final_event_was_never_read_is_still_counted() -> None:
    """The client left before reading the end: the final event, already delivered, still feeds the counters."""
    metrics = Metrics()

    async def scenario() -> Call:
        engine = SimpleNamespace(abort=lambda request_id: None)
        target: Any = SimpleNamespace(name=MODEL, model=SimpleNamespace(engine=engine), release=lambda: None)
        request = GenerationRequest([65] * 12, SamplingParams(max_tokens=5))
        stream = AsyncOutputStream()
        call = Call(target, [request], [stream], metrics, time.monotonic(), prompt_tokens=12)
        common: Any = {"prompt_tokens": 12, "cached_tokens": 8}
        stream.push(GenerationOutput(request.request_id, text="a", token_ids=[97], completion_tokens=1, **common))
        stream.push(GenerationOutput(request.request_id, text="b", token_ids=[98], completion_tokens=2, **common))
        stream.push(
            GenerationOutput(request.request_id, finished=True, finish_reason="stop", completion_tokens=2, **common)
        )
        outputs = call.outputs()
        await outputs.__anext__()
        await asyncio.sleep(0.01)  # every event is delivered; only the first was read
        await outputs.aclose()
        return call

    call = asyncio.run(scenario())
    assert call.cached == {0: 8}
    assert prefix_counters(metrics) == {"hit": 8.0, "miss": 4.0}


def test_the_real_engine_reports_cached_tokens_through_the_api(serve: Any) -> None:
    """End to end over the engine (fake backend): a tenant's repeat hits its own cache, another tenant's does not."""
    server = serve(real_engine=True, auth=True)
    prompt = "You are a helpful assistant. Repeat after me: the sea is blue."
    cold = server.chat(prompt, tenant="acme", max_tokens=4)
    warm = server.chat(prompt, tenant="acme", max_tokens=4)
    other = server.chat(prompt, tenant="beta", max_tokens=4)
    cached = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in (cold, warm, other)]
    assert cached[0] == 0 and 0 < cached[1] < warm["usage"]["prompt_tokens"] and cached[2] == 0
    assert warm["choices"][0]["message"]["content"] == cold["choices"][0]["message"]["content"]
    counters = server.counters()
    assert counters["hit"] == cached[1]
    assert counters["hit"] + counters["miss"] == 3 * cold["usage"]["prompt_tokens"]


def test_sdk_passes_the_switches_and_reports_cached_tokens() -> None:
    backend = FakeBackend()
    engine = EngineCore(backend, EngineConfig(speculative=True))
    model = Model(LoadedModel(VIEW, backend, engine))
    prompt = "The quick brown fox jumps over the lazy dog."
    try:
        first = model.generate_text(prompt, raw=True, max_length=4)
        assert model.last_stats is not None and model.last_stats.cached_tokens == 0
        again = model.generate_text(prompt, raw=True, max_length=4)
        assert model.last_stats is not None and 0 < model.last_stats.cached_tokens < model.last_stats.prompt_tokens
        assert again == first
        model.generate_text(prompt, raw=True, max_length=4, cache_prompt=False, speculative=False)
        assert model.last_stats is not None and model.last_stats.cached_tokens == 0
    finally:
        model.close()
