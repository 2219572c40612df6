"""Prompt-lookup (n-gram) drafting for speculative decoding.

Contract: a :class:`NgramDrafter` follows one sequence's tokens (prompt, then every accepted token) and proposes
up to ``k`` draft tokens: the tokens that followed the most recent earlier occurrence of the sequence's last n-gram
(the longest of 4, 3, 2 tokens that occurred before). No second model: it pays when the answer copies from the
prompt or from itself (quoting, editing, extraction, code, RAG answers). The engine verifies drafts in one batched
step and keeps only the tokens the model itself would have chosen, so greedy output is unchanged.

:class:`DraftLength` adapts how many tokens to draft from the acceptance seen so far: it grows after fully
accepted drafts, shrinks to what was accepted, and after repeated misses pauses drafting for a while (a rejected
draft costs a wider step for nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

NGRAM_SIZES = (4, 3, 2)


@dataclass
class NgramDrafter:
    tokens: list[int] = field(default_factory=list)
    _index: dict[tuple[int, ...], int] = field(default_factory=dict)
    """n-gram -> position of the token that followed its most recent occurrence."""

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            position = len(self.tokens)
            for n in NGRAM_SIZES:
                if position >= n:
                    self._index[tuple(self.tokens[position - n : position])] = position
            self.tokens.append(token)

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the last n-gram's previous occurrence (empty: no match)."""
        if k <= 0:
            return []
        for n in NGRAM_SIZES:
            if len(self.tokens) <= n:
                continue
            follows = self._index.get(tuple(self.tokens[-n:]))
            if follows is not None:
                return self.tokens[follows : follows + k]
        return []


@dataclass
class DraftLength:
    maximum: int
    current: int = 4
    misses: int = 0
    paused_until: int = 0
    """Do not draft before this many tokens were generated."""

    def wanted(self, generated: int) -> int:
        if generated < self.paused_until:
            return 0
        return min(self.current, self.maximum)

    def record(self, drafted: int, accepted: int, generated: int) -> None:
        if drafted == 0:
            return
        if accepted == drafted:
            self.current = min(self.maximum, self.current + 2)
            self.misses = 0
        elif accepted == 0:
            self.misses += 1
            self.current = max(1, self.current // 2)
            if self.misses >= 2:
                self.paused_until = generated + 8 * self.misses
        else:
            self.current = max(1, accepted + 1)
            self.misses = 0
