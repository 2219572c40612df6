"""What a job's handler gets: its job, its directories, progress reporting, cancellation and its checkpoints.

Contract: :class:`JobContext` is handed to each handler by the worker (:mod:`llmos.jobs.worker`); a handler raises
:class:`JobCancelled` when :meth:`JobContext.progress` says the job should stop. Handlers import this module, never
the worker, so the worker can import the handlers without a loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmos.config import Settings
from llmos.jobs.service import JobService, JobView
from llmos.store.crypto import BlobCipher
from llmos.training.checkpoints import Checkpoints


class JobCancelled(Exception):
    pass


class StoreCipher:
    """The registry's cipher for a home, rebuilt on call; picklable (it carries the settings, as a Ray worker's
    :class:`~llmos.jobs.train.RemoteJobReporter` does), so encrypted checkpoints can be reopened in another process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def __call__(self) -> BlobCipher | None:
        from llmos.registry.service import Registry

        registry = Registry(self.settings, maintain=False)
        try:
            return registry.blobs.cipher
        finally:
            registry.close()


@dataclass
class JobContext:
    """What a handler may use: its job, its directories, progress reporting and cancellation."""

    jobs: JobService
    job: JobView
    settings: Settings
    stop_requested: bool = False
    _last_report: float = 0.0
    _started: float = field(default_factory=time.monotonic)
    _first_step: int | None = None

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def params(self) -> dict[str, Any]:
        return self.job.params

    @property
    def directory(self) -> Path:
        return self.jobs.job_dir(self.job.id)

    @property
    def checkpoint_dir(self) -> Path:
        return self.jobs.checkpoint_dir(self.job.id)

    @property
    def checkpoints(self) -> Checkpoints:
        """The job's checkpoints: private files, encrypted with the store's key whenever one is configured."""
        source = StoreCipher(self.settings)
        cipher = source()
        return Checkpoints(self.checkpoint_dir, cipher, reopen=source if cipher is not None else None)

    def log(self, message: str) -> None:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}", flush=True)

    def progress(self, step: int, total: int, metrics: dict[str, float]) -> bool:
        """Record a step (always appended to the loss curve; the database at most once a second, and at the end).

        Returns True when the job should stop (cancellation requested).
        """
        now = time.monotonic()
        if self._first_step is None:
            self._first_step, self._started = step - 1, now
        done = step - self._first_step
        rate = done / (now - self._started) if now > self._started else 0.0
        eta = (total - step) / rate if rate > 0 else None
        progress = {"step": step, "total": total, "eta_seconds": eta, "metrics": metrics}
        self.jobs.record_metrics(self.job.id, {"step": step, "time": time.time(), **metrics})
        if now - self._last_report >= 1.0 or step >= total or "val_loss" in metrics:
            self._last_report = now
            self.stop_requested = self.jobs.report(self.job.id, progress) or self.stop_requested
        if step % 10 == 0 or step >= total:
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float | int))
            self.log(f"step {step}/{total} {shown}")
        return self.stop_requested
