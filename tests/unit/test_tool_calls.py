"""Tool calling pieces: tool checks, the generic prompt format, the call grammar, parsing, and the stream splitter."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmos.api.openai.schemas import ChatCompletionRequest
from llmos.api.openai.tools import chat_messages, plan_tools
from llmos.api.tool_plan import ToolPlan, ToolStream, split_output
from llmos.engine.tool_calls import (
    MAX_TOOLS,
    TRIGGER,
    Tool,
    call_grammar,
    check_tools,
    parse_calls,
    prompt_messages,
)
from llmos.errors import InvalidInputError
from llmos.types import ChatMessage, FunctionCall

WEATHER = Tool(
    "get_weather",
    "Current weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
TIME = Tool("get_time", "Current time", {"type": "object", "properties": {"zone": {"type": "string"}}})
TOOLS = [WEATHER, TIME]


def call_text(name: str, arguments: dict[str, Any]) -> str:
    return f"{TRIGGER}\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def test_hermes_calls_are_parsed_with_the_text_around_them() -> None:
    text = "Let me check.\n" + call_text("get_weather", {"city": "Paris"}) + "\n" + call_text("get_time", {})
    content, calls = parse_calls(text, TOOLS)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def test_a_call_cut_off_by_the_token_limit_is_dropped_and_repeats_are_merged() -> None:
    whole = call_text("get_weather", {"city": "Paris"})
    _, calls = parse_calls(f"{whole}\n{whole}\n{TRIGGER}\n" + '{"name": "get_weather", "argu', TOOLS)
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Paris"}')]
    text = f"{TRIGGER}\n" + '{"name": "get_weather", "argu'
    assert parse_calls(text, TOOLS) == (text, [])  # nothing whole: it stays text


def test_mistral_and_llama3_formats() -> None:
    mistral = (
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {}}]'
    )
    assert [c.name for c in parse_calls(mistral, TOOLS)[1]] == ["get_weather", "get_time"]
    llama3 = '{"name": "get_weather", "parameters": {"city": "Rome"}}'
    content, calls = parse_calls(llama3, TOOLS)
    assert content == "" and json.loads(calls[0].arguments) == {"city": "Rome"}


@pytest.mark.parametrize(
    "text",
    [
        "Paris is sunny.",
        call_text("delete_everything", {}),  # not an offered tool
        f"{TRIGGER}\n" + '{"name": "get_weather", "arguments": [1, 2]}\n</tool_call>',  # arguments not an object
        '{"name": "get_weather", "parameters": {"city": "Rome"}} and more text',
        '{"city": "Rome"}',
    ],
)
def test_anything_else_stays_text(text: str) -> None:
    assert parse_calls(text, TOOLS) == (text, [])


def test_arguments_written_as_a_json_string_are_accepted() -> None:
    text = f'{TRIGGER}\n{{"name": "get_weather", "arguments": "{{\\"city\\": \\"Lima\\"}}"}}\n</tool_call>'
    assert json.loads(parse_calls(text, TOOLS)[1][0].arguments) == {"city": "Lima"}


@pytest.mark.parametrize(
    ("tools", "message"),
    [
        ([WEATHER, WEATHER], "defined twice"),
        ([Tool("bad name!", "", {"type": "object"})], "letters, digits"),
        ([Tool("t", "", {"type": "object", "properties": {"x": {"type": "nonsense"}}})], "not a valid JSON schema"),
        ([Tool("t", "", {"type": "string"})], "must describe an object"),
        ([Tool(f"t{i}", "", {"type": "object"}) for i in range(1000)], f"at most {MAX_TOOLS} tools"),
    ],
)
def test_bad_tools_are_refused(tools: list[Tool], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as info:
        check_tools(tools)
    assert info.value.param == "tools"


def test_the_generic_prompt_lists_tools_and_writes_calls_and_results_as_turns() -> None:
    call = FunctionCall("call_1", "get_weather", '{"city": "Paris"}')
    messages = [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Weather in Paris?"),
        ChatMessage("assistant", "", tool_calls=(call,)),
        ChatMessage("tool", '{"sky": "sunny"}', tool_call_id="call_1"),
    ]
    plain = prompt_messages(messages, TOOLS, required=True)
    assert [m.role for m in plain] == ["system", "user", "assistant", "user"]
    assert plain[0].content.startswith("Be brief.") and '"name": "get_time"' in plain[0].content
    assert "You must call" in plain[0].content
    assert plain[2].content == call_text("get_weather", {"city": "Paris"})
    assert plain[3].content == '<tool_response>\n{"sky": "sunny"}\n</tool_response>'
    assert all(not m.tool_calls for m in plain)
    assert prompt_messages([ChatMessage("user", "hi")], [], required=False) == [ChatMessage("user", "hi")]


def test_the_call_grammar_names_only_the_offered_tools_and_bounds_parallel_calls() -> None:
    pytest.importorskip("llama_cpp")
    single = call_grammar([WEATHER], parallel=True)
    assert single.startswith("root ::= call\n") and '"\\"get_weather\\""' in single and "get_time" not in single
    both = call_grammar(TOOLS, parallel=True)
    assert both.startswith('root ::= call ("\\n" call){0,1}') and "get_time" in both
    assert call_grammar(TOOLS, parallel=False).startswith("root ::= call\n")
    assert both.count("root ::=") == 1 and "call-json ::=" in both


def request(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate(body)


def tool_json(tool: Tool) -> dict[str, Any]:
    return tool.signature()


def test_plan_tools_for_each_choice() -> None:
    pytest.importorskip("llama_cpp")
    tools = [tool_json(t) for t in TOOLS]
    assert not plan_tools(request()).active
    assert not plan_tools(request(tools=tools, tool_choice="none")).active
    auto = plan_tools(request(tools=tools))
    assert auto.active and auto.trigger == TRIGGER and not auto.required and len(auto.offered) == 2
    required = plan_tools(request(tools=tools, tool_choice="required", parallel_tool_calls=False))
    assert required.required and required.trigger is None and not required.parallel
    named = plan_tools(request(tools=tools, tool_choice={"type": "function", "function": {"name": "get_time"}}))
    assert [t.name for t in named.offered] == ["get_time"] and named.required


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        (
            {"tools": [tool_json(WEATHER)], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": [tool_json(WEATHER)], "response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_plan_tools_refuses_contradictions(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        plan_tools(request(**fields))
    assert info.value.param == param


def test_a_tool_result_must_answer_an_earlier_call() -> None:
    orphan = [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_9", "content": "42"}]
    with pytest.raises(InvalidInputError, match="no earlier assistant") as info:
        chat_messages(request(messages=orphan))
    assert info.value.param == "messages"
    with pytest.raises(InvalidInputError, match="tool_call_id"):
        chat_messages(request(messages=[{"role": "tool", "content": "42"}]))
    answered = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_9", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "call_9", "content": "42"},
    ]
    messages = chat_messages(request(messages=answered))
    assert messages[1].tool_calls[0].name == "f" and messages[2].tool_call_id == "call_9"


def stream(plan: ToolPlan, pieces: list[str]) -> tuple[list[dict[str, Any]], bool]:
    splitter = ToolStream(plan)
    deltas = [delta for piece in pieces for delta in splitter.feed(piece)]
    return deltas + splitter.finish(), splitter.called


def accumulate(deltas: list[dict[str, Any]]) -> tuple[str, list[dict[str, str]]]:
    """(content, calls) as a client builds them from deltas: fields of a call index are concatenated."""
    content, calls = "", {}
    for delta in deltas:
        content += delta.get("content", "")
        for part in delta.get("tool_calls", []):
            call = calls.setdefault(part["index"], {"id": "", "name": "", "arguments": ""})
            call["id"] += part.get("id", "")
            call["name"] += part.get("function", {}).get("name", "")
            call["arguments"] += part.get("function", {}).get("arguments", "")
    return content, [calls[i] for i in sorted(calls)]


def test_stream_text_passes_through_and_a_possible_call_start_is_held_back() -> None:
    auto = ToolPlan(TOOLS, trigger=TRIGGER)
    splitter = ToolStream(auto)
    assert splitter.feed("Sunny <tool") == [{"content": "Sunny "}]  # "<tool" might start a call
    assert splitter.feed("s are fun") == [{"content": "<tools are fun"}]
    assert splitter.finish() == [] and not splitter.called


def test_stream_a_call_after_text_streams_its_name_then_argument_fragments() -> None:
    auto = ToolPlan(TOOLS, trigger=TRIGGER)
    splitter = ToolStream(auto)
    assert splitter.feed("Checking. ") == [{"content": "Checking. "}]
    assert splitter.feed("<tool_") == []
    assert splitter.feed('call>\n{"name": "get_weather", ') == []  # no name yet: the header is not complete
    header, fragment = splitter.feed('"arguments": {"ci')
    first = header["tool_calls"][0]
    assert fragment == {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}
    assert first["index"] == 0 and first["type"] == "function" and first["id"].startswith("call_")
    assert first["function"]["name"] == "get_weather"
    assert splitter.feed('ty": "Os') == [{"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Os'}}]}]
    tail = splitter.feed('lo"}}\n</tool_call>') + splitter.finish()
    content, calls = accumulate(
        [header, fragment, {"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Os'}}]}, *tail]
    )
    assert content == "" and splitter.called
    assert json.loads(calls[0]["arguments"]) == {"city": "Oslo"}


def test_stream_two_calls_get_indexes_0_and_1_and_without_parallel_only_the_first() -> None:
    text = call_text("get_weather", {"city": "A"}) + "\n" + call_text("get_time", {"zone": "UTC"})
    pieces = [text[i : i + 7] for i in range(0, len(text), 7)]
    deltas, called = stream(ToolPlan(TOOLS, required=True), pieces)
    content, calls = accumulate(deltas)
    assert called and content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": "A"}),
        ("get_time", {"zone": "UTC"}),
    ]
    assert calls[0]["id"] != calls[1]["id"]
    _, single = accumulate(stream(ToolPlan(TOOLS, required=True, parallel=False), pieces)[0])
    assert [c["name"] for c in single] == ["get_weather"]


def test_stream_a_call_in_another_shape_is_sent_whole_at_the_end() -> None:
    reordered = f'{TRIGGER}\n{{"arguments": {{"zone": "UTC"}}, "name": "get_time"}}\n</tool_call>'
    deltas, called = stream(ToolPlan(TOOLS, required=True), [reordered[:20], reordered[20:]])
    _content, calls = accumulate(deltas)
    assert called and [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_time", {"zone": "UTC"})]
    deltas, called = stream(ToolPlan(TOOLS, required=True), ["<tool_call>\n", '{"name": "get_ti'])
    assert not called and deltas == [{"content": '<tool_call>\n{"name": "get_ti'}]


def test_split_output_keeps_one_call_without_parallel_calls() -> None:
    text = call_text("get_weather", {"city": "A"}) + "\n" + call_text("get_time", {})
    assert len(split_output(text, ToolPlan(TOOLS, parallel=True))[1]) == 2
    assert len(split_output(text, ToolPlan(TOOLS, parallel=False))[1]) == 1
    assert split_output(text, ToolPlan()) == (text, [])


def test_a_template_that_renders_tools_gets_them_and_the_structured_calls() -> None:
    from llmos.formats.chat_template import render_chat, supports_tools

    template = (
        "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}{{ '|' }}{% endif %}"
        "{% for m in messages %}{{ m.role }}:{{ m.content }}"
        "{% for c in m.tool_calls or [] %}[call {{ c.id }} {{ c.function.name }} {{ c.function.arguments.city }}]"
        "{% endfor %}{% if m.tool_call_id %}(answers {{ m.tool_call_id }}){% endif %}{{ '|' }}{% endfor %}"
    )
    assert supports_tools(template) and not supports_tools("{{ messages }}") and not supports_tools(None)
    call = FunctionCall("call_1", "get_weather", '{"city": "Paris"}')
    messages = [
        ChatMessage("user", "Weather?"),
        ChatMessage("assistant", "", tool_calls=(call,)),
        ChatMessage("tool", "sunny", tool_call_id="call_1"),
    ]
    text = render_chat(messages, template, tools=[t.signature() for t in TOOLS], add_generation_prompt=False)
    assert text.split("|")[:-1] == [
        "TOOLS:get_weather;get_time;",
        "user:Weather?",
        "assistant:[call call_1 get_weather Paris]",
        "tool:sunny(answers call_1)",
    ]


def test_a_streamed_call_cut_off_by_the_token_limit_says_so() -> None:
    splitter = ToolStream(ToolPlan(TOOLS, required=True))
    deltas = splitter.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')
    assert splitter.called and splitter.cut_off and len(deltas) == 2
    whole = ToolStream(ToolPlan(TOOLS, required=True))
    whole.feed(call_text("get_weather", {"city": "Paris"}))
    assert whole.called and not whole.cut_off
