"""Tool calling on ``/v1/chat/completions``: the request's tools and choice, and calls rendered as OpenAI sends them.

Contract: :func:`plan_tools` checks ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` and the history's tool
turns (400 with the field named) and says what to offer the model and how to constrain it: ``none`` offers nothing;
``required`` and a named function constrain the whole output to calls (of that function); ``auto`` offers every tool
and constrains a call only once the output starts one (a lazy grammar), so the model may answer in text instead.
:func:`split_output` turns a finished output into (content, calls); :class:`ToolStream` does the same while
streaming: text streams as it comes unless it may be the start of a call, and a call streams as OpenAI's do (a
delta with index, id, type and name, then argument fragments).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from llmos.api.openai.schemas import ChatCompletionRequest, ChatMessageIn, NamedToolChoice
from llmos.engine.tool_calls import (
    END,
    TRIGGER,
    JsonValueScanner,
    Tool,
    call_grammar,
    check_history,
    check_tools,
    new_call_id,
    parse_calls,
)
from llmos.errors import InvalidInputError
from llmos.types import ChatMessage, FunctionCall

ROLE_MAP = {"developer": "system"}
EMPTY_OBJECT = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    offered: list[Tool] = field(default_factory=list)
    """What the prompt lists (and what output may call)."""
    required: bool = False
    parallel: bool = True
    grammar: str | None = None
    trigger: str | None = None

    @property
    def active(self) -> bool:
        return bool(self.offered)


def chat_messages(body: ChatCompletionRequest) -> list[ChatMessage]:
    messages = [_message(m) for m in body.messages]
    check_history(messages)
    return messages


def _message(message: ChatMessageIn) -> ChatMessage:
    role = ROLE_MAP.get(message.role, message.role)
    calls = tuple(FunctionCall(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ())
    if calls and role != "assistant":
        raise InvalidInputError("only assistant messages may carry tool_calls", param="messages")
    if role == "tool" and not message.tool_call_id:
        raise InvalidInputError("a tool message needs the tool_call_id of the call it answers", param="messages")
    return ChatMessage(role, message.text(), tool_calls=calls, tool_call_id=message.tool_call_id)  # type: ignore[arg-type]


def plan_tools(body: ChatCompletionRequest) -> ToolPlan:
    tools = [
        Tool(t.function.name, t.function.description or "", t.function.parameters or EMPTY_OBJECT)
        for t in body.tools or []
    ]
    choice = body.tool_choice
    if not tools:
        if choice is not None and choice != "none":
            raise InvalidInputError("tool_choice needs tools", param="tool_choice")
        return ToolPlan()
    check_tools(tools)
    if choice == "none":
        return ToolPlan()
    if body.response_format is not None and body.response_format.type != "text":
        raise InvalidInputError(
            "response_format json_object / json_schema cannot be combined with tools; use tool_choice 'none'",
            param="response_format",
        )
    parallel = body.parallel_tool_calls
    if isinstance(choice, NamedToolChoice):
        named = [tool for tool in tools if tool.name == choice.function.name]
        if not named:
            raise InvalidInputError(
                f"tool_choice names the function {choice.function.name!r}, which is not among the tools",
                param="tool_choice",
            )
        return ToolPlan(named, required=True, parallel=False, grammar=call_grammar(named, parallel=False))
    grammar = call_grammar(tools, parallel=parallel)
    if choice == "required":
        return ToolPlan(tools, required=True, parallel=parallel, grammar=grammar)
    return ToolPlan(tools, required=False, parallel=parallel, grammar=grammar, trigger=TRIGGER)


def split_output(text: str, plan: ToolPlan) -> tuple[str, list[FunctionCall]]:
    if not plan.active:
        return text, []
    content, calls = parse_calls(text, plan.offered)
    return content, calls if plan.parallel else calls[:1]


def rendered_calls(calls: list[FunctionCall]) -> list[dict[str, Any]]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def message(text: str, plan: ToolPlan) -> tuple[dict[str, Any], bool]:
    """The response's assistant message, and whether it calls tools."""
    content, calls = split_output(text, plan)
    if not calls:
        return {"role": "assistant", "content": text, "refusal": None}, False
    return {"role": "assistant", "content": content or None, "refusal": None, "tool_calls": rendered_calls(calls)}, True


_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"\s*,\s*"arguments"\s*:\s*')
_HEADER_LIMIT = 200
"""Characters after ``<tool_call>`` within which the header must have come; else the call is parsed at the end."""


class ToolStream:
    """One choice's streamed deltas with tools offered (see the module contract).

    A call written as llmos's format asks (``{"name": ..., "arguments": ...}``, name first) streams as OpenAI's
    do: one delta with its index, id, type and name as soon as the name is out, then its arguments in fragments
    as they are generated. A call in any other shape is sent whole when the output ends.
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self._held = ""  # text not sent yet: it may be (the start of) a call
        self._calling = plan.required
        self._state = "seek"  # inside calls: seek (a header), args (streaming them), after (to </tool_call>)
        self._arguments = JsonValueScanner()
        self._index = -1
        self._fallback = False
        self.called = False

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Deltas to send now for this new output text."""
        self._held += text
        if not self._calling:
            start = self._held.find(TRIGGER)
            if start < 0:
                keep = _partial_trigger(self._held)
                ready, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
                return [{"content": ready}] if ready else []
            self._calling = True  # a call started: what came before it is content
            before, self._held = self._held[:start], self._held[start:]
            return ([{"content": before}] if before else []) + self._calls()
        return self._calls()

    def _calls(self) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        while not self._fallback:
            if self._state == "seek":
                start = self._held.find(TRIGGER)
                if start < 0:
                    return deltas
                match = _HEADER.match(self._held, start + len(TRIGGER))
                if match is None:
                    if len(self._held) - start > len(TRIGGER) + _HEADER_LIMIT:
                        self._fallback = True  # not the shape asked for: parsed whole at the end
                    return deltas
                if match.group(1) not in {tool.name for tool in self.plan.offered}:
                    self._fallback = True
                    return deltas
                if self._index >= 0 and not self.plan.parallel:
                    return deltas  # one call only: the rest is dropped
                self._index += 1
                self.called = True
                header = {"index": self._index, "id": new_call_id(), "type": "function"}
                header["function"] = {"name": match.group(1), "arguments": ""}
                deltas.append({"tool_calls": [header]})
                self._held = self._held[match.end() :]
                self._state, self._arguments = "args", JsonValueScanner()
            elif self._state == "args":
                used, done = self._arguments.feed(self._held)
                if used:
                    fragment = {"index": self._index, "function": {"arguments": self._held[:used]}}
                    deltas.append({"tool_calls": [fragment]})
                    self._held = self._held[used:]
                if not done:
                    return deltas
                self._state = "after"
            else:
                end = self._held.find(END)
                if end < 0:
                    return deltas
                self._held = self._held[end + len(END) :]
                self._state = "seek"
        return deltas

    @property
    def cut_off(self) -> bool:
        """A streamed call's arguments were still open when the output ended (the token limit): its finish reason
        stays ``length``, as OpenAI's does."""
        return self.called and not self._fallback and self._state == "args"

    def finish(self) -> list[dict[str, Any]]:
        """Deltas for what was held back, at the end of the output."""
        held, self._held = self._held, ""
        if self.called and not self._fallback:
            return []  # the calls went out as they came (a call cut off by the token limit stays cut)
        if not held:
            return []
        content, calls = split_output(held, self.plan)
        if not calls:
            return [{"content": held}]
        self.called = True
        deltas: list[dict[str, Any]] = [{"content": content}] if content else []
        for index, call in enumerate(calls):
            function = {"name": call.name, "arguments": call.arguments}
            deltas.append({"tool_calls": [{"index": index, "id": call.id, "type": "function", "function": function}]})
        return deltas


def _partial_trigger(text: str) -> int:
    """Length of the longest end of ``text`` that could begin the trigger (hold it back until it is decided)."""
    for size in range(min(len(TRIGGER) - 1, len(text)), 0, -1):
        if TRIGGER.startswith(text[-size:]):
            return size
    return 0
