"""OpenAI's Responses API: ``POST /v1/responses``, ``GET`` / ``DELETE /v1/responses/{id}`` and its input items.

Contract: a body (:mod:`llmos.api.responses.schemas`) becomes a :class:`~llmos.api.chat.ChatJob`: ``instructions``
is the system message; message items are turns (``developer`` is ``system``); ``function_call`` items are the
calls of the assistant turn before them and ``function_call_output`` items answer them (a result without its call
is a 400). ``previous_response_id`` continues a stored response: its conversation and its output come before the
new input (its ``instructions`` do not carry over, as in OpenAI's API). ``tools`` / ``tool_choice`` /
``parallel_tool_calls`` become a :class:`~llmos.api.tool_plan.ToolPlan`, ``text.format`` json_object /
json_schema a grammar; sampling follows OpenAI's defaults (``temperature`` 1, ``top_p`` 1). The answer is a
``response`` with ``message`` (``output_text``) and ``function_call`` items, ``status`` ``completed`` or
``incomplete`` (``max_output_tokens``), and usage with the prompt tokens taken from the prefix cache in
``input_tokens_details.cached_tokens``. Streaming sends the typed events OpenAI sends, each with a
``sequence_number``: ``response.created``, ``response.in_progress``, per item ``response.output_item.added`` /
``.done``, ``response.content_part.added`` / ``.done`` and ``response.output_text.delta`` / ``.done`` for text,
``response.function_call_arguments.delta`` / ``.done`` for calls, then ``response.completed`` or
``response.incomplete`` (an error mid-stream is an ``error`` event); there is no ``[DONE]``. With ``store`` (the
default) the finished response is kept per tenant (see :mod:`llmos.api.responses.store`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from llmos.api.auth import principal
from llmos.api.body import parse_body
from llmos.api.chat import ChatJob, ChatRun, collect, start_chat
from llmos.api.responses.schemas import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionTool,
    HostedTool,
    MediaPart,
    MessageItem,
    NamedFunction,
    ReasoningItem,
    ResponsesRequest,
)
from llmos.api.responses.store import ResponseStore
from llmos.api.sse import typed_sse
from llmos.api.state import AppState, app_state
from llmos.api.tool_plan import EMPTY_OBJECT, ToolPlan, ToolStream, plan, split_output
from llmos.engine.grammar import json_object_grammar, json_schema_grammar
from llmos.engine.tool_calls import Tool
from llmos.errors import InvalidInputError, LlmosError
from llmos.security.principal import Principal
from llmos.types import ChatMessage, FunctionCall, SamplingParams

router = APIRouter()


def _store(state: AppState) -> ResponseStore:
    return ResponseStore(state.registry, state.settings.responses_retention_hours)


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# --- the request ----------------------------------------------------------------------------------------------------


def input_items(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The body's input as plain item dicts (the form stored and replayed), refusing what llmos cannot run."""
    items: list[dict[str, Any]] = []
    for index, item in enumerate(body.items()):
        param = f"input.{index}"
        if isinstance(item, MessageItem):
            if isinstance(item.content, str):
                kind = "output_text" if item.role == "assistant" else "input_text"
                parts = [{"type": kind, "text": item.content}]
            else:
                parts = []
                for part in item.content:
                    if isinstance(part, MediaPart):
                        raise InvalidInputError(
                            f"{part.type} content is not supported by llmos", param=f"{param}.content"
                        )
                    parts.append({"type": part.type, "text": part.text})
            items.append({"type": "message", "role": item.role, "content": parts})
        elif isinstance(item, FunctionCallItem):
            fields = {"call_id": item.call_id, "name": item.name, "arguments": item.arguments}
            items.append({"type": "function_call", **fields})
        elif isinstance(item, FunctionCallOutputItem):
            items.append({"type": "function_call_output", "call_id": item.call_id, "output": item.text()})
        elif not isinstance(item, ReasoningItem):
            raise InvalidInputError(f"input items of type {item.type!r} are not supported by llmos", param=param)
    return items


def chat_messages(instructions: str | None, items: list[dict[str, Any]]) -> list[ChatMessage]:
    """The conversation in llmos's form; a call result must answer a call made earlier in it."""
    messages = [ChatMessage("system", instructions)] if instructions else []
    called: set[str] = set()
    for item in items:
        kind = item["type"]
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            text = "".join(part["text"] for part in item["content"])
            messages.append(ChatMessage(role, text))  # type: ignore[arg-type]
        elif kind == "function_call":
            call = FunctionCall(item["call_id"], item["name"], item["arguments"])
            called.add(call.id)
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":
                messages[-1] = replace(last, tool_calls=(*last.tool_calls, call))
            else:
                messages.append(ChatMessage("assistant", "", tool_calls=(call,)))
        elif kind == "function_call_output":
            if item["call_id"] not in called:
                raise InvalidInputError(
                    f"a function_call_output answers call_id {item['call_id']!r}, which no earlier function_call"
                    " in the conversation made",
                    param="input",
                )
            messages.append(ChatMessage("tool", item["output"], tool_call_id=item["call_id"]))
    return messages


def tool_plan(body: ResponsesRequest) -> ToolPlan:
    tools: list[Tool] = []
    for tool in body.tools or []:
        if isinstance(tool, HostedTool):
            raise InvalidInputError(
                f"tools of type {tool.type!r} are not supported by llmos; only function tools are", param="tools"
            )
        assert isinstance(tool, FunctionTool)
        tools.append(Tool(tool.name, tool.description or "", tool.parameters or EMPTY_OBJECT))
    choice = body.tool_choice
    fmt = body.text.format if body.text is not None else None
    return plan(
        tools,
        None if isinstance(choice, NamedFunction) else choice,
        named=choice.name if isinstance(choice, NamedFunction) else None,
        parallel=body.parallel_tool_calls,
        formatted=fmt is not None and fmt.type != "text",
        format_param="text.format",
    )


def grammar(body: ResponsesRequest) -> str | None:
    fmt = body.text.format if body.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return json_object_grammar()
    if fmt.schema_ is None:
        raise InvalidInputError("text.format json_schema needs a 'schema'", param="text.format.schema")
    return json_schema_grammar(fmt.schema_)


# --- the answer -----------------------------------------------------------------------------------------------------


def text_format(body: ResponsesRequest) -> dict[str, Any]:
    fmt = body.text.format if body.text is not None else None
    return {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}}


def tool_choice(body: ResponsesRequest) -> Any:
    choice = body.tool_choice
    if isinstance(choice, NamedFunction):
        return {"type": "function", "name": choice.name}
    return choice or "auto"


def response_object(
    response_id: str, created: int, body: ResponsesRequest, model: str, status: str, output: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "model": model,
        "output": output,
        "parallel_tool_calls": body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "store": body.store,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "text": text_format(body),
        "tool_choice": tool_choice(body),
        "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or []],
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "truncation": "disabled",
        "usage": None,
        "user": body.user,
        "metadata": body.metadata or {},
    }


def usage(run: ChatRun, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": run.prompt_tokens,
        "input_tokens_details": {"cached_tokens": run.cached_tokens()},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": run.prompt_tokens + output_tokens,
    }


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content}


def call_item(call: FunctionCall, status: str = "completed") -> dict[str, Any]:
    return {
        "id": "fc_" + call.id.removeprefix("call_"),
        "type": "function_call",
        "status": status,
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments,
    }


def output_items(text: str, tools: ToolPlan) -> list[dict[str, Any]]:
    content, calls = split_output(text, tools)
    items = [message_item(_id("msg"), content)] if content or not calls else []
    return items + [call_item(call) for call in calls]


# --- routes ---------------------------------------------------------------------------------------------------------


@router.post("/v1/responses")
async def create_response(request: Request) -> Any:
    state = app_state(request)
    caller = principal(request)
    body = await parse_body(request, ResponsesRequest, state.settings.max_request_bytes)
    if body.background:
        raise InvalidInputError("background responses are not supported by llmos", param="background")
    items = input_items(body)
    if body.previous_response_id is not None:
        earlier = await to_thread.run_sync(_store(state).load, body.previous_response_id, caller.tenant_id)
        items = earlier["items"] + [_as_input(item) for item in earlier["response"]["output"]] + items
    if not items:
        raise InvalidInputError("input is empty", param="input")
    messages = chat_messages(body.instructions, items)
    tools = await to_thread.run_sync(tool_plan, body)
    job = ChatJob(
        model=body.model,
        messages=messages,
        sampling=SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=0,
            min_p=0.0,
        ),
        max_tokens=body.max_output_tokens,
        endpoint="responses",
        plan=tools,
        grammar=None if tools.active else await to_thread.run_sync(grammar, body),
        priority=body.priority,
        keep_alive=body.keep_alive,
    )
    run = await start_chat(state, request, caller, job)
    response_id, created = _id("resp"), int(time.time())
    if body.stream:
        events = _stream(state, caller, run, response_object(response_id, created, body, run.model, "", []), items)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    (result,) = await collect(run, request)
    output = output_items(result.text, tools)
    called = any(item["type"] == "function_call" for item in output)
    status = _status(result.finish_reason, called)
    response = response_object(response_id, created, body, run.model, status, output)
    response["usage"] = usage(run, result.completion_tokens)
    if body.store:
        await to_thread.run_sync(_store(state).save, response_id, caller.tenant_id, run.model, _record(response, items))
    return response


def _status(finish_reason: str | None, called: bool) -> str:
    """``incomplete`` when the token limit cut a text answer off (a call cut off is still reported as made)."""
    return "incomplete" if finish_reason == "length" and not called else "completed"


def _as_input(item: dict[str, Any]) -> dict[str, Any]:
    """An output item as the input item it becomes in the next turn."""
    if item["type"] == "message":
        return {"type": "message", "role": "assistant", "content": [dict(p) for p in item["content"]]}
    return {key: item[key] for key in ("type", "call_id", "name", "arguments")}


def _record(response: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"response": response, "items": items}


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request) -> dict[str, Any]:
    state = app_state(request)
    record = await to_thread.run_sync(_store(state).load, response_id, principal(request).tenant_id)
    response: dict[str, Any] = record["response"]
    return response


@router.get("/v1/responses/{response_id}/input_items")
async def get_input_items(response_id: str, request: Request) -> dict[str, Any]:
    state = app_state(request)
    record = await to_thread.run_sync(_store(state).load, response_id, principal(request).tenant_id)
    items = [{"id": f"{response_id}_item_{i}", **item} for i, item in enumerate(record["items"])]
    first, last = (items[0]["id"], items[-1]["id"]) if items else (None, None)
    return {"object": "list", "data": items, "first_id": first, "last_id": last, "has_more": False}


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> dict[str, Any]:
    state = app_state(request)
    await to_thread.run_sync(_store(state).delete, response_id, principal(request).tenant_id)
    return {"id": response_id, "object": "response", "deleted": True}


# --- streaming ------------------------------------------------------------------------------------------------------


class ResponseEvents:
    """The Responses API's typed events for a stream of chat deltas (see :mod:`llmos.api.tool_plan`), numbered."""

    def __init__(self) -> None:
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._text: list[str] = []

    def event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return typed_sse(data)

    def _add(self, item: dict[str, Any]) -> list[bytes]:
        events = self.close()
        self._open = item
        self.output.append(item)
        return [*events, self.event("response.output_item.added", output_index=len(self.output) - 1, item=item)]

    def feed(self, delta: dict[str, Any]) -> list[bytes]:
        events: list[bytes] = []
        index = len(self.output) - 1
        text = delta.get("content")
        if text:
            if self._open is None or self._open["type"] != "message":
                events += self.open_message()
                index = len(self.output) - 1
            self._text.append(text)
            assert self._open is not None
            events.append(self._in_message("response.output_text.delta", self._open, delta=text, logprobs=[]))
        for call in delta.get("tool_calls", ()):
            function = call.get("function", {})
            if "id" in call:
                fields = {"call_id": call["id"], "name": function["name"], "arguments": ""}
                item_id = "fc_" + call["id"].removeprefix("call_")
                events += self._add({"id": item_id, "type": "function_call", "status": "in_progress", **fields})
                index = len(self.output) - 1
            if function.get("arguments") and self._open is not None:
                self._open["arguments"] += function["arguments"]
                events.append(
                    self.event(
                        "response.function_call_arguments.delta",
                        item_id=self._open["id"],
                        output_index=index,
                        delta=function["arguments"],
                    )
                )
        return events

    def open_message(self) -> list[bytes]:
        item = {"id": _id("msg"), "type": "message", "status": "in_progress", "role": "assistant", "content": []}
        events = self._add(item)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [*events, self._in_message("response.content_part.added", item, part=part)]

    def _in_message(self, kind: str, item: dict[str, Any], **fields: Any) -> bytes:
        """An event about the (only) content part of the message ``item``, the last output item."""
        return self.event(kind, item_id=item["id"], output_index=len(self.output) - 1, content_index=0, **fields)

    def close(self) -> list[bytes]:
        item, index = self._open, len(self.output) - 1
        if item is None:
            return []
        self._open = None
        events: list[bytes] = []
        if item["type"] == "message":
            text, self._text = "".join(self._text), []
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            events.append(self._in_message("response.output_text.done", item, text=text, logprobs=[]))
            events.append(self._in_message("response.content_part.done", item, part=part))
            item["content"] = [part]
        else:
            fields = {"item_id": item["id"], "output_index": index, "name": item["name"]}
            events.append(self.event("response.function_call_arguments.done", **fields, arguments=item["arguments"]))
        item["status"] = "completed"
        events.append(self.event("response.output_item.done", output_index=index, item=item))
        return events


async def _stream(
    state: AppState, caller: Principal, run: ChatRun, response: dict[str, Any], items: list[dict[str, Any]]
) -> AsyncIterator[bytes]:
    events = ResponseEvents()
    try:
        yield events.event("response.created", response={**response, "status": "in_progress"})
        yield events.event("response.in_progress", response={**response, "status": "in_progress"})
        splitter = ToolStream(run.plan) if run.plan.active else None
        async for _index, output in run.call.outputs():
            deltas = splitter.feed(output.text) if splitter is not None else [{"content": output.text}]
            if output.finished and splitter is not None:
                deltas += splitter.finish()
            for delta in deltas:
                for event in events.feed(delta):
                    yield event
            if not output.finished:
                continue
            if not events.output:  # an empty answer is still one (empty) message
                for event in events.open_message():
                    yield event
            for event in events.close():
                yield event
            called = splitter is not None and splitter.called and not splitter.cut_off
            status = _status(output.finish_reason, called)
            final = {**response, "status": status, "output": events.output}
            final["incomplete_details"] = {"reason": "max_output_tokens"} if status == "incomplete" else None
            final["usage"] = usage(run, output.completion_tokens)
            if response["store"]:
                record = _record(final, items)
                await to_thread.run_sync(_store(state).save, response["id"], caller.tenant_id, run.model, record)
            yield events.event(f"response.{status}", response=final)
    except LlmosError as exc:
        yield events.event("error", code=exc.code, message=exc.message, param=exc.param)
