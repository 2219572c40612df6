"""What became of model processes that died: the record behind ``/admin/runtime``, ``/ready``, ``/metrics`` and the
restart back-off.

Contract: :meth:`FailureLog.record` keeps a :class:`ModelFailure` (the last few per model) and tells the listener
(metrics); :meth:`FailureLog.restarted` counts a restart. :meth:`FailureLog.backoff` is how long a model must wait
before its next restart: nothing for its first :data:`FREE_RESTARTS` crashes in a row, then 1, 2, 4 ... up to
:data:`MAX_BACKOFF_SECONDS` seconds. A crash counts as "in a row" when the process it ended lived less than
:data:`STABLE_SECONDS`; a longer life starts the count again.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

FREE_RESTARTS = 3
MAX_BACKOFF_SECONDS = 60.0
STABLE_SECONDS = 60.0
KEPT_PER_MODEL = 5


@dataclass
class ModelFailure:
    model: str
    pid: int
    reason: str
    """In words: ``killed by SIGSEGV``, ``exited with code 1``, ``stopped answering for 30 s and was killed``."""
    signal: str | None
    exit_code: int | None
    log_tail: list[str]
    lived_seconds: float
    recovered: str | None = None
    """Set when the failure was handled without failing requests (the safe-path restart): how."""
    at: float = field(default_factory=time.time)
    monotonic: float = field(default_factory=time.monotonic)

    def public(self) -> dict[str, Any]:
        """What an unauthenticated probe may show: no log lines."""
        return {"model": self.model, "reason": self.reason, "signal": self.signal, "exit_code": self.exit_code,
                "at": self.at}  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("monotonic")
        return data


class FailureLog:
    def __init__(self, listener: Callable[[ModelFailure], None] | None = None) -> None:
        self.listener = listener
        self.restart_listener: Callable[[str], None] | None = None
        self._lock = threading.Lock()
        self._failures: dict[str, collections.deque[ModelFailure]] = {}
        self._streak: dict[str, int] = {}
        self.restarts: dict[str, int] = {}

    def record(self, failure: ModelFailure) -> None:
        with self._lock:
            kept = self._failures.setdefault(failure.model, collections.deque(maxlen=KEPT_PER_MODEL))
            kept.append(failure)
            if failure.recovered is None:
                quick = failure.lived_seconds < STABLE_SECONDS
                self._streak[failure.model] = self._streak.get(failure.model, 0) + 1 if quick else 1
        if self.listener is not None:
            self.listener(failure)

    def restarted(self, model: str) -> None:
        with self._lock:
            self.restarts[model] = self.restarts.get(model, 0) + 1
        if self.restart_listener is not None:
            self.restart_listener(model)

    def backoff(self, model: str) -> float:
        """Seconds until ``model`` may be started again (0: now)."""
        with self._lock:
            streak = self._streak.get(model, 0)
            kept = self._failures.get(model)
            if streak <= FREE_RESTARTS or not kept:
                return 0.0
            delay = min(2.0 ** (streak - FREE_RESTARTS - 1), MAX_BACKOFF_SECONDS)
            return max(0.0, kept[-1].monotonic + delay - time.monotonic())

    def last(self, model: str) -> ModelFailure | None:
        with self._lock:
            kept = self._failures.get(model)
            return kept[-1] if kept else None

    def recent(self) -> list[ModelFailure]:
        """Every kept failure, oldest first."""
        with self._lock:
            failures = [f for kept in self._failures.values() for f in kept]
        return sorted(failures, key=lambda f: f.at)
