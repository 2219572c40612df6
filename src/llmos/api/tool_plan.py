"""Tools offered to a model on any API surface: what to offer, how to constrain, and calls read back from output.

Contract: :func:`plan` checks a request's tools and tool choice (400 naming the field) and says what to offer the
model and how to constrain it: ``none`` offers nothing; ``required`` and a named function constrain the whole
output to calls (of that function); ``auto`` offers every tool and constrains a call only once the output starts
one (a lazy grammar), so the model may answer in text instead. :func:`split_output` turns a finished output into
(content, calls); :class:`ToolStream` does the same while streaming: text streams as it comes unless it may be the
start of a call, and a call streams as soon as its name is out, then its arguments in fragments. Deltas are
OpenAI's chat-completion deltas (``{"content"}`` or ``{"tool_calls": [...]}``), the one internal form that the
other surfaces (Responses, Anthropic Messages, Ollama) translate into their own events.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from llmos.engine.tool_calls import (
    END,
    TRIGGER,
    JsonValueScanner,
    Tool,
    call_grammar,
    check_tools,
    new_call_id,
    parse_calls,
)
from llmos.errors import InvalidInputError
from llmos.types import FunctionCall

EMPTY_OBJECT = {"type": "object", "properties": {}}
Choice = Literal["none", "auto", "required"]


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


def plan(
    tools: list[Tool],
    choice: Choice | None,
    *,
    named: str | None = None,
    parallel: bool = True,
    formatted: bool = False,
    choice_param: str = "tool_choice",
    format_param: str = "response_format",
) -> ToolPlan:
    """The plan for ``tools`` under ``choice`` (or the function ``named``); ``formatted``: the request also asks for
    a JSON output format, which cannot be combined with calls."""
    if not tools:
        if named is not None or (choice is not None and choice != "none"):
            raise InvalidInputError(f"{choice_param} needs tools", param=choice_param)
        return ToolPlan()
    check_tools(tools)
    if choice == "none":
        return ToolPlan()
    if formatted:
        raise InvalidInputError(
            f"a JSON output format ({format_param}) cannot be combined with tools; use {choice_param} 'none'",
            param=format_param,
        )
    if named is not None:
        chosen = [tool for tool in tools if tool.name == named]
        if not chosen:
            raise InvalidInputError(
                f"{choice_param} names the function {named!r}, which is not among the tools", param=choice_param
            )
        return ToolPlan(chosen, required=True, parallel=False, grammar=call_grammar(chosen, parallel=False))
    grammar = call_grammar(tools, parallel=parallel)
    if choice == "required":
        return ToolPlan(tools, required=True, parallel=parallel, grammar=grammar)
    return ToolPlan(tools, required=False, parallel=parallel, grammar=grammar, trigger=TRIGGER)


def split_output(text: str, plan: ToolPlan) -> tuple[str, list[FunctionCall]]:
    if not plan.active:
        return text, []
    content, calls = parse_calls(text, plan.offered)
    return content, calls if plan.parallel else calls[:1]


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
