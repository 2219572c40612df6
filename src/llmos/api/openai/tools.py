"""Tool calling on ``/v1/chat/completions``: the body's tools and history, and calls rendered as OpenAI sends them.

Contract: :func:`chat_messages` turns the body's messages into llmos's own (assistant ``tool_calls`` and ``tool``
messages checked against each other); :func:`plan_tools` reads ``tools`` / ``tool_choice`` /
``parallel_tool_calls`` into a :class:`~llmos.api.tool_plan.ToolPlan`; :func:`message` is a finished output as the
response's assistant message. Streaming uses :class:`~llmos.api.tool_plan.ToolStream`, whose deltas are already
OpenAI's.
"""

from __future__ import annotations

from typing import Any

from llmos.api.openai.schemas import ChatCompletionRequest, ChatMessageIn, NamedToolChoice
from llmos.api.tool_plan import EMPTY_OBJECT, ToolPlan, plan, split_output
from llmos.engine.tool_calls import Tool, check_history
from llmos.errors import InvalidInputError
from llmos.types import ChatMessage, FunctionCall

ROLE_MAP = {"developer": "system"}


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
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    return plan(
        tools,
        None if isinstance(choice, NamedToolChoice) else choice,
        named=named,
        parallel=body.parallel_tool_calls,
        formatted=body.response_format is not None and body.response_format.type != "text",
    )


def rendered_calls(calls: list[FunctionCall]) -> list[dict[str, Any]]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def message(text: str, plan: ToolPlan) -> tuple[dict[str, Any], bool]:
    """The response's assistant message, and whether it calls tools."""
    content, calls = split_output(text, plan)
    if not calls:
        return {"role": "assistant", "content": text, "refusal": None}, False
    return {"role": "assistant", "content": content or None, "refusal": None, "tool_calls": rendered_calls(calls)}, True
