"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions.

Contract: each handler parses and validates the body (see :mod:`llmos.api.body`), resolves and loads the model in
a worker thread, renders and tokenizes the prompt in a worker thread (the event loop never blocks on CPU work),
checks the context window, submits every choice to the model's engine, and answers with one JSON body or an SSE
stream. Semantics follow the OpenAI API reference: defaults ``temperature=1``, ``top_p=1``; ``max_tokens``
defaults to the rest of the context for chat and 16 for completions; ``n`` choices with seeds ``seed + i``;
``stop`` is applied on text and never split across chunks; ``finish_reason`` is ``stop`` or ``length``; usage
reports the prompt tokens taken from the prefix cache in ``prompt_tokens_details.cached_tokens``. The extensions
``cache_prompt`` and ``speculative`` reach the engine as the server allows them
(:func:`~llmos.api.generation.engine_options`); a request that scores its prompt (``echo`` with ``logprobs``) never
uses the prefix cache.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from llmos.api.auth import principal, visible_view, visible_views
from llmos.api.body import parse_body
from llmos.api.chat import ChatJob, ChatRun, check_logit_bias, collect, start_chat
from llmos.api.errors import error_body
from llmos.api.generation import Call, acquire, engine_options, meter, submit_all, unless_disconnected
from llmos.api.openai import render, tools
from llmos.api.openai.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from llmos.api.pipelines import start_for_missing_model
from llmos.api.sse import sse
from llmos.api.state import app_state
from llmos.api.tool_plan import ToolPlan, ToolStream
from llmos.engine.grammar import json_object_grammar, json_schema_grammar
from llmos.engine.request import Logprob
from llmos.errors import InvalidInputError, LlmosError, ModelNotFoundError, PermissionDeniedError
from llmos.runtime.model import LoadedModel
from llmos.types import ChatMessage, SamplingParams

router = APIRouter()


def sampling(body: SamplingFields, max_tokens: int, index: int) -> SamplingParams:
    """The body's sampling fields; choice ``index`` gets ``seed + index``. Logit-bias ids are checked against the
    model's vocabulary once it is loaded (:func:`check_logit_bias`)."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k or 0,
        min_p=body.min_p or 0.0,
        repeat_penalty=body.repeat_penalty or 1.0,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=None if body.seed is None else body.seed + index,
        stop=body.stops(),
        logit_bias=tuple((int(k), v) for k, v in (body.logit_bias or {}).items()),
    )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def error_event(exc: LlmosError) -> bytes:
    return sse(error_body(exc.message, exc.type, exc.code, exc.param))


# --- models ---------------------------------------------------------------------------------------------------------


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    state = app_state(request)
    caller = principal(request)
    views = await to_thread.run_sync(state.registry.list_versions)
    visible = visible_views(caller, views)
    return {"object": "list", "data": [render.model_object(v) for v in visible]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    state = app_state(request)
    view = visible_view(principal(request), await to_thread.run_sync(state.registry.show, model), model)
    return render.model_object(view)


@router.delete("/v1/models/{model:path}")
async def delete_model(model: str, request: Request) -> dict[str, Any]:
    """Remove a model tag (OpenAI's delete for fine-tuned models); the owner tenant's developers or an admin."""
    state = app_state(request)
    caller = principal(request)
    view = visible_view(caller, await to_thread.run_sync(state.registry.show, model), model)
    allowed = caller.is_admin or (caller.at_least("developer") and view.tenant_id == caller.tenant_id)
    if not allowed:
        state.security.audit(caller.actor, caller.tenant, "model.delete", view.name, "denied")
        raise PermissionDeniedError(f"deleting {view.name} needs an admin key or a developer key of its tenant")
    await to_thread.run_sync(state.registry.remove, model)
    state.security.audit(caller.actor, caller.tenant, "model.delete", view.name, "ok")
    return {"id": view.name, "object": "model", "deleted": True}


# --- chat -----------------------------------------------------------------------------------------------------------


def _grammar(body: ChatCompletionRequest) -> str | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return json_object_grammar()
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise InvalidInputError("response_format json_schema needs a 'json_schema.schema'", param="response_format")
    return json_schema_grammar(fmt.json_schema.schema_)


def chat_job(body: ChatCompletionRequest, messages: list[ChatMessage], plan: ToolPlan, grammar: str | None) -> ChatJob:
    return ChatJob(
        model=body.model,
        messages=messages,
        sampling=sampling(body, 0, 0),
        max_tokens=body.limit(),
        endpoint="chat",
        plan=plan,
        grammar=grammar,
        n=body.n,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        priority=body.priority,
        keep_alive=body.keep_alive,
        cache_prompt=body.cache_prompt,
        speculative=body.speculative,
    )


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    state = app_state(request)
    body = await parse_body(request, ChatCompletionRequest, state.settings.max_request_bytes)
    messages = tools.chat_messages(body)
    plan = await to_thread.run_sync(tools.plan_tools, body)
    grammar = None if plan.active else await to_thread.run_sync(_grammar, body)
    caller = principal(request)
    try:
        run = await start_chat(state, request, caller, chat_job(body, messages, plan, grammar))
    except ModelNotFoundError:
        if body.pipeline is None:
            raise
        return await start_for_missing_model(request, caller, body.model, body.pipeline)
    completion_id, created = new_id("chatcmpl"), int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _chat_stream(run, completion_id, created, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    results = await collect(run, request)
    choices = []
    for i, result in enumerate(results):
        message, called = tools.message(result.text, plan)
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": render.chat_logprobs(result.logprobs) if body.logprobs else None,
                "finish_reason": "tool_calls" if called else result.finish_reason,
            }
        )
    completion_tokens = sum(result.completion_tokens for result in results)
    return render.chat_completion(
        completion_id,
        created,
        run.model,
        choices,
        run.prompt_tokens,
        completion_tokens,
        run.target.fingerprint,
        cached_tokens=run.cached_tokens(),
    )


async def _chat_stream(run: ChatRun, completion_id: str, created: int, include_usage: bool) -> AsyncIterator[bytes]:
    call, plan = run.call, run.plan
    completion_tokens = 0

    def chunk(index: int, delta: dict[str, Any], **extra: Any) -> bytes:
        return sse(render.chat_chunk(completion_id, created, run.model, index, delta, **extra))

    try:
        for index in range(len(call.requests)):
            yield chunk(index, {"role": "assistant", "content": ""})
        want_logprobs = call.requests[0].logprobs is not None
        splitters = {index: ToolStream(plan) for index in range(len(call.requests))} if plan.active else {}
        async for index, output in call.outputs():
            logprobs = render.chat_logprobs(output.logprobs or []) if want_logprobs and output.logprobs else None
            splitter = splitters.get(index)
            if splitter is None:
                if output.text or logprobs:
                    yield chunk(index, {"content": output.text}, logprobs=logprobs)
            else:
                for delta in splitter.feed(output.text):
                    yield chunk(index, delta)
            if output.finished:
                completion_tokens += output.completion_tokens
                reason: str | None = output.finish_reason
                if splitter is not None:
                    for delta in splitter.finish():
                        yield chunk(index, delta)
                    reason = "tool_calls" if splitter.called and not splitter.cut_off else reason
                yield chunk(index, {}, finish_reason=reason)
        if include_usage:
            usage = render.usage(run.prompt_tokens, completion_tokens, run.cached_tokens())
            yield sse(render.usage_chunk(completion_id, created, run.model, "chat.completion.chunk", usage))
        yield render.SSE_DONE
    except LlmosError as exc:
        yield error_event(exc)


# --- completions ----------------------------------------------------------------------------------------------------


def _prompt_token_lists(body: CompletionRequest, model: LoadedModel) -> list[tuple[list[int], str]]:
    """Every prompt of the request as (tokens, text); token-array prompts are checked against the vocabulary."""
    prompt = body.prompt
    if isinstance(prompt, str):
        items: list[str | list[int]] = [prompt]
    elif prompt and isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)  # type: ignore[arg-type]
    result = []
    for item in items:
        if isinstance(item, str):
            result.append((model.text_tokens(item), item))
        else:
            if any(not 0 <= t < model.backend.n_vocab for t in item):
                raise InvalidInputError("prompt token ids must be within the vocabulary", param="prompt")
            result.append((list(item), model.backend.detokenize(item)))
    return result


@router.post("/v1/completions")
async def completions(request: Request) -> Any:
    arrived = time.monotonic()
    state = app_state(request)
    body = await parse_body(request, CompletionRequest, state.settings.max_request_bytes)
    if body.suffix is not None:
        raise InvalidInputError("suffix (fill-in-the-middle) is not supported by llmos", param="suffix")
    if body.max_tokens == 0 and not body.echo:
        raise InvalidInputError(
            "max_tokens must be at least 1 unless echo is true (prompt scoring)", param="max_tokens"
        )
    caller = principal(request)
    try:
        target = await acquire(state, caller, body.model, body.keep_alive)
    except ModelNotFoundError:
        if body.pipeline is None:
            raise
        return await start_for_missing_model(request, caller, body.model, body.pipeline)
    with target.held_until_submitted():
        model = target.model
        check_logit_bias(body.logit_bias, model.backend.n_vocab)
        prompts = await to_thread.run_sync(_prompt_token_lists, body, model)
        for tokens, _text in prompts:
            model.engine.check_fits(len(tokens), body.max_tokens)
        score_prompt = body.echo and body.logprobs is not None
        options = engine_options(
            state.settings, caller, cache_prompt=body.cache_prompt and not score_prompt, speculative=body.speculative
        )
        requests = [
            target.request(
                tokens,
                sampling(body, body.max_tokens, j),
                options,
                logprobs=body.logprobs,
                prompt_logprobs=score_prompt,
                priority=body.priority,
            )
            for tokens, _text in prompts
            for j in range(body.n)
        ]
        prompt_tokens = sum(len(tokens) for tokens, _text in prompts)
        worst_case = body.n * (prompt_tokens + body.max_tokens * len(prompts))
        metering = await meter(state, request, caller, worst_case, "completions", arrived)
    call = submit_all(target, requests, state.metrics, prompt_tokens=prompt_tokens, arrived=arrived, metering=metering)
    completion_id, created = new_id("cmpl"), int(time.time())
    echoes = [text for _tokens, text in prompts for _ in range(body.n)]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _completion_stream(call, body, completion_id, created, target.name, echoes, prompt_tokens, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    count = len(requests)
    texts: dict[int, list[str]] = {i: [] for i in range(count)}
    prompt_lps: dict[int, list[Logprob]] = {i: [] for i in range(count)}
    output_lps: dict[int, list[Logprob]] = {i: [] for i in range(count)}
    reasons: dict[int, str] = {}

    async def gather() -> int:
        completion_tokens = 0
        async for index, output in call.outputs():
            texts[index].append(output.text)
            prompt_lps[index].extend(output.prompt_logprobs or [])
            output_lps[index].extend(output.logprobs or [])
            if output.finished:
                reasons[index] = output.finish_reason or "stop"
                completion_tokens += output.completion_tokens
        return completion_tokens

    completion_tokens = await unless_disconnected(request, gather())
    choices = []
    for i in range(count):
        text = "".join(texts[i])
        logprobs = None
        if body.logprobs is not None:
            items = (prompt_lps[i] if body.echo else []) + output_lps[i]
            logprobs = render.completion_logprobs(items)
        choices.append(
            {
                "index": i,
                "text": (echoes[i] + text) if body.echo else text,
                "logprobs": logprobs,
                "finish_reason": reasons[i],
            }
        )
    usage = render.usage(prompt_tokens, completion_tokens, call.cached_prompt_tokens(body.n))
    return render.text_completion(completion_id, created, target.name, choices, usage, target.fingerprint)


async def _completion_stream(
    call: Call,
    body: CompletionRequest,
    completion_id: str,
    created: int,
    model: str,
    echoes: list[str],
    prompt_tokens: int,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    completion_tokens = 0
    try:
        if body.echo:
            for index, echo in enumerate(echoes):
                choice = {"index": index, "text": echo, "logprobs": None, "finish_reason": None}
                yield sse(render.text_completion(completion_id, created, model, [choice], None))
        async for index, output in call.outputs():
            logprobs = None
            if body.logprobs is not None and output.logprobs:
                logprobs = render.completion_logprobs(output.logprobs)
            if output.text or logprobs or output.finished:
                if output.finished:
                    completion_tokens += output.completion_tokens
                choice = {
                    "index": index,
                    "text": output.text,
                    "logprobs": logprobs,
                    "finish_reason": output.finish_reason if output.finished else None,
                }
                yield sse(render.text_completion(completion_id, created, model, [choice], None))
        if include_usage:
            usage = render.usage(prompt_tokens, completion_tokens, call.cached_prompt_tokens(body.n))
            yield sse(render.usage_chunk(completion_id, created, model, "text_completion", usage))
        yield render.SSE_DONE
    except LlmosError as exc:
        yield error_event(exc)
