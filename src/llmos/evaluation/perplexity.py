"""Perplexity of a loaded model on a text, scored through the engine with a sliding window.

Contract: :func:`perplexity` tokenizes ``text`` the way the model reads text (its BOS convention), cuts it into
windows of at most ``window`` tokens advancing by ``stride`` (default: half a window), and submits every window at
once as a prompt-scoring request (``prompt_logprobs``, no generated token; see
:func:`~llmos.evaluation.runner.run_requests`), so the engine batches them like any other requests. The default
window is 1024 tokens, or the model's context minus one when that is shorter (a scored prompt must fit the context).
Each token is scored once, in the first window where it is not part of the overlap, with the context that window
gives it (the standard strided evaluation; the very first token has no prediction). Perplexity is
``exp(total negative log-likelihood / scored tokens)``. With ``shard=(index, count)`` only windows ``index, index +
count, ...`` are scored (data-parallel evaluation: the shards' ``nll * tokens`` add up to the whole text's; a shard
with no window scores no token and has a NaN perplexity).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from llmos.engine.request import GenerationRequest
from llmos.errors import InvalidInputError
from llmos.evaluation.runner import Progress, run_requests
from llmos.runtime.model import LoadedModel
from llmos.types import SamplingParams

DEFAULT_WINDOW = 1024


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens: int
    windows: int
    window: int
    stride: int
    seconds: float
    tokens_per_second: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) of each window; every index in 1..n-1 is scored exactly once."""
    spans = []
    scored_until = 1
    begin = 0
    while scored_until < n_tokens:
        end = min(begin + window, n_tokens)
        spans.append((begin, end, scored_until))
        scored_until = end
        if end == n_tokens:
            break
        begin = end - (window - stride)
    return spans


def perplexity(
    model: LoadedModel,
    text: str,
    *,
    window: int | None = None,
    stride: int | None = None,
    progress: Progress | None = None,
    adapter: str | None = None,
    shard: tuple[int, int] = (0, 1),
) -> PerplexityResult:
    limit = model.engine.max_context - 1  # the engine keeps one position free after a prompt
    window = window or min(limit, DEFAULT_WINDOW)
    if not 2 <= window <= limit:
        raise InvalidInputError(
            f"window must be between 2 and {limit} (the model's context minus one), got {window}", param="window"
        )
    stride = stride or max(1, window // 2)
    if not 1 <= stride <= window:
        raise InvalidInputError(f"stride must be between 1 and the window ({window}), got {stride}", param="stride")
    tokens = model.backend.tokenize(text, add_special=True, parse_special=False)
    if len(tokens) < 2:
        raise InvalidInputError("the text is too short to measure perplexity (fewer than 2 tokens)")
    index, count = shard
    if not 0 <= index < count:
        raise InvalidInputError(f"shard must be (index, count) with 0 <= index < count, got {shard}", param="shard")
    spans = windows(len(tokens), window, stride)[index::count]
    params = SamplingParams(max_tokens=0, temperature=0.0)
    requests = [  # the window's overlap with the previous one is context only: it needs no logits
        GenerationRequest(tokens[begin:end], params, prompt_logprobs=True, score_from=first - begin, priority=1)
        for begin, end, first in spans
    ]
    started = time.perf_counter()
    collected = run_requests(model, requests, progress, adapter)
    nll, scored = 0.0, 0
    for (begin, _end, first), result in zip(spans, collected, strict=True):
        for index, item in enumerate(result.prompt_logprobs):
            if begin + index >= first and item.logprob is not None:
                nll -= item.logprob
                scored += 1
    seconds = time.perf_counter() - started
    return PerplexityResult(
        perplexity=math.exp(nll / scored) if scored else math.nan,
        nll=nll / scored if scored else 0.0,
        tokens=scored,
        windows=len(spans),
        window=window,
        stride=stride,
        seconds=seconds,
        tokens_per_second=scored / seconds if seconds > 0 else 0.0,
    )
