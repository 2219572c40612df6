"""One chat generation, whichever API asked for it.

Contract: every chat surface (OpenAI chat completions, the Responses API, Anthropic Messages, Ollama's chat and
generate) turns its body into a :class:`ChatJob` (llmos's own messages, a :class:`~llmos.api.tool_plan.ToolPlan`,
a grammar, sampling parameters) and calls :func:`start_chat`. It resolves and leases the model the caller may use
(404 for one it may not see), renders and tokenizes the prompt in a worker thread, checks the context window,
reserves the caller's quota for the worst case, and submits every choice to the model's engine; the returned
:class:`ChatRun` streams ``(choice, output)`` pairs through its :class:`~llmos.api.generation.Call`, which settles
quota, usage records and metrics when it ends. :func:`collect` gathers a run's choices for a non-streamed answer.
So authentication, quotas, usage accounting, metrics and the prefix cache behave the same on every surface; only
the shapes of bodies and events differ.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from anyio import to_thread
from fastapi import Request

from llmos.api.generation import Call, Target, acquire, engine_options, meter, submit_all, unless_disconnected
from llmos.api.state import AppState
from llmos.api.tool_plan import ToolPlan
from llmos.engine.request import Logprob
from llmos.errors import InvalidInputError
from llmos.runtime.model import LoadedModel
from llmos.security.principal import Principal
from llmos.types import ChatMessage, SamplingParams


@dataclass
class ChatJob:
    """What one chat request asks of the engine, in llmos's own terms."""

    model: str
    messages: list[ChatMessage]
    sampling: SamplingParams
    """Per-choice parameters; ``max_tokens`` is replaced by the job's limit and choice ``i`` gets ``seed + i``."""
    max_tokens: int | None = None
    """None: the rest of the context window."""
    endpoint: str = "chat"
    """The usage record's endpoint label."""
    plan: ToolPlan = field(default_factory=ToolPlan)
    grammar: str | None = None
    n: int = 1
    logprobs: int | None = None
    priority: int = 0
    keep_alive: object = None
    cache_prompt: bool = True
    speculative: bool = True


@dataclass
class ChatRun:
    target: Target
    call: Call
    prompt_tokens: int
    plan: ToolPlan

    @property
    def model(self) -> str:
        """The name the answer reports: the one the caller asked for, resolved (``smollm2:latest``)."""
        return self.target.name

    def cached_tokens(self) -> int:
        return self.call.cached_prompt_tokens(len(self.call.requests))


@dataclass
class ChoiceResult:
    """One finished choice of a non-streamed answer."""

    text: str = ""
    finish_reason: str = "stop"
    completion_tokens: int = 0
    logprobs: list[Logprob] = field(default_factory=list)
    stop_sequence: str | None = None


def check_logit_bias(bias: dict[str, float] | dict[int, float] | None, n_vocab: int) -> None:
    for token in bias or {}:
        if not 0 <= int(token) < n_vocab:
            raise InvalidInputError(f"logit_bias token id {token} is outside the vocabulary", param="logit_bias")


def _prompt(model: LoadedModel, job: ChatJob) -> list[int]:
    """The job's conversation rendered with its tools and tokenized (blocking: call from a worker thread)."""
    return model.chat_tokens(job.messages, tools=job.plan.offered, tool_required=job.plan.required)


async def start_chat(state: AppState, request: Request, caller: Principal, job: ChatJob) -> ChatRun:
    """Lease the model, tokenize, check the window, reserve quota and submit every choice (see the module contract)."""
    arrived = time.monotonic()
    target = await acquire(state, caller, job.model, job.keep_alive)
    with target.held_until_submitted():
        model = target.model
        check_logit_bias(dict(job.sampling.logit_bias), model.backend.n_vocab)
        plan = job.plan
        prompt = await to_thread.run_sync(_prompt, model, job)
        model.engine.check_fits(len(prompt), job.max_tokens)
        max_tokens = job.max_tokens if job.max_tokens is not None else model.engine.max_context - len(prompt)
        options = engine_options(state.settings, caller, cache_prompt=job.cache_prompt, speculative=job.speculative)
        seed = job.sampling.seed
        requests = [
            target.request(
                prompt,
                replace(job.sampling, max_tokens=max_tokens, seed=None if seed is None else seed + i),
                options,
                logprobs=job.logprobs,
                grammar=plan.grammar if plan.active else job.grammar,
                grammar_trigger=plan.trigger if plan.active else None,
                priority=job.priority,
            )
            for i in range(job.n)
        ]
        metering = await meter(state, request, caller, job.n * (len(prompt) + max_tokens), job.endpoint, arrived)
    call = submit_all(target, requests, state.metrics, prompt_tokens=len(prompt), arrived=arrived, metering=metering)
    return ChatRun(target, call, len(prompt), plan)


async def collect(run: ChatRun, request: Request) -> list[ChoiceResult]:
    """Every choice of ``run``, generated to its end (or cancelled when the client of ``request`` leaves)."""
    return await unless_disconnected(request, _collect(run))


async def _collect(run: ChatRun) -> list[ChoiceResult]:
    results = [ChoiceResult() for _ in run.call.requests]
    texts: list[list[str]] = [[] for _ in results]
    async for index, output in run.call.outputs():
        texts[index].append(output.text)
        results[index].logprobs.extend(output.logprobs or [])
        if output.finished:
            results[index].finish_reason = output.finish_reason or "stop"
            results[index].completion_tokens = output.completion_tokens
            results[index].stop_sequence = output.stop_sequence
    for result, parts in zip(results, texts, strict=True):
        result.text = "".join(parts)
    return results


async def count_prompt(state: AppState, caller: Principal, job: ChatJob) -> int:
    """The prompt tokens ``job`` would take (the model is leased to tokenize; nothing is generated or charged)."""
    target = await acquire(state, caller, job.model, job.keep_alive)
    try:
        model = target.model
        tokens = await to_thread.run_sync(_prompt, model, job)
    finally:
        target.release()
    return len(tokens)
