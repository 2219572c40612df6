"""Token sampling on PyTorch logits, with the same parameters as the llama.cpp sampler chain.

Contract: :class:`TorchSampler` turns one row of raw logits into a token: logit bias, repetition / presence /
frequency penalties over the last ``penalty_last_n`` tokens of the sequence, then greedy (``temperature == 0``) or
top-k, top-p, min-p, temperature and a draw from a per-sequence generator seeded with ``seed`` (reproducible). It
remembers the tokens it produced, for the penalties.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmos.types import SamplingParams


class TorchSampler:
    def __init__(self, params: SamplingParams, logits_of: Callable[[int], torch.Tensor], history: list[int]) -> None:
        self.params = params
        self._logits_of = logits_of
        self._history = history
        self._generator = torch.Generator()
        self._generator.manual_seed(params.seed if params.seed is not None else torch.seed())

    def sample(self, output_row: int) -> int:
        params = self.params
        logits = self._logits_of(output_row).to(torch.float32).clone()
        for token, bias in params.logit_bias:
            logits[token] += bias
        if params.repeat_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
            recent = self._history[-params.penalty_last_n :] if params.penalty_last_n > 0 else []
            if recent:
                ids, counts = torch.unique(torch.tensor(recent), return_counts=True)
                chosen = logits[ids]
                if params.repeat_penalty != 1.0:
                    chosen = torch.where(chosen > 0, chosen / params.repeat_penalty, chosen * params.repeat_penalty)
                chosen = chosen - counts.to(torch.float32) * params.frequency_penalty - params.presence_penalty
                logits[ids] = chosen
        token = int(torch.argmax(logits)) if params.greedy else self._draw(logits)
        self._history.append(token)
        return token

    def _draw(self, logits: torch.Tensor) -> int:
        params = self.params
        if params.top_k > 0 and params.top_k < logits.numel():
            kth = torch.topk(logits, params.top_k).values[-1]
            logits = torch.where(logits < kth, torch.full_like(logits, float("-inf")), logits)
        probs = torch.softmax(logits, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            drop = cumulative - sorted_probs > params.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        if params.min_p > 0.0:
            probs = torch.where(probs < probs.max() * params.min_p, torch.zeros_like(probs), probs)
        logits = torch.log(probs) / params.temperature
        final = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(final, 1, generator=self._generator))

    def close(self) -> None:
        return None
