"""Function calling for every model: the tools in the prompt, the grammar of a call, and calls parsed from output.

Contract:

* :func:`check_tools` refuses what cannot work before anything runs: more than :data:`MAX_TOOLS` tools, a name
  outside ``[A-Za-z0-9_-]{1,64}`` or used twice, ``parameters`` that are not a valid JSON Schema of an object.
* :func:`prompt_messages` turns a conversation with tools into plain chat turns for a chat template that knows
  nothing of tools (SmolLM2's and Gemma's do not): the tools and the call format go into the system message
  (Hermes / Qwen style: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``), an assistant turn's calls are
  written in that format, and a tool result becomes a user turn wrapped in ``<tool_response>``.
* :func:`call_grammar` is the GBNF of one call (or, with ``parallel``, one call per offered tool at most: small
  models otherwise repeat a call until the token limit) in that format, restricted to ``tools`` (a named choice: to
  that one): the arguments always parse and follow the function's ``parameters``
  schema, as far as llama.cpp's schema converter expresses it. :data:`TRIGGER` is the text that starts a call: for
  ``tool_choice: auto`` the grammar is lazy, applied from the moment the output starts a call.
* :func:`parse_calls` reads calls back from output: the Hermes/Qwen ``<tool_call>`` blocks, Mistral's
  ``[TOOL_CALLS] [...]``, and Llama 3's bare ``{"name": ..., "parameters": {...}}``. A call must name one of
  ``tools`` and carry a JSON object of arguments; anything else stays text. A call cut off by the token limit after
  complete ones is dropped, and so is an exact repeat of an earlier call.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmos.engine.grammar import compile_schema
from llmos.errors import InvalidInputError
from llmos.types import ChatMessage, FunctionCall

MAX_TOOLS = 128
TRIGGER = "<tool_call>"
END = "</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def signature(self) -> dict[str, Any]:
        """The OpenAI tool object, as models trained on function calling have seen it."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}


def check_tools(tools: Sequence[Tool]) -> None:
    import jsonschema

    if len(tools) > MAX_TOOLS:
        raise InvalidInputError(f"at most {MAX_TOOLS} tools are allowed, got {len(tools)}", param="tools")
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        if not _NAME.match(tool.name):
            raise InvalidInputError(
                f"tools[{index}].function.name must be 1-64 letters, digits, '_' or '-', got {tool.name!r}",
                param="tools",
            )
        if tool.name in seen:
            raise InvalidInputError(f"tool {tool.name!r} is defined twice", param="tools")
        seen.add(tool.name)
        try:
            jsonschema.validators.validator_for(tool.parameters).check_schema(tool.parameters)
        except jsonschema.SchemaError as exc:
            raise InvalidInputError(
                f"tools[{index}].function.parameters is not a valid JSON schema: {exc.message}", param="tools"
            ) from exc
        if tool.parameters.get("type", "object") != "object":
            raise InvalidInputError(f"tools[{index}].function.parameters must describe an object", param="tools")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# --- the prompt -----------------------------------------------------------------------------------------------------


def instructions(tools: Sequence[Tool], *, required: bool) -> str:
    listing = "\n".join(json.dumps(tool.signature(), ensure_ascii=False) for tool in tools)
    when = "You must call one of these functions." if required else "Call a function only when it helps."
    return (
        "You can call functions. Their signatures are inside <tools></tools>:\n"
        f"<tools>\n{listing}\n</tools>\n"
        f"{when} To call one, answer with a JSON object of its name and arguments inside <tool_call></tool_call>:\n"
        '<tool_call>\n{"name": "<function name>", "arguments": {<arguments>}}\n</tool_call>'
    )


def format_call(call: FunctionCall) -> str:
    try:
        arguments = json.loads(call.arguments) if call.arguments.strip() else {}
    except json.JSONDecodeError:
        arguments = call.arguments
    return f"{TRIGGER}\n{json.dumps({'name': call.name, 'arguments': arguments}, ensure_ascii=False)}\n{END}"


def prompt_messages(messages: Sequence[ChatMessage], tools: Sequence[Tool], *, required: bool) -> list[ChatMessage]:
    """Plain turns for a template without tool support (see the module contract); ``tools`` empty: no listing."""
    plain: list[ChatMessage] = []
    for message in messages:
        if message.role == "assistant" and message.tool_calls:
            calls = "\n".join(format_call(call) for call in message.tool_calls)
            content = f"{message.content}\n{calls}" if message.content else calls
            plain.append(ChatMessage("assistant", content))
        elif message.role == "tool":
            plain.append(ChatMessage("user", f"<tool_response>\n{message.content}\n</tool_response>"))
        else:
            plain.append(ChatMessage(message.role, message.content))
    if tools:
        listing = instructions(tools, required=required)
        if plain and plain[0].role == "system":
            plain[0] = ChatMessage("system", f"{plain[0].content}\n\n{listing}")
        else:
            plain.insert(0, ChatMessage("system", listing))
    return plain


def check_history(messages: Sequence[ChatMessage]) -> None:
    """Every tool result answers a call made earlier in the conversation."""
    called: set[str] = set()
    for index, message in enumerate(messages):
        called.update(call.id for call in message.tool_calls)
        if message.role == "tool" and message.tool_call_id not in called:
            raise InvalidInputError(
                f"messages[{index}] is a tool result for {message.tool_call_id!r}, which no earlier assistant"
                " message called",
                param="messages",
            )


# --- the grammar ----------------------------------------------------------------------------------------------------


def call_grammar(tools: Sequence[Tool], *, parallel: bool) -> str:
    """GBNF of ``<tool_call>`` blocks whose JSON names one of ``tools`` and carries valid arguments."""
    alternatives = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": tool.parameters or {"type": "object"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    body = compile_schema(json.dumps(schema), param="tools")
    body = re.sub(r"^root ::=", "call-json ::=", body, count=1, flags=re.MULTILINE)
    call = 'call ::= "<tool_call>\\n" call-json "\\n</tool_call>"'
    more = len(tools) - 1 if parallel else 0
    root = f'root ::= call ("\\n" call){{0,{more}}}' if more else "root ::= call"
    return f"{root}\n{call}\n{body}"


# --- parsing --------------------------------------------------------------------------------------------------------


def _call_from(data: Any, names: set[str]) -> FunctionCall | None:
    if not isinstance(data, dict):
        return None
    name = data.get("name")
    arguments = data.get("arguments", data.get("parameters"))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if name not in names or not isinstance(arguments, dict):
        return None
    return FunctionCall(new_call_id(), str(name), json.dumps(arguments, ensure_ascii=False))


class JsonValueScanner:
    """Finds where a JSON value ends in text that arrives in pieces (strings, escapes and nesting followed)."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False

    def feed(self, text: str) -> tuple[int, bool]:
        """(characters of ``text`` that belong to the value, whether the value ended within them)."""
        for position, char in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
                    if self.depth == 0:  # the value was a string
                        return position + 1, True
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return position + 1, True
        return len(text), False


def _complete_json_prefix(text: str) -> bool:
    """Whether ``text`` holds a complete JSON value followed by more (so a decode error is not truncation)."""
    return JsonValueScanner().feed(text)[1]


def parse_calls(text: str, tools: Sequence[Tool]) -> tuple[str, list[FunctionCall]]:
    """(the text that is not a call, the calls) of a model's output; no calls when none is well formed."""
    names = {tool.name for tool in tools}
    decoder = json.JSONDecoder()
    if TRIGGER in text:
        calls: list[FunctionCall] = []
        rest: list[str] = []
        position = 0
        for match in re.finditer(re.escape(TRIGGER), text):
            if match.start() < position:
                continue
            rest.append(text[position : match.start()])
            body = text[match.end() :].lstrip()
            try:
                data, used = decoder.raw_decode(body)
            except json.JSONDecodeError:
                if calls and not _complete_json_prefix(body):  # cut off by the token limit: keep the whole ones
                    position = len(text)
                    break
                return text, []
            call = _call_from(data, names)
            if call is None:
                return text, []
            if not any(c.name == call.name and c.arguments == call.arguments for c in calls):
                calls.append(call)
            position = len(text) - len(body) + used
            tail = text[position:].lstrip()
            if tail.startswith(END):
                position = len(text) - len(tail) + len(END)
        rest.append(text[position:])
        return "".join(rest).strip(), calls
    stripped = text.strip()
    if stripped.startswith("[TOOL_CALLS]"):
        stripped = stripped[len("[TOOL_CALLS]") :].strip()
    if stripped[:1] in ("{", "["):  # Mistral's list, or Llama 3's bare object
        try:
            data, used = decoder.raw_decode(stripped)
        except json.JSONDecodeError:
            return text, []
        if stripped[used:].strip():
            return text, []
        items = data if isinstance(data, list) else [data]
        parsed = [_call_from(item, names) for item in items]
        if parsed and all(call is not None for call in parsed):
            return "", [call for call in parsed if call is not None]
    return text, []
