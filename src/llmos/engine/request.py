"""Messages between the engine and its callers: what to generate, and what came out.

Contract: plain dataclasses, no behaviour. A :class:`GenerationRequest` is immutable once submitted. The engine
answers with a stream of :class:`GenerationOutput` events for that request: zero or more with new text, then
exactly one with ``finished=True`` (and, on failure, ``error`` set). Every event carries the cumulative token
counts, so the last one is also the usage record, and, once the request was admitted, its admission time.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from llmos.errors import LlmosError
from llmos.types import FinishReason, SamplingParams

_ids = itertools.count(1)


def new_request_id() -> str:
    return f"req-{next(_ids)}-{time.monotonic_ns() % 1_000_000_000}"


@dataclass(frozen=True)
class GenerationRequest:
    prompt_tokens: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=new_request_id)
    priority: int = 0
    """Lower runs first; equal priorities are served first-come-first-served."""
    logprobs: int | None = None
    """None: no logprobs. N >= 0: logprob of each generated token plus the N most likely alternatives."""
    prompt_logprobs: bool = False
    """Score the prompt too (completions ``echo`` with ``logprobs``): logprob of every prompt token but the first."""
    score_from: int = 1
    """With ``prompt_logprobs``: the first prompt token to score. Earlier ones come back with logprob None, and a
    prefill chunk that only precedes it computes no logits (the overlap of a strided perplexity window is free)."""
    grammar: str | None = None
    """GBNF grammar the output must follow (JSON mode / JSON schema / tool calls)."""
    grammar_trigger: str | None = None
    """With ``grammar``: apply it only from where the output first contains this text (``tool_choice: auto``: text,
    or a call that is valid once started). None: from the first token."""
    adapter: str | None = None
    """Name of a LoRA adapter loaded on the backend to apply to this request's tokens."""
    fairness_key: str | None = None
    """Who the scheduler shares slots between before it looks at arrival order (the server uses the tenant)."""
    prefix_scope: str | None = None
    """Requests reuse each other's cached prompt prefixes only when their scope and adapter are equal (the server
    scopes by tenant unless cross-tenant sharing is enabled)."""
    cache_prompt: bool = True
    """False: neither reuse nor keep a cached prefix for this request."""
    speculative: bool = True
    """False: no speculative decoding for this request (it is used only where the engine enables it)."""


@dataclass(frozen=True)
class Logprob:
    token: int
    text: bytes
    logprob: float | None
    top: tuple[tuple[int, bytes, float], ...] = ()


@dataclass
class GenerationOutput:
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] | None = None
    prompt_logprobs: list[Logprob] | None = None
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache instead of being computed."""
    stop_sequence: str | None = None
    """On the final event of a request stopped by one of its stop strings: that string (else None)."""
    error: LlmosError | None = None
    time: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    """``time.monotonic()`` when the request first took a slot in the running batch (None while it never did):
    with the caller's submission time, its queue wait."""
