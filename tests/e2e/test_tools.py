"""Tool calling through `llmos serve` with the official openai client, on the real SmolLM2 GGUF.

SmolLM2's chat template knows nothing of tools, so this runs llmos's generic format: tools listed in the system
message, calls constrained by a grammar built from each function's parameter schema.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from llmos.config import Settings
from tests.helpers import ServerProcess

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather forecast for a city", "parameters": WEATHER_PARAMETERS},
}
TIME_PARAMETERS = {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "description": "Current time in a timezone", "parameters": TIME_PARAMETERS},
}
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
CITIES = [
    "Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Sydney", "Toronto", "Nairobi", "Madrid", "Hanoi",
    "Quito", "Dublin", "Seoul", "Lagos", "Prague", "Denver", "Mumbai", "Lisbon", "Santiago", "Helsinki",
]  # fmt: skip
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def server(pulled_settings: Settings) -> Iterator[ServerProcess]:
    process = ServerProcess(pulled_settings.home, "--model", "smollm2")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(city: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"Will I need an umbrella in {city} this week?"}]


def assert_valid(name: str, arguments: str) -> dict[str, Any]:
    parsed = json.loads(arguments)
    jsonschema.validate(parsed, SCHEMAS[name])
    return dict(parsed)


def streamed_calls(stream: Any) -> tuple[list[tuple[str, str, str]], str | None, str]:
    """(id, name, arguments) per call index, the finish reason and the streamed text, as a client accumulates them."""
    calls: dict[int, list[str]] = {}
    reason, text = None, ""
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        text += choice.delta.content or ""
        for part in choice.delta.tool_calls or []:
            entry = calls.setdefault(part.index, ["", "", ""])
            entry[0] += part.id or ""
            entry[1] += (part.function.name or "") if part.function else ""
            entry[2] += (part.function.arguments or "") if part.function else ""
        reason = choice.finish_reason or reason
    return [(a, b, c) for a, b, c in (calls[i] for i in sorted(calls))], reason, text


def test_required_and_named_calls_validate_for_20_prompts_plain_and_streamed(client: openai.OpenAI) -> None:
    def one(index: int, city: str) -> int:
        """The city's request plain, then streamed; returns how many calls named the city."""
        choice: Any = "required" if index % 2 else NAMED
        request: dict[str, Any] = {
            "model": "smollm2",
            "messages": ask(city),
            "tools": [WEATHER, TIME],
            "tool_choice": choice,
            "temperature": 0,
            "max_tokens": 200,
        }
        response = client.chat.completions.create(**request)
        message = response.choices[0].message
        assert response.choices[0].finish_reason == "tool_calls" and message.tool_calls
        named = 0
        for call in message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            arguments = assert_valid(call.function.name, call.function.arguments)
            named += arguments.get("city") == city
        if choice == NAMED:
            assert [call.function.name for call in message.tool_calls] == ["get_weather"]
        stream = client.chat.completions.create(**request, stream=True)
        calls, reason, _text = streamed_calls(stream)
        assert reason == "tool_calls" and calls
        for call_id, name, arguments in calls:
            assert call_id.startswith("call_")
            assert_valid(name, arguments)
        return named

    # the 20 cities run side by side, as an application's users would send them: the server batches them (greedy
    # answers do not depend on the batch, tests/integration/test_greedy_identity.py), and each one's grammar holds
    with ThreadPoolExecutor(max_workers=8) as pool:
        cities_seen = sum(pool.map(one, range(len(CITIES)), CITIES))
    assert cities_seen >= 10  # the arguments are about the question, not just well formed


def test_a_full_loop_call_result_answer(client: openai.OpenAI) -> None:
    messages: list[Any] = ask("Paris")
    first = client.chat.completions.create(
        model="smollm2", messages=messages, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=80
    )
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "rain all week", "high": 14})},
    ]
    final = client.chat.completions.create(
        model="smollm2", messages=messages, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=60
    )
    answer = final.choices[0]
    assert answer.message.tool_calls is None and answer.finish_reason in ("stop", "length")
    assert answer.message.content and answer.message.content.strip()


def test_none_never_calls(client: openai.OpenAI) -> None:
    for city in CITIES[:5]:
        response = client.chat.completions.create(
            model="smollm2", messages=ask(city), tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=40
        )
        assert response.choices[0].message.tool_calls is None
        assert response.choices[0].finish_reason != "tool_calls" and response.choices[0].message.content


def test_parallel_tool_calls_with_two_functions(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "What time is it in Tokyo, and what is the weather there?"}]
    both = client.chat.completions.create(
        model="smollm2", messages=messages, tools=[WEATHER, TIME], tool_choice="required", temperature=0, max_tokens=120
    )
    calls = both.choices[0].message.tool_calls or []
    assert 1 <= len(calls) <= 2 and len({c.id for c in calls}) == len(calls)
    for call in calls:
        assert_valid(call.function.name, call.function.arguments)
    one = client.chat.completions.create(
        model="smollm2",
        messages=messages,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=120,
    )
    assert len(one.choices[0].message.tool_calls or []) == 1


def test_auto_answers_in_text_or_with_a_valid_call(client: openai.OpenAI) -> None:
    for city in CITIES[:6]:
        response = client.chat.completions.create(
            model="smollm2", messages=ask(city), tools=[WEATHER], temperature=0, max_tokens=60
        )
        message = response.choices[0].message
        if message.tool_calls:
            assert response.choices[0].finish_reason == "tool_calls"
            for call in message.tool_calls:
                assert_valid(call.function.name, call.function.arguments)
        else:
            assert message.content


def test_a_trigger_echoed_from_the_prompt_never_brings_the_server_down(
    server: ServerProcess, client: openai.OpenAI
) -> None:
    """A user who types the call marker makes SmolLM2 echo "<tool_call> weather ...": text the call grammar rejects.
    llama.cpp's lazy grammar fed it unchecked and aborted the process; llmos arms the grammar only with text it
    accepts, so the answer is text or a valid call and the server keeps serving."""
    for content in ["<tool_call> weather Paris", "<tool_call>", "Say <tool_call> then stop"]:
        response = client.chat.completions.create(
            model="smollm2",
            messages=[
                {"role": "system", "content": "You are a helpful assistant that always calls tools."},
                {"role": "user", "content": content},
            ],
            tools=[WEATHER],
            temperature=0,
            max_tokens=60,
        )
        for call in response.choices[0].message.tool_calls or []:
            assert_valid(call.function.name, call.function.arguments)
    assert server.process.poll() is None
    assert httpx.get(f"{server.base}/health", timeout=10).status_code == 200


def error_of(server: ServerProcess, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    return dict(response.json()["error"])


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 3}}}
                ]
            },
            "tools",
            "not a valid JSON schema",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(1000)]},
            "tools",
            "at most 128",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "tool", "tool_call_id": "call_x", "content": "1"},
                ]
            },
            "messages",
            "no earlier assistant",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ],
)
def test_bad_tool_requests_get_a_400_naming_the_field(
    server: ServerProcess, client: openai.OpenAI, fields: dict[str, Any], param: str, words: str
) -> None:
    body = {"model": "smollm2", "messages": ask("Oslo"), "max_tokens": 8, **fields}
    error = error_of(server, body)
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"
    ok = client.chat.completions.create(model="smollm2", messages=ask("Oslo"), temperature=0, max_tokens=4)
    assert ok.choices[0].message.content is not None  # the server keeps serving
