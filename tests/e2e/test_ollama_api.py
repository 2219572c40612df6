"""Ollama's native API (``/api/...``) through `llmos serve`, with the official ``ollama`` client and the real models.

One server for the module, on a store of its own (SmolLM2 pulled beforehand; MiniLM pulled through ``/api/pull``),
since pull, copy and delete change it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import ollama
import pytest

import llmos
from llmos.config import Settings
from llmos.registry import sources
from llmos.registry.service import Registry
from tests.helpers import ServerProcess

PARIS = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY: dict[str, Any] = {"temperature": 0, "num_predict": 24}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    settings = Settings(home=tmp_path_factory.mktemp("ollama") / "home")
    registry = Registry(settings)
    sources.pull(registry, "smollm2")
    registry.close()
    return settings.home


@pytest.fixture(scope="module")
def server(store: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(store, "--model", "smollm2")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> ollama.Client:
    return ollama.Client(host=server.base, timeout=120)


@pytest.fixture(scope="module")
def minilm_pull(client: ollama.Client) -> list[ollama.ProgressResponse]:
    """MiniLM pulled through /api/pull, streamed: the status lines the client saw."""
    return list(client.pull("minilm", stream=True))


def models(client: ollama.Client) -> dict[str, ollama.ListResponse.Model]:
    return {str(m.model): m for m in client.list().models}


def test_version_tags_and_show(server: ServerProcess, client: ollama.Client, store: Path) -> None:
    root = httpx.get(f"{server.base}/")
    assert root.status_code == 200 and root.text == "Ollama is running"
    assert root.headers["content-type"].startswith("text/plain")
    head = httpx.head(f"{server.base}/")
    assert head.status_code == 200 and head.content == b""
    assert httpx.get(f"{server.base}/console", follow_redirects=False).headers["location"] == "/console/"
    assert httpx.get(f"{server.base}/api/version").json() == {"version": llmos.__version__}
    listed = models(client)
    entry = listed["smollm2:latest"]
    registry = Registry(Settings(home=store))
    digest = registry.show("smollm2").digest
    registry.close()
    assert entry.digest == digest.removeprefix("sha256:") and len(entry.digest) == 64
    assert entry.size is not None and entry.size > 50_000_000
    assert entry.details is not None
    assert (entry.details.format, entry.details.family, entry.details.quantization_level) == ("gguf", "llama", "Q4_1")
    assert entry.details.parameter_size and entry.details.parameter_size.endswith("M")
    assert entry.modified_at is not None and entry.modified_at <= datetime.now(UTC)

    shown = client.show("smollm2")
    assert shown.capabilities == ["completion", "tools"]  # every GGUF model calls tools (generic format for ChatML)
    assert shown.template and "<|im_start|>" in shown.template
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"
    assert shown.details is not None and shown.details.family == "llama"
    with pytest.raises(ollama.ResponseError) as missing:
        client.show("no-such-model")
    assert missing.value.status_code == 404 and "not found" in missing.value.error


def test_chat_whole_and_streamed(client: ollama.Client) -> None:
    answer = client.chat(model="smollm2", messages=PARIS, options=GREEDY, stream=False)
    assert "Paris" in (answer.message.content or "")
    assert answer.message.role == "assistant" and answer.model == "smollm2:latest"
    assert answer.done and answer.done_reason == "stop"
    assert answer.eval_count and answer.eval_count > 0
    assert answer.prompt_eval_count and answer.prompt_eval_count > 5
    assert answer.total_duration and answer.eval_duration and answer.total_duration >= answer.eval_duration > 0

    chunks = list(client.chat(model="smollm2", messages=PARIS, options=GREEDY, stream=True))
    text = "".join(chunk.message.content or "" for chunk in chunks)
    assert "Paris" in text
    assert len(chunks) > 2 and not any(chunk.done for chunk in chunks[:-1])
    final = chunks[-1]
    assert final.done and final.done_reason == "stop" and final.eval_count and final.eval_count > 0

    cut = client.chat(model="smollm2", messages=PARIS, options={"temperature": 0, "num_predict": 3})
    assert cut.done_reason == "length" and cut.eval_count == 3
    # num_predict past the window and a num_ctx beyond the model's: generation runs to its natural end
    long = client.chat(
        model="smollm2", messages=PARIS, options={"temperature": 0, "num_predict": 10**6, "num_ctx": 10**6}
    )
    assert long.done_reason == "stop" and "Paris" in (long.message.content or "")


def test_generate_templated_raw_streamed_and_load(client: ollama.Client) -> None:
    templated = client.generate(model="smollm2", prompt="What is the capital of France?", options=GREEDY)
    assert "Paris" in (templated.response or "") and templated.done and templated.eval_count
    raw_prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    raw = client.generate(model="smollm2", prompt=raw_prompt, raw=True, options=GREEDY)
    assert "Paris" in (raw.response or "") and raw.prompt_eval_count == templated.prompt_eval_count
    streamed = list(client.generate(model="smollm2", prompt=raw_prompt, raw=True, options=GREEDY, stream=True))
    assert "".join(part.response or "" for part in streamed) == raw.response
    assert streamed[-1].done and streamed[-1].eval_count == raw.eval_count
    loaded = client.generate(model="smollm2")  # no prompt: load the model, as Ollama does
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    scored = client.generate(
        model="smollm2", prompt="Hi", logprobs=True, top_logprobs=2, options=GREEDY | {"num_predict": 3}
    )
    assert scored.logprobs and len(scored.logprobs) == 3
    assert all(item.logprob <= 0 and len(item.top_logprobs or []) == 2 for item in scored.logprobs)


def test_format_json_schema(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "Which city is the capital of France? Answer as JSON."}]
    response = client.chat(model="smollm2", messages=messages, format=CITY_SCHEMA, options=GREEDY | {"num_predict": 60})
    parsed = json.loads(response.message.content or "")
    jsonschema.validate(parsed, CITY_SCHEMA)
    mode = client.generate(model="smollm2", prompt="Describe Paris as JSON.", format="json", options=GREEDY)
    text = mode.response or ""
    if mode.done_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert text.lstrip().startswith("{")


def check_calls(message: ollama.Message) -> None:
    """The answer is text or calls of the offered function, arguments as objects."""
    if not message.tool_calls:
        assert message.content
        return
    for call in message.tool_calls:
        assert call.function.name == "get_weather"
        assert isinstance(call.function.arguments, dict) and isinstance(call.function.arguments["city"], str)


def test_chat_with_tools(client: ollama.Client) -> None:
    ask = [{"role": "user", "content": "Call get_weather for Paris in celsius, now."}]
    response = client.chat(model="smollm2", messages=ask, tools=[WEATHER], options=GREEDY | {"num_predict": 80})
    check_calls(response.message)
    chunks = list(
        client.chat(model="smollm2", messages=ask, tools=[WEATHER], options=GREEDY | {"num_predict": 80}, stream=True)
    )
    assert chunks[-1].done
    streamed = ollama.Message(
        role="assistant",
        content="".join(c.message.content or "" for c in chunks),
        tool_calls=[call for c in chunks for call in c.message.tool_calls or []],
    )
    check_calls(streamed)
    # a finished loop as Ollama's clients send it: calls with object arguments, results named by tool_name
    call = {"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}
    history: list[dict[str, Any]] = [
        *ask,
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_name": "get_weather", "content": '{"forecast": "rain", "celsius": 12}'},
    ]
    answer = client.chat(model="smollm2", messages=history, tools=[WEATHER], options=GREEDY | {"num_predict": 60})
    check_calls(answer.message)
    orphan = [*ask, {"role": "tool", "tool_name": "get_weather", "content": "rain"}]
    with pytest.raises(ollama.ResponseError) as refused:
        client.chat(model="smollm2", messages=orphan)
    assert refused.value.status_code == 400 and "tool result" in refused.value.error


def test_pull_and_embed(client: ollama.Client, minilm_pull: list[ollama.ProgressResponse]) -> None:
    statuses = [line.status for line in minilm_pull]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    progress = [line for line in minilm_pull if line.total]
    assert progress and any(line.completed == line.total for line in progress)
    assert "minilm:latest" in models(client)
    assert client.show("minilm").capabilities == ["embedding"]
    assert client.pull("minilm").status == "success"  # again, not streamed: already there

    texts = ["The cat sits on the mat.", "A cat is sitting on a mat.", "Stock markets fell sharply today."]
    result = client.embed(model="minilm", input=texts)
    vectors = np.array(result.embeddings)
    assert vectors.shape == (3, 384) and result.prompt_eval_count and result.prompt_eval_count > 10
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert unit[0] @ unit[1] > unit[0] @ unit[2] + 0.3
    legacy = client.embeddings(model="minilm", prompt=texts[0]).embedding
    assert np.allclose(legacy, vectors[0], atol=1e-5)
    long_text = "word " * 600
    assert len(client.embed(model="minilm", input=long_text).embeddings[0]) == 384  # truncated, as Ollama does
    with pytest.raises(ollama.ResponseError) as too_long:
        client.embed(model="minilm", input=long_text, truncate=False)
    assert too_long.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as not_embedding:
        client.embed(model="smollm2", input="x")
    assert not_embedding.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as shorter:
        client.embed(model="minilm", input="x", dimensions=128)
    assert shorter.value.status_code == 400 and "384 dimensions" in shorter.value.error
    assert len(client.embed(model="minilm", input="x", dimensions=384).embeddings[0]) == 384
    loaded = client.embed(model="minilm", input=[])  # no input: only loads the model
    assert loaded.embeddings == [] and loaded.model == "minilm:latest"
    assert client.embeddings(model="minilm", prompt="").embedding == []


def test_ps_shows_the_loaded_model(client: ollama.Client) -> None:
    client.chat(model="smollm2", messages=PARIS, options={"num_predict": 1}, keep_alive="10m")
    running = {str(m.model): m for m in client.ps().models}
    smollm2 = running["smollm2:latest"]
    assert smollm2.size and smollm2.size > 0 and smollm2.size_vram == 0
    assert smollm2.context_length and smollm2.context_length > 0
    assert smollm2.expires_at is not None
    remaining = (smollm2.expires_at - datetime.now(UTC)).total_seconds()
    assert 500 < remaining <= 600


def test_copy_and_delete(client: ollama.Client) -> None:
    client.copy("smollm2", "ollama-copy:v1")
    listed = models(client)
    assert listed["ollama-copy:v1"].digest == listed["smollm2:latest"].digest
    assert "Paris" in (client.chat(model="ollama-copy:v1", messages=PARIS, options=GREEDY).message.content or "")
    client.delete("ollama-copy:v1")
    assert "ollama-copy:v1" not in models(client) and "smollm2:latest" in models(client)
    with pytest.raises(ollama.ResponseError) as gone:
        client.delete("ollama-copy:v1")
    assert gone.value.status_code == 404


@pytest.mark.parametrize(
    ("request_body", "status", "fragment"),
    [
        ({"messages": [{"role": "user", "content": "x", "images": ["aGVsbG8="]}]}, 400, "images"),
        ({"messages": PARIS, "options": {"temperature": "hot"}}, 400, "options.temperature"),
        ({"messages": PARIS, "options": {"num_predict": True}}, 400, "options.num_predict"),
        ({"messages": PARIS, "think": True}, 400, "thinking"),
        ({"messages": PARIS, "keep_alive": "soon"}, 400, "keep_alive"),
        ({"messages": PARIS, "format": {"type": "object", "properties": {"a": {"type": "strin"}}}}, 400, "schema"),
        ({"messages": PARIS, "format": "json", "tools": [WEATHER]}, 400, "format"),
        ({"model": "no-such-model", "messages": PARIS}, 404, "not found"),
    ],
)
def test_bad_chat_input(server: ServerProcess, request_body: dict[str, Any], status: int, fragment: str) -> None:
    body = {"model": "smollm2", "stream": False, **request_body}
    response = httpx.post(f"{server.base}/api/chat", json=body, timeout=60)
    assert response.status_code == status
    assert fragment in response.json()["error"]  # Ollama's error shape: {"error": "message"}


def test_bad_input_through_the_client_and_the_server_keeps_serving(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as images:
        client.chat(model="smollm2", messages=[{"role": "user", "content": "x", "images": [b"\x89PNG"]}])
    assert images.value.status_code == 400 and "images are not supported" in images.value.error
    with pytest.raises(ollama.ResponseError) as hot:
        client.chat(model="smollm2", messages=PARIS, options={"temperature": "hot"})
    assert hot.value.status_code == 400 and "options.temperature" in hot.value.error
    with pytest.raises(ollama.ResponseError) as unknown:
        next(iter(client.chat(model="no-such-model", messages=PARIS, stream=True)))
    assert unknown.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as suffix:
        client.generate(model="smollm2", prompt="hi", suffix="x")
    assert suffix.value.status_code == 400 and "suffix" in suffix.value.error
    with pytest.raises(ollama.ResponseError) as context:
        client.generate(model="smollm2", prompt="hi", context=[1, 2])
    assert context.value.status_code == 400 and "context" in context.value.error
    before = models(client)
    with pytest.raises(ollama.ResponseError) as unpullable:
        client.pull("no-such-model")
    assert unpullable.value.status_code == 404 and "can be pulled" in unpullable.value.error
    assert (
        "minilm (all-MiniLM-L6-v2" in unpullable.value.error and "needs `pip install gt-" not in unpullable.value.error
    )
    assert models(client).keys() == before.keys()
    ignored = client.chat(model="smollm2", messages=PARIS, options=GREEDY | {"no_such_option": "x", "mirostat": 0})
    assert "Paris" in (ignored.message.content or "")
