"""Ollama's native API under ``/api/``, so Ollama's clients and tools can use llmos as their server.

Contract:

* ``GET /`` (and ``HEAD /``) answers ``Ollama is running`` in plain text, as Ollama does (the web console lives
  under ``/console``; like every route but ``/health`` and ``/ready`` it needs a key when keys are required).
  ``GET /api/version`` names llmos's version. ``GET /api/tags`` lists every model tag the caller may see and use,
  ``POST /api/show`` one of them (404 for one it may not see), ``GET /api/ps`` the resident ones the caller may
  see (from the residency manager; ``size`` is the memory accounted to the model, ``size_vram`` 0).
* ``POST /api/chat`` and ``POST /api/generate`` go through the chat machinery every surface shares
  (:mod:`llmos.api.chat`: authorisation, quotas, usage under ``ollama_chat`` / ``ollama_generate``, metrics, the
  prefix cache); ``generate`` renders ``prompt`` as a user turn after ``system`` with the model's chat template,
  or with ``raw`` tokenizes it as it is (special tokens parsed). ``stream`` defaults to true: NDJSON lines, each
  ``done: false`` with a piece of text, then one ``done: true`` line with ``done_reason`` (``stop`` / ``length``),
  the counts and the durations (nanoseconds) and, on chat, the tool calls; an error once streaming has begun is a
  final ``{"error": ...}`` line. ``tools`` are offered with choice ``auto``; calls come back with their arguments as
  objects. ``format`` ``"json"`` or a JSON schema constrains the output; ``logprobs`` (with ``top_logprobs``
  alternatives) reports each generated token's logprob. An empty ``prompt`` (or no messages)
  loads the model and answers ``done_reason: "load"`` (``"unload"`` with ``keep_alive: 0``, which unloads it once
  idle). ``num_predict`` beyond the context window stops at the window (``length``), as Ollama does. Refused with
  400: ``images``, ``suffix``, a custom ``template``, ``context`` and ``think`` (see :mod:`.schemas`).
* ``POST /api/embed`` (``input``: a string or a list) and the older ``POST /api/embeddings`` (``prompt``) embed
  with an embedding model; ``truncate`` (default true, as Ollama's) cuts each input to the model's token limit, false
  makes a longer input a 400. An empty input only loads the model.
* ``POST /api/pull`` registers a model llmos ships in an installed package (as ``llmos pull`` does; a developer or
  admin key; 404 for a name llmos cannot pull; the model is public, as one pulled with the CLI), streaming Ollama's
  status lines unless ``stream`` is false.
  ``DELETE /api/delete`` removes a tag (as ``DELETE /v1/models/{model}``: the owner tenant's developers or an
  admin); ``POST /api/copy`` points ``destination`` at the version ``source`` names (admins only, as
  ``/admin/models/tag``). All three are audited.

Errors on these routes are Ollama's ``{"error": "message"}`` with the status (see :func:`llmos.api.errors.shaped`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from llmos import __version__
from llmos.api.auth import principal, visible_view, visible_views
from llmos.api.body import parse_body
from llmos.api.chat import ChatJob, start_chat
from llmos.api.embedding import embed_texts
from llmos.api.generation import Call, acquire, authorised_view, engine_options, meter, submit_all, unless_disconnected
from llmos.api.ollama import render
from llmos.api.ollama.schemas import (
    ChatRequest,
    CopyRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    ModelRequest,
    chat_messages,
    max_tokens,
    sampling,
    tool_plan,
)
from llmos.api.state import AppState, app_state
from llmos.api.tool_plan import ToolPlan, ToolStream, split_output
from llmos.engine.grammar import json_object_grammar, json_schema_grammar
from llmos.engine.request import GenerationOutput, Logprob
from llmos.errors import ContextLengthExceededError, LlmosError, PermissionDeniedError
from llmos.registry import sources
from llmos.registry.views import VersionView
from llmos.runtime.model import LoadedModel
from llmos.runtime.replicas import ReplicaSet
from llmos.runtime.residency import parse_keep_alive
from llmos.security.principal import Principal
from llmos.types import ChatMessage, FunctionCall

log = logging.getLogger("llmos.api")
router = APIRouter()
"""Every route of this module: ``/`` and, included at the end, :data:`api`."""
api = APIRouter(prefix="/api")


# --- models ---------------------------------------------------------------------------------------------------------


@router.api_route("/", methods=["GET", "HEAD"], response_class=PlainTextResponse, include_in_schema=False)
async def root() -> str:
    """What Ollama answers at its root, which its tools probe to see whether a server is up."""
    return "Ollama is running"


@api.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@api.get("/tags")
async def tags(request: Request) -> dict[str, Any]:
    state = app_state(request)
    caller = principal(request)
    views = await to_thread.run_sync(state.registry.list_versions)
    visible = visible_views(caller, views)
    return {"models": [render.model_entry(v) for v in visible]}


@api.post("/show")
async def show(request: Request) -> dict[str, Any]:
    state = app_state(request)
    body = await parse_body(request, ModelRequest, state.settings.max_request_bytes)
    name = body.model
    view = visible_view(principal(request), await to_thread.run_sync(state.registry.show, name), name)
    return render.show(view)


def _context_length(instance: object) -> int | None:
    if isinstance(instance, ReplicaSet):
        instance = instance.replicas[0]
    return instance.engine.max_context if isinstance(instance, LoadedModel) else None


@api.get("/ps")
async def ps(request: Request) -> dict[str, Any]:
    state = app_state(request)
    caller = principal(request)
    residency = state.residency
    models = [
        render.running(entry.view, entry.reserved, residency.expires_in(entry), _context_length(entry.instance))
        for entry in residency.snapshot()
        if caller.may_see(entry.view.tenant_id) and caller.may_use(entry.view.repository, entry.view.name)
    ]
    return {"models": models}


# --- chat and generate ----------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Times and counts of one generation, for the final line."""

    arrived: float
    submitted: float
    prompt_tokens: int
    first: float | None = None
    eval_count: int = 0
    done_reason: str = "stop"

    def see(self, output: GenerationOutput) -> None:
        if self.first is None and output.token_ids:
            self.first = output.time
        if output.finished:
            self.eval_count = output.completion_tokens
            self.done_reason = "length" if output.finish_reason == "length" else "stop"

    def final(self) -> dict[str, Any]:
        counts = render.durations(
            self.arrived, self.submitted, self.first, time.monotonic(), self.prompt_tokens, self.eval_count
        )
        return {"done": True, "done_reason": self.done_reason, **counts}


@dataclass
class Generation:
    """One running chat or generate request and how its answer is shaped."""

    call: Call
    model: str
    plan: ToolPlan
    progress: Progress
    logprobs: bool
    key: str
    """``message`` (chat) or ``response`` (generate)."""

    def piece(
        self, text: str, logprobs: list[Logprob] | None = None, calls: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "created_at": render.timestamp()}
        if self.key == "message":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                message["tool_calls"] = calls
            body["message"] = message
        else:
            body["response"] = text
        if self.logprobs and logprobs:
            body["logprobs"] = render.logprobs(logprobs)
        return body


class StreamedCalls:
    """Tool calls assembled from a :class:`~llmos.api.tool_plan.ToolStream`'s deltas."""

    def __init__(self) -> None:
        self._calls: dict[int, list[str]] = {}  # index -> [id, name, arguments]

    def feed(self, deltas: list[dict[str, Any]]) -> None:
        for delta in deltas:
            for part in delta.get("tool_calls", ()):
                function = part.get("function", {})
                if "id" in part:
                    self._calls[part["index"]] = [part["id"], function.get("name", ""), function.get("arguments", "")]
                elif part["index"] in self._calls:
                    self._calls[part["index"]][2] += function.get("arguments", "")

    def rendered(self) -> list[dict[str, Any]]:
        return render.tool_calls([FunctionCall(*self._calls[index]) for index in sorted(self._calls)])


async def _lines(gen: Generation) -> AsyncIterator[bytes]:
    splitter = ToolStream(gen.plan) if gen.plan.active else None
    calls = StreamedCalls()
    try:
        async for _index, output in gen.call.outputs():
            gen.progress.see(output)
            text = output.text
            if splitter is not None:
                deltas = splitter.feed(output.text) + (splitter.finish() if output.finished else [])
                calls.feed(deltas)
                text = "".join(delta.get("content") or "" for delta in deltas)
            if output.finished:
                yield render.ndjson({**gen.piece(text, output.logprobs, calls.rendered()), **gen.progress.final()})
            elif text or (gen.logprobs and output.logprobs):
                yield render.ndjson({**gen.piece(text, output.logprobs), "done": False})
    except LlmosError as exc:
        yield render.ndjson({"error": exc.message})


async def _whole(gen: Generation) -> dict[str, Any]:
    parts: list[str] = []
    logprobs: list[Logprob] = []
    async for _index, output in gen.call.outputs():
        gen.progress.see(output)
        parts.append(output.text)
        logprobs.extend(output.logprobs or [])
    text, calls = split_output("".join(parts), gen.plan)
    return {**gen.piece(text, logprobs, render.tool_calls(calls)), **gen.progress.final()}


async def _answer(request: Request, gen: Generation, stream: bool) -> Any:
    if stream:
        return StreamingResponse(_lines(gen), media_type="application/x-ndjson")
    return await unless_disconnected(request, _whole(gen))


def _grammar(fmt: str | dict[str, Any] | None) -> str | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return json_object_grammar()
    return json_schema_grammar(fmt)


async def _start_chat(state: AppState, request: Request, caller: Principal, job: ChatJob, arrived: float) -> Generation:
    try:
        run = await start_chat(state, request, caller, job)
    except ContextLengthExceededError as exc:
        if job.max_tokens is None or exc.param != "max_tokens":
            raise
        # num_predict past the window: generate to the end of the window, as Ollama does
        run = await start_chat(state, request, caller, replace(job, max_tokens=None))
    key = "message" if job.endpoint == "ollama_chat" else "response"
    progress = Progress(arrived, run.call.submitted, run.prompt_tokens)
    return Generation(run.call, run.model, run.plan, progress, job.logprobs is not None, key)


async def _start_raw(
    state: AppState, request: Request, caller: Principal, body: GenerateRequest, grammar: str | None, arrived: float
) -> Generation:
    target = await acquire(state, caller, body.model, body.keep_alive)
    with target.held_until_submitted():
        model = target.model
        prompt = await to_thread.run_sync(model.raw_tokens, body.prompt or "")
        model.engine.check_fits(len(prompt))
        rest = model.engine.max_context - len(prompt)
        limit = max_tokens(body.options)
        limit = rest if limit is None else min(limit, rest)
        options = engine_options(state.settings, caller, cache_prompt=True, speculative=True)
        generation = target.request(
            prompt,
            replace(sampling(body.options), max_tokens=limit),
            options,
            logprobs=body.logprob_count(),
            grammar=grammar,
        )
        metering = await meter(state, request, caller, len(prompt) + limit, "ollama_generate", arrived)
    call = submit_all(
        target, [generation], state.metrics, prompt_tokens=len(prompt), arrived=arrived, metering=metering
    )
    progress = Progress(arrived, call.submitted, len(prompt))
    return Generation(call, target.name, ToolPlan(), progress, body.logprobs, "response")


async def _load_only(state: AppState, caller: Principal, name: str, keep_alive: object, key: str) -> dict[str, Any]:
    """Ollama's answer to a request without a prompt: the model loaded (or, with keep-alive 0, unloaded)."""
    unload = parse_keep_alive(keep_alive) == 0  # type: ignore[arg-type]
    model = name
    resident = True
    if unload:
        view = await authorised_view(state, caller, name)
        model = view.name
        resident = view.format == "lora" or any(e.view.digest == view.digest for e in state.residency.snapshot())
    if resident:
        target = await acquire(state, caller, name, keep_alive)
        model = target.name
        target.release()
    body: dict[str, Any] = {"model": model, "created_at": render.timestamp()}
    body[key] = {"role": "assistant", "content": ""} if key == "message" else ""
    return {**body, "done": True, "done_reason": "unload" if unload else "load"}


@api.post("/chat")
async def chat(request: Request) -> Any:
    arrived = time.monotonic()
    state = app_state(request)
    body = await parse_body(request, ChatRequest, state.settings.max_request_bytes)
    body.check_unsupported()
    messages = chat_messages(body.messages)
    caller = principal(request)
    if not messages:
        return await _load_only(state, caller, body.model, body.keep_alive, "message")
    tools = await to_thread.run_sync(tool_plan, body)
    grammar = None if tools.active else await to_thread.run_sync(_grammar, body.format)
    job = ChatJob(
        model=body.model,
        messages=messages,
        sampling=sampling(body.options),
        max_tokens=max_tokens(body.options),
        endpoint="ollama_chat",
        plan=tools,
        grammar=grammar,
        logprobs=body.logprob_count(),
        keep_alive=body.keep_alive,
    )
    return await _answer(request, await _start_chat(state, request, caller, job, arrived), body.stream)


@api.post("/generate")
async def generate(request: Request) -> Any:
    arrived = time.monotonic()
    state = app_state(request)
    body = await parse_body(request, GenerateRequest, state.settings.max_request_bytes)
    body.check_unsupported()
    caller = principal(request)
    if not body.prompt:
        return await _load_only(state, caller, body.model, body.keep_alive, "response")
    grammar = await to_thread.run_sync(_grammar, body.format)
    if body.raw:
        return await _answer(request, await _start_raw(state, request, caller, body, grammar, arrived), body.stream)
    messages = [ChatMessage("system", body.system)] if body.system else []
    messages.append(ChatMessage("user", body.prompt))
    job = ChatJob(
        model=body.model,
        messages=messages,
        sampling=sampling(body.options),
        max_tokens=max_tokens(body.options),
        endpoint="ollama_generate",
        grammar=grammar,
        logprobs=body.logprob_count(),
        keep_alive=body.keep_alive,
    )
    return await _answer(request, await _start_chat(state, request, caller, job, arrived), body.stream)


# --- embeddings -----------------------------------------------------------------------------------------------------


@api.post("/embed")
async def embed(request: Request) -> dict[str, Any]:
    arrived = time.monotonic()
    state = app_state(request)
    body = await parse_body(request, EmbedRequest, state.settings.max_request_bytes)
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    result = await embed_texts(
        state,
        request,
        principal(request),
        body.model,
        texts,
        endpoint="ollama_embed",
        keep_alive=body.keep_alive,
        truncate=body.truncate,
        dimensions=body.dimensions,
        arrived=arrived,
    )
    return {
        "model": result.model,
        "embeddings": result.vectors.tolist(),
        "total_duration": render.nanoseconds(time.monotonic() - arrived),
        "load_duration": render.nanoseconds(result.loaded - arrived),
        "prompt_eval_count": result.tokens,
    }


@api.post("/embeddings")
async def embeddings(request: Request) -> dict[str, Any]:
    arrived = time.monotonic()
    state = app_state(request)
    body = await parse_body(request, EmbeddingsRequest, state.settings.max_request_bytes)
    texts = [body.prompt] if body.prompt else []
    result = await embed_texts(
        state,
        request,
        principal(request),
        body.model,
        texts,
        endpoint="ollama_embed",
        keep_alive=body.keep_alive,
        truncate=True,
        arrived=arrived,
    )
    return {"embedding": result.vectors[0].tolist() if len(result.vectors) else []}


# --- pull, delete, copy ---------------------------------------------------------------------------------------------


class Pull:
    """``sources.pull`` in a worker thread, audited there when it ends (whether or not the client still listens),
    its progress and outcome handed to the event loop through a queue."""

    def __init__(self, state: AppState, caller: Principal, name: str) -> None:
        self.state = state
        self.caller = caller
        self.name = name
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[dict[str, Any] | VersionView | BaseException] = asyncio.Queue()

    def _put(self, item: dict[str, Any] | VersionView | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the server stopped meanwhile: nobody listens
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _progress(self, label: str, total: int) -> Any:
        done = [0, -1]  # bytes so far, last percentage sent
        self._put({"status": f"pulling {label}", "total": total, "completed": 0})

        def advance(count: int) -> None:
            done[0] += count
            percent = done[0] * 100 // max(total, 1)
            if percent != done[1]:
                done[1] = percent
                self._put({"status": f"pulling {label}", "total": total, "completed": min(done[0], total)})

        return advance

    def _run(self) -> None:
        security, actor, tenant = self.state.security, self.caller.actor, self.caller.tenant
        try:
            view = sources.pull(self.state.registry, self.name, progress=self._progress)
        except BaseException as exc:  # handed to the request
            reason = exc.message if isinstance(exc, LlmosError) else type(exc).__name__
            security.audit(actor, tenant, "model.pull", self.name, "failed", reason=reason)
            self._put(exc)
            return
        security.audit(actor, tenant, "model.pull", view.name, "ok")
        self._put(view)

    def start(self) -> None:
        threading.Thread(target=self._run, name="llmos-ollama-pull", daemon=True).start()

    async def next(self) -> dict[str, Any] | VersionView:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


async def _pull_lines(pull: Pull, first: dict[str, Any] | VersionView) -> AsyncIterator[bytes]:
    yield render.ndjson({"status": "pulling manifest"})
    item = first
    try:
        while not isinstance(item, VersionView):
            yield render.ndjson(item)
            item = await pull.next()
    except LlmosError as exc:
        yield render.ndjson({"error": exc.message})
        return
    except Exception:
        log.exception("pull failed")
        yield render.ndjson({"error": "the pull failed; see the server log"})
        return
    for status in ("verifying sha256 digest", "writing manifest", "success"):
        yield render.ndjson({"status": status})


@api.post("/pull")
async def pull(request: Request) -> Any:
    state = app_state(request)
    caller = principal(request)
    body = await parse_body(request, ModelRequest, state.settings.max_request_bytes)
    name = body.model
    if not caller.at_least("developer"):
        state.security.audit(caller.actor, caller.tenant, "model.pull", name, "denied")
        raise PermissionDeniedError("pulling a model needs a developer or admin key")
    job = Pull(state, caller, name)
    job.start()
    item = await job.next()  # an unknown name fails here, as a plain HTTP error
    if body.stream:
        return StreamingResponse(_pull_lines(job, item), media_type="application/x-ndjson")
    while not isinstance(item, VersionView):
        item = await job.next()
    return {"status": "success"}


@api.delete("/delete")
async def delete(request: Request) -> Response:
    """Remove a model tag, as ``DELETE /v1/models/{model}`` does (the owner tenant's developers or an admin)."""
    state = app_state(request)
    caller = principal(request)
    body = await parse_body(request, ModelRequest, state.settings.max_request_bytes)
    name = body.model
    view = visible_view(caller, await to_thread.run_sync(state.registry.show, name), name)
    if not (caller.is_admin or (caller.at_least("developer") and view.tenant_id == caller.tenant_id)):
        state.security.audit(caller.actor, caller.tenant, "model.delete", view.name, "denied")
        raise PermissionDeniedError(f"deleting {view.name} needs an admin key or a developer key of its tenant")
    await to_thread.run_sync(state.registry.remove, name)
    state.security.audit(caller.actor, caller.tenant, "model.delete", view.name, "ok")
    return Response(status_code=200)


@api.post("/copy")
async def copy(request: Request) -> Response:
    """Point ``destination`` at the version ``source`` names, as ``POST /admin/models/tag`` does (admins only)."""
    state = app_state(request)
    caller = principal(request)
    body = await parse_body(request, CopyRequest, state.settings.max_request_bytes)
    if not caller.is_admin:
        state.security.audit(caller.actor, caller.tenant, "model.tag", body.destination, "denied")
        raise PermissionDeniedError(f"copying a model needs an admin key; yours is {caller.role}")
    visible_view(caller, await to_thread.run_sync(state.registry.show, body.source), body.source)
    tagged = await to_thread.run_sync(
        lambda: state.registry.tag(body.source, body.destination, reason=f"copy ({caller.actor})")
    )
    state.security.audit(caller.actor, caller.tenant, "model.tag", tagged.name, "ok")
    return Response(status_code=200)


router.include_router(api)
