"""`llmos serve` end to end: the official openai client, a real server subprocess, the real SmolLM2 GGUF."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest

from llmos.config import Settings
from tests.helpers import ServerProcess, run_cli

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(pulled_settings: Settings) -> Iterator[ServerProcess]:
    process = ServerProcess(pulled_settings.home, "--model", "smollm2")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert "smollm2:latest" in ids
    model = client.models.retrieve("smollm2:latest")
    assert model.owned_by == "library" and model.created > 0


def test_chat_plain_answers_paris_with_usage(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=32)
    choice = response.choices[0]
    assert "Paris" in (choice.message.content or "")
    assert choice.finish_reason == "stop"
    assert response.usage is not None and response.usage.prompt_tokens > 5
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_chat_streamed_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="smollm2",
        messages=QUESTION,
        temperature=0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_length_finish_and_stop_sequences(client: openai.OpenAI) -> None:
    short = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2  # type: ignore[union-attr]
    stopped = client.chat.completions.create(
        model="smollm2", messages=QUESTION, temperature=0, max_tokens=32, stop=["Paris"]
    )
    assert "Paris" not in (stopped.choices[0].message.content or "")
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model="smollm2", messages=QUESTION, temperature=0, max_tokens=32, stop=["is Pa"], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text.endswith("France ") and "Pa" not in text.split("France")[-1]


def test_n_choices_seed_and_logprobs(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="smollm2", messages=QUESTION, temperature=1.0, seed=3, n=3, max_tokens=8, logprobs=True, top_logprobs=2
    )
    assert [c.index for c in response.choices] == [0, 1, 2]
    again = client.chat.completions.create(
        model="smollm2", messages=QUESTION, temperature=1.0, seed=3, n=3, max_tokens=8
    )
    assert [c.message.content for c in response.choices] == [c.message.content for c in again.choices]
    content = response.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and all(len(item.top_logprobs) == 2 and item.logprob <= 0 for item in content)


def test_completions_echo_logprobs_and_scoring(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0, echo=True, logprobs=2
    )
    choice = response.choices[0]
    assert choice.text.startswith("The capital of France is") and "Paris" in choice.text
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs
    assert logprobs.token_logprobs[0] is None  # nothing predicts the first token
    assert "".join(logprobs.tokens) == choice.text
    scored = client.completions.create(
        model="smollm2", prompt=["The capital of France is Paris", "The capital of France is Rome"],
        max_tokens=0, echo=True, logprobs=0,
    )  # fmt: skip
    paris, rome = (sum(lp for lp in c.logprobs.token_logprobs[1:]) for c in scored.choices)  # type: ignore[union-attr, misc]
    assert paris > rome  # the loglikelihood path evaluation harnesses use
    assert scored.usage is not None and scored.usage.completion_tokens == 0


def test_completions_plain_and_streamed(client: openai.OpenAI) -> None:
    plain = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=3, temperature=0)
    assert "Paris" in plain.choices[0].text
    streamed = client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=3, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == plain.choices[0].text


def test_typed_client_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    assert missing.value.code == "model_not_found"
    assert "/" not in str(missing.value.body)  # no store paths leak
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=-1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="smollm2", prompt="x", suffix="y")


def test_json_schema_output_always_validates(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
        "required": ["name", "age", "city"],
        "additionalProperties": False,
    }
    prompts = ["Describe a person.", "Invent a character for a novel.", "Who lives in Paris?", "Tell me about Bob."]
    for prompt in prompts:
        response = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": prompt}],
            temperature=0.7,
            seed=11,
            max_tokens=120,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
        )
        jsonschema.validate(json.loads(response.choices[0].message.content or ""), schema)
    obj = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "List three fruits as JSON."}],
        temperature=0,
        max_tokens=120,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)


def test_greedy_answer_is_the_same_alone_and_in_a_full_batch(client: openai.OpenAI) -> None:
    """The same greedy request gives the same text alone and among 15 concurrent others."""

    def ask(messages: list[dict[str, str]]) -> str:
        response = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=48)
        return response.choices[0].message.content or ""

    alone = ask(QUESTION)
    results: dict[int, str] = {}
    others = [[{"role": "user", "content": f"Write a poem about the number {i}."}] for i in range(15)]

    def worker(i: int) -> None:
        results[i] = ask(others[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(15)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # the others are decoding when ours arrives
    batched = ask(QUESTION)
    for thread in threads:
        thread.join()
    assert len(results) == 15
    assert batched == alone
    assert "Paris" in batched


def test_metrics_and_request_ids(server: ServerProcess) -> None:
    response = httpx.get(f"{server.base}/metrics")
    assert response.status_code == 200 and response.headers["x-request-id"]
    text = response.text
    for name in (
        "llmos_http_requests_total",
        "llmos_prompt_tokens_total",
        "llmos_completion_tokens_total",
        "llmos_time_to_first_token_seconds_bucket",
        "llmos_inter_token_latency_seconds_bucket",
        "llmos_queue_depth",
        "llmos_running_sequences",
        "llmos_kv_cache_usage_ratio",
        "llmos_batch_size_bucket",
    ):
        assert name in text, name
    echoed = httpx.get(f"{server.base}/health", headers={"x-request-id": "trace-123"})
    assert echoed.headers["x-request-id"] == "trace-123"
    error = httpx.post(f"{server.base}/v1/chat/completions", content=b"{")
    assert error.status_code == 400 and error.headers["x-request-id"]


def test_runtime_view_and_llmos_ps(server: ServerProcess, pulled_settings: Settings) -> None:
    models = httpx.get(f"{server.base}/admin/runtime").json()["models"]
    assert models[0]["name"] == "smollm2:latest" and models[0]["slots"] == 16
    listed = run_cli(pulled_settings.home, "ps", "--url", server.base, "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)[0]["backend"] == "llama.cpp"
    table = run_cli(pulled_settings.home, "ps", "--url", server.base)
    assert "smollm2:latest" in table.stdout and "RUNNING" in table.stdout
    down = run_cli(pulled_settings.home, "ps", "--url", "http://127.0.0.1:9")
    assert down.returncode == 1 and "no llmos server answers" in down.stderr


async def _stream_and_drop(base: str) -> None:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Write a very long story."}], "stream": True,
            "max_tokens": 400, "temperature": 0}  # fmt: skip
    async with (
        httpx.AsyncClient(timeout=60) as http,
        http.stream("POST", f"{base}/v1/chat/completions", json=body) as r,
    ):
        lines = 0
        async for _line in r.aiter_lines():
            lines += 1
            if lines > 6:
                break  # the client goes away mid-stream


def cancelled_count(base: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("llmos_requests_finished_total") and 'reason="cancelled"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_client_disconnect_aborts_the_sequence_and_others_go_on(server: ServerProcess, client: openai.OpenAI) -> None:
    before = cancelled_count(server.base)
    result: dict[str, str] = {}

    def other() -> None:
        response = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=32)
        result["text"] = response.choices[0].message.content or ""

    thread = threading.Thread(target=other)
    thread.start()
    asyncio.run(_stream_and_drop(server.base))
    thread.join()
    assert "Paris" in result["text"]
    deadline = time.monotonic() + 10
    while cancelled_count(server.base) <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cancelled_count(server.base) == before + 1
    runtime = httpx.get(f"{server.base}/admin/runtime").json()["models"][0]
    assert runtime["running"] == 0  # its slot and KV cache are free again


STORY = [{"role": "user", "content": "Tell me a long story."}]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": STORY, "max_tokens": 2000}),
        ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 2000}),
        ("/v1/responses", {"input": "Tell me a long story.", "max_output_tokens": 2000}),
        ("/v1/messages", {"messages": STORY, "max_tokens": 2000}),
        ("/api/generate", {"prompt": "Tell me a long story.", "stream": False, "options": {"num_predict": 2000}}),
    ],
)
def test_a_client_that_leaves_a_non_streamed_request_aborts_it(
    server: ServerProcess, path: str, body: dict[str, object]
) -> None:
    """The answer of a non-streamed request is sent at the end; a client that gives up before then must not leave
    its sequence generating to the token limit."""
    before = cancelled_count(server.base)
    for seed in (1, 2, 3):  # a sampled story may end within the second on some CPU's numerics: then try another seed
        request = {"model": "smollm2", "temperature": 1.0, "seed": seed, **body}
        try:
            httpx.post(f"{server.base}{path}", json=request, timeout=httpx.Timeout(10, read=1.0))
        except httpx.ReadTimeout:
            break
    else:
        pytest.fail("three sampled stories each ended within one second; the client never left")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        cancelled_count(server.base) <= before
        or httpx.get(f"{server.base}/admin/runtime").json()["models"][0]["running"] > 0
    ):
        time.sleep(0.1)
    assert cancelled_count(server.base) == before + 1
    assert httpx.get(f"{server.base}/admin/runtime").json()["models"][0]["running"] == 0


def test_shutdown_cancels_requests_still_in_flight_after_the_grace_period(pulled_settings: Settings) -> None:
    """SIGTERM lets requests finish for LLMOS_SHUTDOWN_GRACE_SECONDS, then cancels them: a server never hangs in
    shutdown behind a request that still has thousands of tokens to generate."""
    process = ServerProcess(pulled_settings.home, "--model", "smollm2", env={"LLMOS_SHUTDOWN_GRACE_SECONDS": "2"})
    body = {"model": "smollm2", "messages": STORY, "max_tokens": 8000, "temperature": 1.0, "seed": 3}
    waiting = threading.Thread(
        target=lambda: httpx.post(f"{process.base}/v1/chat/completions", json=body, timeout=120), daemon=True
    )
    waiting.start()
    deadline = time.monotonic() + 30
    while httpx.get(f"{process.base}/admin/runtime").json()["models"][0]["running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    started = time.monotonic()
    process.process.terminate()
    try:
        assert process.process.wait(20) is not None
        assert time.monotonic() - started < 15
    finally:
        process.stop()
