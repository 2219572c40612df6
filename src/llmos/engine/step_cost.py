"""How many tokens fit in one forward pass of a given duration on this machine, learned from the steps run.

Contract: :class:`StepBudget` holds a step-time target and a running estimate of the tokens (decode and prompt
alike) a step may carry to last about that long. Each finished step reports ``(tokens, seconds)``; the estimate
moves toward ``tokens * target / seconds`` (an exponential moving average). :attr:`StepBudget.tokens` is None until
the first report, so a fresh engine is never throttled on a guess.

Why the update converges although a step also has a fixed cost: if a step of ``n`` tokens takes ``a + b*n``
seconds, the update maps ``n`` to ``n * target / (a + b*n)``, whose fixed point is exactly the ``n`` with
``a + b*n == target`` and which contracts toward it (its slope there is ``a / target < 1``). The scheduler runs
steps of the estimated size, so the estimate corrects itself from its own steps.

Why at all: on a CPU a step's time grows about linearly with the tokens in it, so a step that prefills a few hundred
prompt tokens beside the running decodes takes half a second or more. Every stream in the batch stalls that long,
and a request that arrives meanwhile (another tenant's, say) waits for it before its own prompt can start. Keeping
steps near a target (the idea of stall-free, budgeted chunked prefill) bounds both.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepBudget:
    target_seconds: float
    smoothing: float = 0.3
    """Weight of the newest step in the moving average."""
    tokens: float | None = None
    """Tokens a step may carry to last about ``target_seconds``; None until a step was reported."""

    def observe(self, tokens: int, seconds: float) -> None:
        if self.target_seconds <= 0 or tokens <= 0 or seconds <= 0:
            return
        fits = tokens * self.target_seconds / seconds
        self.tokens = fits if self.tokens is None else self.tokens + self.smoothing * (fits - self.tokens)

    def capacity(self) -> int | None:
        """Whole tokens per step (at least 1), or None while unknown or without a target."""
        if self.target_seconds <= 0 or self.tokens is None:
            return None
        return max(int(self.tokens), 1)
