"""Anthropic's Messages API: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

Contract: a body (:mod:`llmos.api.anthropic.schemas`) becomes a :class:`~llmos.api.chat.ChatJob`: ``system`` is the
system message; ``tool_use`` blocks of assistant turns are its tool calls and ``tool_result`` blocks of the next
user turn answer them (checked against each other, as Anthropic does); ``tool_choice`` ``auto`` / ``any`` / ``tool``
/ ``none`` map to the tool plan's auto / required / named / none, ``disable_parallel_tool_use`` to one call at most.
Sampling follows Anthropic's defaults (``temperature`` 1, no top-p / top-k cut unless asked). The answer is a
``message`` with ``text`` and ``tool_use`` blocks and ``stop_reason`` ``end_turn`` / ``max_tokens`` /
``stop_sequence`` (with the matched ``stop_sequence``) / ``tool_use``; ``usage.input_tokens`` counts the prompt
tokens computed and ``cache_read_input_tokens`` those taken from the prefix cache. Streaming sends Anthropic's event
sequence (``message_start``, ``ping``, per block ``content_block_start`` / ``_delta`` (``text_delta`` or
``input_json_delta``) / ``_stop``, ``message_delta`` (with the final usage), ``message_stop``; an error mid-stream
is an ``error`` event). Errors on these routes have Anthropic's shape (see :func:`llmos.api.errors.shaped`);
``x-api-key`` authenticates as ``Authorization: Bearer`` does (see :mod:`llmos.api.auth`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from llmos.api.anthropic.schemas import (
    CountTokensRequest,
    MediaBlock,
    MessageIn,
    MessagesRequest,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
    validated,
)
from llmos.api.auth import principal
from llmos.api.body import parse_json, read_body
from llmos.api.chat import ChatJob, ChatRun, collect, count_prompt, start_chat
from llmos.api.errors import anthropic_error
from llmos.api.sse import typed_sse
from llmos.api.state import app_state
from llmos.api.tool_plan import EMPTY_OBJECT, ToolPlan, ToolStream, plan, split_output
from llmos.engine.tool_calls import Tool, check_history
from llmos.errors import InvalidInputError, LlmosError
from llmos.types import ChatMessage, FunctionCall, SamplingParams

router = APIRouter()


# --- the request ----------------------------------------------------------------------------------------------------


def _check_results(index: int, message: MessageIn, pending: list[str]) -> list[str]:
    """Anthropic's rule: the ``tool_use`` blocks of an assistant turn are answered by ``tool_result`` blocks of the
    very next (user) turn, and a ``tool_result`` answers one of them. The ids this turn leaves to answer."""
    blocks = [] if isinstance(message.content, str) else message.content
    results = [block for block in blocks if isinstance(block, ToolResultBlock)] if message.role == "user" else []
    answered = [block.tool_use_id for block in results]
    for tool_use_id in answered:
        if tool_use_id not in pending:
            raise InvalidInputError(
                f"messages.{index}: the tool_result block for {tool_use_id!r} answers no tool_use block of the"
                " previous (assistant) message",
                param=f"messages.{index}.content",
            )
    unanswered = [tool_use_id for tool_use_id in pending if tool_use_id not in answered]
    if unanswered:
        raise InvalidInputError(
            f"messages.{index}: tool_use ids {unanswered} of messages.{index - 1} have no tool_result block in the"
            " message right after them",
            param=f"messages.{index}.content",
        )
    return [block.id for block in blocks if isinstance(block, ToolUseBlock)]


def chat_messages(body: CountTokensRequest) -> list[ChatMessage]:
    """The conversation in llmos's form: system first, tool results as tool messages after the turn that called."""
    messages: list[ChatMessage] = []
    system = body.system_text()
    if system:
        messages.append(ChatMessage("system", system))
    pending: list[str] = []
    for index, message in enumerate(body.messages):
        param = f"messages.{index}.content"
        pending = _check_results(index, message, pending)
        if isinstance(message.content, str):
            messages.append(ChatMessage(message.role, message.content))
            continue
        texts: list[str] = []
        calls: list[FunctionCall] = []
        for block in message.content:
            if isinstance(block, MediaBlock):
                raise InvalidInputError(f"{block.type} content blocks are not supported by llmos", param=param)
            if isinstance(block, ThinkingBlock):
                continue
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ToolUseBlock):
                if message.role != "assistant":
                    raise InvalidInputError("tool_use blocks belong to assistant messages", param=param)
                calls.append(FunctionCall(block.id, block.name, json.dumps(block.input, ensure_ascii=False)))
            elif isinstance(block, ToolResultBlock):
                if message.role != "user":
                    raise InvalidInputError("tool_result blocks belong to user messages", param=param)
                if (media := block.media()) is not None:
                    raise InvalidInputError(f"{media} content blocks are not supported by llmos", param=param)
                result = ("Error: " if block.is_error else "") + block.text()
                messages.append(ChatMessage("tool", result, tool_call_id=block.tool_use_id))
        if calls or texts or message.role == "assistant":
            messages.append(ChatMessage(message.role, "".join(texts), tool_calls=tuple(calls)))
    check_history(messages)
    return messages


def tool_plan(body: CountTokensRequest) -> ToolPlan:
    for index, tool in enumerate(body.tools or []):
        if tool.type not in (None, "custom"):
            raise InvalidInputError(
                f"tools.{index}: Anthropic's server tool {tool.type!r} is not supported by llmos; give a client tool"
                " (name, description, input_schema)",
                param=f"tools.{index}.type",
            )
        if tool.input_schema is None:
            raise InvalidInputError(
                f"invalid value for 'tools.{index}.input_schema': Field required", param=f"tools.{index}.input_schema"
            )
    tools = [Tool(t.name, t.description or "", t.input_schema or EMPTY_OBJECT) for t in body.tools or []]
    choice = body.tool_choice
    if choice is None:
        return plan(tools, "auto" if tools else None)
    if choice.type == "tool" and not choice.name:
        raise InvalidInputError("tool_choice of type 'tool' needs the tool's name", param="tool_choice.name")
    mapped = {"auto": "auto", "any": "required", "none": "none", "tool": None}[choice.type]
    return plan(
        tools,
        mapped,  # type: ignore[arg-type]
        named=choice.name if choice.type == "tool" else None,
        parallel=not choice.disable_parallel_tool_use,
    )


def chat_job(body: MessagesRequest, messages: list[ChatMessage], tools: ToolPlan) -> ChatJob:
    return ChatJob(
        model=body.model,
        messages=messages,
        sampling=SamplingParams(
            max_tokens=body.max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            min_p=0.0,
            stop=tuple(body.stop_sequences or ()),
        ),
        max_tokens=body.max_tokens,
        endpoint="messages",
        plan=tools,
        priority=body.priority,
        keep_alive=body.keep_alive,
    )


# --- the answer -----------------------------------------------------------------------------------------------------


def _tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _tool_use(call: FunctionCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": _tool_use_id(call.id), "name": call.name, "input": json.loads(call.arguments)}


def stop_reason(finish_reason: str | None, stop_sequence: str | None, called: bool) -> str:
    if called:
        return "tool_use"
    if finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if stop_sequence else "end_turn"


def usage(run: ChatRun, output_tokens: int) -> dict[str, int]:
    cached = run.cached_tokens()
    return {
        "input_tokens": run.prompt_tokens - cached,
        "output_tokens": output_tokens,
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


def _message(message_id: str, model: str, content: list[dict[str, Any]], **rest: Any) -> dict[str, Any]:
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content, **rest}


@router.post("/v1/messages")
async def create_message(request: Request) -> Any:
    state = app_state(request)
    body = validated(MessagesRequest, parse_json(await read_body(request, state.settings.max_request_bytes)))
    messages = chat_messages(body)
    tools = await to_thread.run_sync(tool_plan, body)
    run = await start_chat(state, request, principal(request), chat_job(body, messages, tools))
    message_id = f"msg_{uuid.uuid4().hex[:24]}"
    if body.stream:
        return StreamingResponse(
            _stream(run, message_id), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    (result,) = await collect(run, request)
    text, calls = split_output(result.text, tools)
    content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text or not calls else []
    content += [_tool_use(call) for call in calls]
    sequence = result.stop_sequence if not calls else None
    return _message(
        message_id,
        run.model,
        content,
        stop_reason=stop_reason(result.finish_reason, sequence, bool(calls)),
        stop_sequence=sequence,
        usage=usage(run, result.completion_tokens),
    )


class BlockEvents:
    """Anthropic's content-block events for a stream of chat deltas (see :mod:`llmos.api.tool_plan`)."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | None = None  # "text" or "tool_use"

    def _start(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        events = self.close()
        self.index += 1
        self.open = block["type"]
        return [*events, {"type": "content_block_start", "index": self.index, "content_block": block}]

    def close(self) -> list[dict[str, Any]]:
        if self.open is None:
            return []
        self.open = None
        return [{"type": "content_block_stop", "index": self.index}]

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": self.index, "delta": delta}

    def feed(self, delta: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        text = delta.get("content")
        if text:
            if self.open != "text":
                events += self._start({"type": "text", "text": ""})
            events.append(self._delta({"type": "text_delta", "text": text}))
        for call in delta.get("tool_calls", ()):
            function = call.get("function", {})
            if "id" in call:
                block = {"type": "tool_use", "id": _tool_use_id(call["id"]), "name": function["name"], "input": {}}
                events += self._start(block)
            if function.get("arguments"):
                events.append(self._delta({"type": "input_json_delta", "partial_json": function["arguments"]}))
        return events


async def _stream(run: ChatRun, message_id: str) -> AsyncIterator[bytes]:
    start = _message(message_id, run.model, [], stop_reason=None, stop_sequence=None, usage=usage(run, 0))
    try:
        yield typed_sse({"type": "message_start", "message": start})
        yield typed_sse({"type": "ping"})
        blocks = BlockEvents()
        splitter = ToolStream(run.plan) if run.plan.active else None
        async for _index, output in run.call.outputs():
            deltas = splitter.feed(output.text) if splitter is not None else [{"content": output.text}]
            if output.finished and splitter is not None:
                deltas += splitter.finish()
            for delta in deltas:
                for event in blocks.feed(delta):
                    yield typed_sse(event)
            if output.finished:
                for event in blocks.close():
                    yield typed_sse(event)
                called = splitter is not None and splitter.called and not splitter.cut_off
                sequence = None if called else output.stop_sequence
                reason = stop_reason(output.finish_reason, sequence, called)
                yield typed_sse(  # usage here is the final count (cache reads are known once the prompt ran)
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": reason, "stop_sequence": sequence},
                        "usage": usage(run, output.completion_tokens),
                    }
                )
        yield typed_sse({"type": "message_stop"})
    except LlmosError as exc:
        yield typed_sse(anthropic_error(exc.status, exc.message))


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> dict[str, int]:
    state = app_state(request)
    body = validated(CountTokensRequest, parse_json(await read_body(request, state.settings.max_request_bytes)))
    messages = chat_messages(body)
    tools = await to_thread.run_sync(tool_plan, body)
    job = ChatJob(body.model, messages, SamplingParams(), plan=tools, keep_alive=body.keep_alive)
    return {"input_tokens": await count_prompt(state, principal(request), job)}
