"""The worker process of one job: ``python -m llmos.jobs.worker JOB_ID``.

Contract: started by :meth:`llmos.jobs.service.JobService.dispatch` with stdout/stderr going to the job's log. It runs
the handler of the job's kind (:data:`llmos.jobs.kinds.HANDLERS`) with a :class:`JobContext`, then records the final
state: ``succeeded`` with the handler's result, ``cancelled`` when a cancellation stopped it, ``failed`` with a
one-line message otherwise (the traceback goes to the log only). SIGTERM asks the handler to stop at its next
progress report. When it ends it dispatches the queue, so the next queued job starts without a server. Log records
(warnings and up) go to the job's log as text lines carrying the job id.

Intermediate files stay private: the worker process runs with umask 077 (what it writes is 0600 / 0700), and a
handler's :attr:`JobContext.checkpoints` are encrypted with the store's key when one is configured. When the job
succeeds its checkpoints are removed, unless its params say ``keep_checkpoints`` (kept ones stay encrypted).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from llmos.config import Settings
from llmos.errors import LlmosError
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


def run(job_id: str, settings: Settings | None = None) -> int:
    from llmos.jobs.kinds import HANDLERS

    settings = settings or Settings()
    jobs = JobService(settings)
    try:
        job = jobs.get(job_id)
        if job.state != "running":
            print(f"job {job_id} is {job.state}; nothing to do", flush=True)
            return 0
        context = JobContext(jobs, job, settings)

        def on_term(_signum: int, _frame: FrameType | None) -> None:
            context.stop_requested = True

        signal.signal(signal.SIGTERM, on_term)
        handler = HANDLERS.get(job.kind)
        context.log(f"job {job_id} ({job.kind}) attempt {job.attempts} started")
        try:
            if handler is None:
                raise LlmosError(f"unknown job kind {job.kind!r}")
            result = handler(context)
        except JobCancelled:
            context.log("cancelled")
            jobs.finish(job_id, "cancelled")
            return 0
        except LlmosError as exc:
            context.log(f"failed: {exc}")
            jobs.finish(job_id, "failed", error=str(exc), result=getattr(exc, "result", None))
            return 1
        except Exception as exc:
            traceback.print_exc()
            jobs.finish(job_id, "failed", error=f"{type(exc).__name__}: {exc}")
            return 1
        context.log(f"succeeded: {result}")
        jobs.finish(job_id, "succeeded", result=result)
        if not job.params.get("keep_checkpoints"):  # after finishing: a crash in between leaves them (encrypted)
            Checkpoints(context.checkpoint_dir).remove()
        return 0
    finally:
        try:
            jobs.dispatch()
        finally:
            jobs.close()


if __name__ == "__main__":
    # run the module under its real name, so handlers that import JobCancelled from it raise the class caught here
    from llmos.jobs import worker
    from llmos.observability.context import bind_process
    from llmos.observability.logs import configure_logging

    os.umask(0o077)  # everything the job writes (outputs, logs of its libraries) is private to this user
    bind_process(job_id=sys.argv[1])  # log records in the job's log name their job
    configure_logging("warning", json=False)  # job.log is read by people (CLI, console): text, warnings and up
    sys.exit(worker.run(sys.argv[1]))
