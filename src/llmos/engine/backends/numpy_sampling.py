"""Token sampling on numpy logits, with the same parameters and order as the PyTorch and llama.cpp samplers.

Contract: :class:`NumpySampler` turns one row of raw logits into a token: logit bias, repetition / presence /
frequency penalties over the last ``penalty_last_n`` tokens of the sequence, then greedy (``temperature == 0``, the
first of equal maxima) or top-k, top-p, min-p, temperature and a draw from a per-sequence generator seeded with
``seed`` (reproducible). It remembers the tokens it produced, for the penalties.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from llmos.types import SamplingParams


class NumpySampler:
    def __init__(self, params: SamplingParams, logits_of: Callable[[int], np.ndarray], history: list[int]) -> None:
        self.params = params
        self._logits_of = logits_of
        self._history = history
        self._rng = np.random.default_rng(params.seed)

    def sample(self, output_row: int) -> int:
        params = self.params
        plain = not params.logit_bias and params.repeat_penalty == 1.0
        plain = plain and not params.presence_penalty and not params.frequency_penalty
        if params.greedy and plain:
            token = int(np.argmax(self._logits_of(output_row)))
            self._history.append(token)
            return token
        logits = self._logits_of(output_row).astype(np.float64)  # a copy: the row stays as the backend left it
        for token, bias in params.logit_bias:
            logits[token] += bias
        recent = self._history[-params.penalty_last_n :] if params.penalty_last_n > 0 else []
        if recent and (params.repeat_penalty != 1.0 or params.presence_penalty or params.frequency_penalty):
            ids, counts = np.unique(np.asarray(recent), return_counts=True)
            chosen = logits[ids]
            if params.repeat_penalty != 1.0:
                chosen = np.where(chosen > 0, chosen / params.repeat_penalty, chosen * params.repeat_penalty)
            logits[ids] = chosen - counts * params.frequency_penalty - params.presence_penalty
        token = int(np.argmax(logits)) if params.greedy else self._draw(logits)
        self._history.append(token)
        return token

    def _draw(self, logits: np.ndarray) -> int:
        params = self.params
        if 0 < params.top_k < logits.size:
            kth = np.partition(logits, -params.top_k)[-params.top_k]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if params.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            ranked = probs[order]
            drop = np.cumsum(ranked) - ranked > params.top_p
            ranked[drop] = 0.0
            probs = np.zeros_like(probs)
            probs[order] = ranked
        if params.min_p > 0.0:
            probs = np.where(probs < probs.max() * params.min_p, 0.0, probs)
        with np.errstate(divide="ignore"):
            scaled = np.log(probs) / params.temperature
        final = np.exp(scaled - scaled.max())
        final /= final.sum()
        return int(self._rng.choice(final.size, p=final))

    def close(self) -> None:
        return None
