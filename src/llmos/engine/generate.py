"""Single-sequence generation: the shortest path from prompt tokens to streamed text.

Contract: :class:`Generation` is an iterator of text deltas for one prompt on one model. It evaluates the prompt in
slices of at most ``n_batch`` tokens, then samples and decodes one token at a time until an end-of-generation
token, a stop string (never emitted, never split across deltas), ``max_tokens``, or the end of the context window.
When iteration ends, ``stats`` holds token counts, timings and the finish reason, and the sequence's KV cache is
released. The caller owns the thread: a model may run one Generation at a time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from llmos.engine.backends.llamacpp import BatchItem, LlamaCppModel
from llmos.engine.text import IncrementalDecoder, StopMatcher
from llmos.errors import ContextLengthExceededError
from llmos.types import FinishReason, SamplingParams


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    completion_tokens: int
    prompt_seconds: float
    decode_seconds: float
    finish_reason: FinishReason

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first, over the time spent producing them (the first comes with the prompt pass)."""
        if self.completion_tokens <= 1 or self.decode_seconds <= 0:
            return 0.0
        return (self.completion_tokens - 1) / self.decode_seconds


def check_fits(prompt_tokens: int, n_ctx: int) -> None:
    if prompt_tokens >= n_ctx:
        raise ContextLengthExceededError(
            f"the prompt is {prompt_tokens} tokens but the model's context window is {n_ctx} tokens"
            " (at least one must be left to generate)",
            param="messages",
        )


class Generation:
    def __init__(
        self, model: LlamaCppModel, prompt_tokens: Sequence[int], params: SamplingParams, *, seq_id: int = 0
    ) -> None:
        if not prompt_tokens:
            raise ContextLengthExceededError("the prompt is empty after tokenization", param="prompt")
        check_fits(len(prompt_tokens), model.n_ctx)
        self.model = model
        self.prompt_tokens = list(prompt_tokens)
        self.params = params
        self.seq_id = seq_id
        self.tokens: list[int] = []
        self.stats: GenerationStats | None = None

    def __iter__(self) -> Iterator[str]:
        model, params = self.model, self.params
        decoder, stops = IncrementalDecoder(), StopMatcher(params.stop)
        sampler = model.new_sampler(params)
        finish: FinishReason = "length"
        start = time.perf_counter()
        first_token_at = start
        try:
            position = 0
            for begin in range(0, len(self.prompt_tokens), model.n_batch):
                chunk = self.prompt_tokens[begin : begin + model.n_batch]
                last_chunk = begin + model.n_batch >= len(self.prompt_tokens)
                outputs = model.decode([BatchItem(self.seq_id, chunk, position, want_logits=last_chunk)])
                position += len(chunk)
            output_index = outputs[self.seq_id]
            limit = min(params.max_tokens, model.n_ctx - len(self.prompt_tokens))
            while len(self.tokens) < limit:
                token = sampler.sample(model.context, output_index)
                if not self.tokens:
                    first_token_at = time.perf_counter()
                if model.is_end_of_generation(token):
                    finish = "stop"
                    break
                self.tokens.append(token)
                delta = stops.feed(decoder.feed(model.token_bytes(token)))
                if delta:
                    yield delta
                if stops.stopped:
                    finish = "stop"
                    break
                if len(self.tokens) >= limit:
                    break
                outputs = model.decode([BatchItem(self.seq_id, [token], position)])
                output_index = outputs[self.seq_id]
                position += 1
            if not stops.stopped:
                tail = stops.feed(decoder.flush()) + stops.flush()
                if tail:
                    yield tail
        finally:
            sampler.close()
            model.forget_sequence(self.seq_id)
            end = time.perf_counter()
            if not self.tokens:
                first_token_at = end
            self.stats = GenerationStats(
                prompt_tokens=len(self.prompt_tokens),
                completion_tokens=len(self.tokens),
                prompt_seconds=first_token_at - start,
                decode_seconds=end - first_token_at,
                finish_reason=finish,
            )
