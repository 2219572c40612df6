"""Turning a stream of token bytes into a stream of text, and stopping on stop strings.

Contract:

* :class:`IncrementalDecoder` accepts the byte pieces of tokens one at a time and returns only complete UTF-8 text,
  holding back a multi-byte character split across tokens until it is whole. Invalid bytes become U+FFFD.
* :class:`StopMatcher` accepts text deltas and returns the part that is safe to emit: text that could still turn
  out to be the beginning of a stop string is held back, and when a stop string appears, everything from it on is
  dropped and ``stopped`` becomes true. A stop string is therefore never split across emitted chunks and never
  emitted itself.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class IncrementalDecoder:
    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, piece: bytes) -> str:
        return self._decoder.decode(piece, final=False)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def feed(self, delta: str) -> str:
        """Add ``delta``; return the text that can be emitted now."""
        if self.stopped:
            return ""
        text = self._held + delta
        if not self.stops:
            self._held = ""
            return text
        first_hit: tuple[int, str] | None = None
        for stop in self.stops:
            index = text.find(stop)
            if index != -1 and (first_hit is None or index < first_hit[0]):
                first_hit = (index, stop)
        if first_hit is not None:
            self.stopped = True
            self.matched = first_hit[1]
            self._held = ""
            return text[: first_hit[0]]
        keep = self._longest_partial(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """End of generation: release whatever was held back."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_partial(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:length]):
                    best = length
                    break
        return best
