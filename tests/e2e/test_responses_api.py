"""The Responses API through `llmos serve` with the official openai client (`responses.create`), on real SmolLM2."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from llmos.config import Settings
from tests.helpers import ServerProcess

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather forecast for a city",
    "parameters": WEATHER_PARAMETERS,
}


@pytest.fixture(scope="module")
def server(pulled_settings: Settings) -> Iterator[ServerProcess]:
    process = ServerProcess(pulled_settings.home, "--model", "smollm2")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=120)


def test_plain_response_is_stored_and_can_be_read_back_and_deleted(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="smollm2",
        input="What is the capital of France?",
        instructions="You are a helpful assistant.",
        temperature=0,
    )
    assert response.status == "completed" and response.model == "smollm2:latest"
    assert "Paris" in response.output_text
    assert response.usage is not None and response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    again = client.responses.retrieve(response.id)
    assert again.output_text == response.output_text and again.id == response.id
    items = client.responses.input_items.list(response.id)
    assert [item.type for item in items.data] == ["message"]
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(response.id)


def test_store_false_is_not_kept_and_max_output_tokens_makes_it_incomplete(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="smollm2", input="Write a long story about a dragon.", max_output_tokens=16, store=False, temperature=0
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 16
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_streamed_events_are_numbered_and_add_up_to_the_final_response(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="smollm2", input="Name three colors.", temperature=0, stream=True))
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    final = events[-1].response  # type: ignore[union-attr]
    assert text and final.output_text == text and final.status == "completed"
    assert client.responses.retrieve(final.id).output_text == text


def test_the_stream_helper_of_the_client_accepts_the_events(client: openai.OpenAI) -> None:
    with client.responses.stream(model="smollm2", input="What is the capital of France?", temperature=0) as stream:
        deltas = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert deltas and final.output_text == deltas


def test_a_function_tool_call_then_its_output_then_an_answer(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model="smollm2",
        input="What is the weather in Paris?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        temperature=0,
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) >= 1 and first.status == "completed"
    call = calls[0]
    assert call.name == "get_weather" and call.call_id
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMETERS)
    answer = client.responses.create(
        model="smollm2",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature_c": 21}'}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        temperature=0,
        max_output_tokens=40,
    )
    assert answer.output_text and not [item for item in answer.output if item.type == "function_call"]
    assert answer.previous_response_id == first.id
    kinds = [item.type for item in client.responses.input_items.list(answer.id).data]
    assert kinds == ["message", "function_call", "function_call_output"]


def test_a_streamed_call_sends_its_arguments_in_fragments(client: openai.OpenAI) -> None:
    named = {"type": "function", "name": "get_weather"}
    stream = client.responses.create(
        model="smollm2",
        input="Weather in Oslo, in celsius?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice=named,  # type: ignore[arg-type]
        temperature=0,
        stream=True,
    )
    events = list(stream)
    fragments = [event.delta for event in events if event.type == "response.function_call_arguments.delta"]
    done = [event for event in events if event.type == "response.function_call_arguments.done"]
    assert len(fragments) > 1 and len(done) == 1
    assert "".join(fragments) == done[0].arguments
    jsonschema.validate(json.loads(done[0].arguments), WEATHER_PARAMETERS)
    final = events[-1].response  # type: ignore[union-attr]
    assert [item.type for item in final.output] == ["function_call"]


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI) -> None:
    first = client.responses.create(model="smollm2", input="My name is Ada.", temperature=0, max_output_tokens=20)
    second = client.responses.create(
        model="smollm2", input="What is my name?", previous_response_id=first.id, temperature=0, max_output_tokens=20
    )
    assert first.usage is not None and second.usage is not None
    # the second prompt holds the first turn, its answer and the new question
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    # ... and reuses the first one's prefix from the cache
    assert second.usage.input_tokens_details.cached_tokens > 0
    items = client.responses.input_items.list(second.id).data
    assert [(item.type, getattr(item, "role", None)) for item in items] == [
        ("message", "user"),
        ("message", "assistant"),
        ("message", "user"),
    ]
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="smollm2", input="hi", previous_response_id="resp_missing")


def test_text_format_json_schema_is_followed(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    response = client.responses.create(
        model="smollm2",
        input="Name a city and its country.",
        text={"format": {"type": "json_schema", "name": "place", "schema": schema}},
        temperature=0,
        max_output_tokens=60,
    )
    jsonschema.validate(json.loads(response.output_text), schema)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"tools": [{"type": "web_search"}]}, "web_search"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input_image"),
        ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]}, "no earlier function_call"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "nope"),
        ({"input": [{"type": "mystery"}]}, "input"),
        ({"max_output_tokens": "10"}, "max_output_tokens"),
        ({"background": True}, "background"),
    ],
)
def test_bad_requests_get_a_400_in_openai_shape(server: ServerProcess, fields: dict[str, Any], words: str) -> None:
    body = {"model": "smollm2", "input": "hi", **fields}
    response = httpx.post(f"{server.base}/v1/responses", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and words in json.dumps(error)
    assert httpx.get(f"{server.base}/health", timeout=10).status_code == 200
