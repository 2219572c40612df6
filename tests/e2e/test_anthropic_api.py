"""Anthropic's Messages API (``/v1/messages``) through `llmos serve`, with the official ``anthropic`` client and the
real SmolLM2 GGUF.

SmolLM2's chat template knows nothing of tools, so tool use runs llmos's generic format (tools listed in the system
message, calls constrained by a grammar built from ``input_schema``). The 2.x client has no ``temperature``
argument (Anthropic's newest models dropped it); greedy decoding goes in ``extra_body``, which llmos honours.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest

from llmos.config import Settings
from llmos.registry import sources
from llmos.registry.service import Registry
from llmos.security.service import SecurityService
from tests.helpers import ServerProcess

GREEDY: dict[str, Any] = {"temperature": 0}
PARIS: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER: Any = {"name": "get_weather", "description": "Weather forecast for a city", "input_schema": WEATHER_SCHEMA}
ANY: Any = {"type": "any"}
NAMED: Any = {"type": "tool", "name": "get_weather"}
NONE: Any = {"type": "none"}


@pytest.fixture(scope="module")
def server(pulled_settings: Settings) -> Iterator[ServerProcess]:
    process = ServerProcess(pulled_settings.home, "--model", "smollm2")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base, api_key="unused", max_retries=0, timeout=120)


def ask(city: str) -> list[Any]:
    return [{"role": "user", "content": f"Will I need an umbrella in {city} this week?"}]


def forced(choice: Any) -> dict[str, Any]:
    return {
        "model": "smollm2", "max_tokens": 60, "messages": ask("Paris"), "tools": [WEATHER], "tool_choice": choice,
        "extra_body": GREEDY,
    }  # fmt: skip


@pytest.fixture(scope="module")
def tool_message(client: anthropic.Anthropic) -> anthropic.types.Message:
    """The answer to a question about the weather in Paris with a call forced (``any``)."""
    return client.messages.create(**forced(ANY))


def text_of(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def tool_uses(message: anthropic.types.Message) -> list[anthropic.types.ToolUseBlock]:
    return [block for block in message.content if block.type == "tool_use"]


def test_a_plain_message(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model="smollm2", max_tokens=12, messages=PARIS, extra_body=GREEDY)
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.model == "smollm2:latest"
    assert [block.type for block in message.content] == ["text"] and "Paris" in text_of(message)
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    cut = client.messages.create(model="smollm2", max_tokens=2, messages=PARIS, extra_body=GREEDY)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 2
    assert text_of(message).startswith(text_of(cut))  # greedy: the short answer is the start of the longer one


def test_streamed_events_add_up_to_the_final_message(client: anthropic.Anthropic, server: ServerProcess) -> None:
    plain = client.messages.create(model="smollm2", max_tokens=12, messages=PARIS, extra_body=GREEDY)
    with client.messages.stream(model="smollm2", max_tokens=12, messages=PARIS, extra_body=GREEDY) as stream:
        events = list(stream)
        streamed = "".join(event.text for event in events if event.type == "text")
        final = stream.get_final_message()
    raw = [event.type for event in events if event.type not in ("text", "input_json")]  # the client's own extras
    assert raw[0] == "message_start" and raw[1] == "content_block_start"
    assert raw[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(raw[2:-3]) == {"content_block_delta"} and len(raw) > 6
    assert streamed == text_of(final) and "Paris" in streamed
    assert text_of(final) == text_of(plain) and final.stop_reason == plain.stop_reason
    assert final.model == "smollm2:latest" and final.usage.output_tokens == plain.usage.output_tokens
    # the final usage (message_delta) counts the prompt the plain answer left in the prefix cache as read from it
    assert final.usage.cache_read_input_tokens and final.usage.cache_read_input_tokens > 0
    prompt = final.usage.input_tokens + final.usage.cache_read_input_tokens
    assert prompt == plain.usage.input_tokens + (plain.usage.cache_read_input_tokens or 0) > 0

    # on the wire: each event named as its data's type, with a ping after message_start
    body = {"model": "smollm2", "max_tokens": 4, "messages": PARIS, "stream": True, **GREEDY}
    with httpx.stream("POST", f"{server.base}/v1/messages", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines[0::2]]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines[1::2]]
    assert names == [data["type"] for data in datas] and names[:2] == ["message_start", "ping"]
    assert datas[-2]["delta"]["stop_reason"] == "max_tokens" and datas[-2]["usage"]["output_tokens"] == 4


def test_a_stop_sequence(client: anthropic.Anthropic) -> None:
    # a prompt whose greedy answer is "1, 2, 3, ..." under every attention kernel llmos has shipped ("Count from 1 to
    # 10" flipped to prose when the batch-invariant kernel's rounding changed)
    count = [{"role": "user", "content": "Write the numbers from 1 to 10, separated by commas."}]
    request: dict[str, Any] = {
        "model": "smollm2", "max_tokens": 40, "messages": count, "stop_sequences": ["5", "eleven"],
        "extra_body": GREEDY,
    }  # fmt: skip
    message = client.messages.create(**request)
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "5"
    assert "4" in text_of(message) and "5" not in text_of(message)
    with client.messages.stream(**request) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence, text_of(final)) == ("stop_sequence", "5", text_of(message))


@pytest.mark.parametrize("choice", [ANY, NAMED], ids=["any", "named"])
def test_forced_tool_use_validates_plain_and_streamed(
    client: anthropic.Anthropic, tool_message: anthropic.types.Message, choice: Any
) -> None:
    request = forced(choice)
    message = tool_message if choice is ANY else client.messages.create(**request)
    assert message.stop_reason == "tool_use" and message.stop_sequence is None
    (call,) = tool_uses(message)
    assert call.name == "get_weather" and call.id.startswith("toolu_")
    jsonschema.validate(call.input, WEATHER_SCHEMA)
    assert call.input["city"] == "Paris"

    with client.messages.stream(**request) as stream:
        events = list(stream)
        final = stream.get_final_message()
    starts = [event.content_block for event in events if event.type == "content_block_start"]
    assert [block.type for block in starts] == ["tool_use"]
    fragments = [event.partial_json for event in events if event.type == "input_json"]
    assert len(fragments) > 1  # the arguments streamed in pieces, as they were generated
    assert json.loads("".join(fragments)) == call.input
    assert final.stop_reason == "tool_use"
    (streamed,) = tool_uses(final)
    assert streamed.name == "get_weather" and streamed.id.startswith("toolu_") and streamed.input == call.input


def test_a_full_loop_tool_use_result_answer(client: anthropic.Anthropic, tool_message: anthropic.types.Message) -> None:
    messages: list[Any] = ask("Paris")
    (call,) = tool_uses(tool_message)
    forecast = json.dumps({"forecast": "rain all week", "high_celsius": 14})
    messages += [
        {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in tool_message.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": forecast}]},
    ]
    final = client.messages.create(
        model="smollm2", max_tokens=16, messages=messages, tools=[WEATHER], tool_choice=NONE, extra_body=GREEDY
    )
    assert not tool_uses(final) and final.stop_reason in ("end_turn", "max_tokens")
    assert text_of(final).strip()
    # the tool's answer reached the prompt: a result of a different length changes the prompt's length
    empty = [*messages[:-1], {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id}]}]
    without = client.messages.count_tokens(model="smollm2", messages=empty, tools=[WEATHER], tool_choice=NONE)
    counted = client.messages.count_tokens(model="smollm2", messages=messages, tools=[WEATHER], tool_choice=NONE)
    assert counted.input_tokens > without.input_tokens


def test_tool_choice_none_never_calls(client: anthropic.Anthropic) -> None:
    for city in ("Paris", "Oslo"):
        message = client.messages.create(
            model="smollm2", max_tokens=12, messages=ask(city), tools=[WEATHER], tool_choice=NONE, extra_body=GREEDY
        )
        assert not tool_uses(message) and message.stop_reason in ("end_turn", "max_tokens")
        assert text_of(message)


def test_count_tokens(client: anthropic.Anthropic) -> None:
    plain = client.messages.count_tokens(model="smollm2", messages=PARIS)
    assert plain.input_tokens > 5
    with_system = client.messages.count_tokens(model="smollm2", messages=PARIS, system="Answer in one word.")
    with_tool = client.messages.count_tokens(model="smollm2", messages=PARIS, tools=[WEATHER])
    assert with_system.input_tokens > plain.input_tokens and with_tool.input_tokens > plain.input_tokens + 20
    # the count is the prompt a message would take
    message = client.messages.create(model="smollm2", max_tokens=1, messages=PARIS, tools=[WEATHER], extra_body=GREEDY)
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) == with_tool.input_tokens


def anthropic_error_of(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind and set(body["error"]) == {"type", "message"}
    return str(body["error"]["message"])


TOOL_USE = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo", "unit": "celsius"}}


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]}, "unknown type 'video'"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "'messages.0.content.0.text'"),
        ({"max_tokens": None}, "'max_tokens'"),
        ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "'nope'"),
        ({"tool_choice": ANY}, "needs tools"),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x"}]}]},
            "answers no tool_use",
        ),
        (
            {"messages": [*PARIS, {"role": "assistant", "content": [TOOL_USE]}, {"role": "user", "content": "go"}]},
            "no tool_result",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "x"}}]}]},
            "image content blocks are not supported",
        ),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "web_search_20250305"),
    ],
    ids=["unknown-block", "text-without-text", "no-max-tokens", "unknown-tool", "choice-without-tools",
         "orphan-result", "unanswered-tool-use", "image", "server-tool"],
)  # fmt: skip
def test_bad_input_is_a_400_in_anthropics_shape(server: ServerProcess, fields: dict[str, Any], fragment: str) -> None:
    body = {"model": "smollm2", "max_tokens": 4, "messages": PARIS, **fields}
    body = {key: value for key, value in body.items() if value is not None}
    response = httpx.post(f"{server.base}/v1/messages", json=body, timeout=60)
    assert fragment in anthropic_error_of(response, 400, "invalid_request_error")


def test_the_client_raises_and_the_server_keeps_serving(client: anthropic.Anthropic, server: ServerProcess) -> None:
    with pytest.raises(anthropic.BadRequestError) as image:
        client.messages.create(
            model="smollm2",
            max_tokens=4,
            messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x"}}]}],
        )
    assert image.value.status_code == 400 and image.value.body["error"]["type"] == "invalid_request_error"
    assert "image" in image.value.message
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(
            model="smollm2", max_tokens=4, messages=PARIS, tools=[WEATHER], tool_choice=NAMED | {"name": "x"}
        )
    with pytest.raises(anthropic.BadRequestError):
        client.messages.count_tokens(model="smollm2", messages=[{"role": "user", "content": [{"type": "text"}]}])
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=4, messages=PARIS)
    assert missing.value.status_code == 404 and missing.value.body["error"]["type"] == "not_found_error"
    with (
        pytest.raises(anthropic.NotFoundError),
        client.messages.stream(model="no-such-model", max_tokens=4, messages=PARIS),
    ):
        pass
    raw = httpx.post(f"{server.base}/v1/messages/count_tokens", json={"model": "no-such-model", "messages": PARIS})
    assert "no-such-model" in anthropic_error_of(raw, 404, "not_found_error")
    ok = client.messages.create(model="smollm2", max_tokens=8, messages=PARIS, extra_body=GREEDY)
    assert text_of(ok) and server.process.poll() is None


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    """A server with authentication on (a key exists), on a store of its own, and a consumer key."""
    settings = Settings(home=tmp_path_factory.mktemp("anthropic-auth") / "home")
    registry = Registry(settings)
    sources.pull(registry, "smollm2")
    registry.close()
    security = SecurityService(settings)
    security.create_tenant("acme")
    key, _ = security.create_key("acme", "consumer")
    security.close()
    process = ServerProcess(settings.home, "--model", "smollm2")
    yield process, key
    process.stop()


def test_x_api_key_authenticates(secured: tuple[ServerProcess, str]) -> None:
    server, key = secured
    keyed = anthropic.Anthropic(base_url=server.base, api_key=key, max_retries=0, timeout=120)  # sends x-api-key
    assert keyed.messages.count_tokens(model="smollm2", messages=PARIS).input_tokens > 5
    message = keyed.messages.create(model="smollm2", max_tokens=2, messages=PARIS, extra_body=GREEDY)
    assert message.usage.output_tokens == 2
    bearer = anthropic.Anthropic(base_url=server.base, auth_token=key, max_retries=0, timeout=120)
    assert bearer.messages.count_tokens(model="smollm2", messages=PARIS).input_tokens > 5
    wrong = anthropic.Anthropic(base_url=server.base, api_key=key + "x", max_retries=0, timeout=120)
    with pytest.raises(anthropic.AuthenticationError) as denied:
        wrong.messages.create(model="smollm2", max_tokens=2, messages=PARIS)
    assert denied.value.status_code == 401 and denied.value.body["error"]["type"] == "authentication_error"
    for headers in ({"x-api-key": "llmos_nope"}, {}):
        response = httpx.post(
            f"{server.base}/v1/messages/count_tokens", json={"model": "smollm2", "messages": PARIS}, headers=headers
        )
        anthropic_error_of(response, 401, "authentication_error")
    assert key not in server.read_log()
