"""The worker process of one job: ``python -m llmos.jobs.worker JOB_ID``.

Contract: started by :meth:`llmos.jobs.service.JobService.dispatch` with stdout/stderr going to the job's log. It runs
the handler of the job's kind (:data:`llmos.jobs.kinds.HANDLERS`) with a :class:`JobContext`, then records the final
state: ``succeeded`` with the handler's result, ``cancelled`` when a cancellation stopped it, ``failed`` with a
one-line message otherwise (the traceback goes to the log only). SIGTERM asks the handler to stop at its next
progress report. When it ends it dispatches the queue, so the next queued job starts without a server. Log records
(warnings and up) go to the job's log as text lines carrying the job id.

While the handler runs, a thread refreshes the job's heartbeat every third of ``job_lease_seconds``; when the
refresh finds the job is no longer this attempt's (another front end took it over after missing heartbeats), the
process exits at once (status 75) without recording anything. Final states are recorded for this attempt only.

Intermediate files stay private: the worker process runs with umask 077 (what it writes is 0600 / 0700), and a
handler's :attr:`~llmos.jobs.context.JobContext.checkpoints` are encrypted with the store's key when one is
configured. When the job succeeds its checkpoints are removed, unless its params say ``keep_checkpoints`` (kept ones
stay encrypted).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from types import FrameType

from llmos.config import Settings
from llmos.errors import LlmosError
from llmos.jobs.context import JobCancelled, JobContext, StoreCipher
from llmos.jobs.service import JobService
from llmos.training.checkpoints import Checkpoints

__all__ = ["JobCancelled", "JobContext", "StoreCipher", "run"]


def run(job_id: str, settings: Settings | None = None) -> int:
    settings = settings or Settings()
    jobs = JobService(settings)
    try:
        job = jobs.get(job_id)
        if job.state != "running":
            print(f"job {job_id} is {job.state}; nothing to do", flush=True)
            return 0
        # first thing: the heartbeat (importing the handlers loads torch, which takes seconds on a busy machine)
        _keep_heartbeat(jobs, job_id, job.attempts, settings.job_lease_seconds / 3)
        from llmos.jobs.kinds import HANDLERS

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
            jobs.finish(job_id, "cancelled", attempt=job.attempts)
            return 0
        except LlmosError as exc:
            context.log(f"failed: {exc}")
            jobs.finish(job_id, "failed", error=str(exc), result=getattr(exc, "result", None), attempt=job.attempts)
            return 1
        except Exception as exc:
            traceback.print_exc()
            jobs.finish(job_id, "failed", error=f"{type(exc).__name__}: {exc}", attempt=job.attempts)
            return 1
        context.log(f"succeeded: {result}")
        jobs.finish(job_id, "succeeded", result=result, attempt=job.attempts)
        if not job.params.get("keep_checkpoints"):  # after finishing: a crash in between leaves them (encrypted)
            Checkpoints(context.checkpoint_dir).remove()
        return 0
    finally:
        try:
            jobs.dispatch()
        finally:
            jobs.close()


TAKEN_OVER_EXIT = 75


def _keep_heartbeat(jobs: JobService, job_id: str, attempt: int, every: float) -> None:
    """Refresh the heartbeat in the background; exit the process if the job was taken over (fencing)."""

    def beat() -> None:
        failures = 0
        while True:
            time.sleep(every)
            try:
                ours = jobs.heartbeat(job_id, attempt)
                failures = 0
            except Exception as exc:  # the database is unreachable: keep working, the lease decides
                failures += 1
                print(f"heartbeat failed ({failures}): {type(exc).__name__}", flush=True)
                continue
            if not ours:
                state = jobs.get(job_id).state
                if state == "running" or state == "queued":  # another attempt owns it now
                    print(f"job {job_id} attempt {attempt} was taken over by another front end; stopping", flush=True)
                    os._exit(TAKEN_OVER_EXIT)
                return  # ended normally (this attempt's final state is being written)

    threading.Thread(target=beat, name="llmos-job-heartbeat", daemon=True).start()


if __name__ == "__main__":
    from llmos.observability.context import bind_process
    from llmos.observability.logs import configure_logging

    os.umask(0o077)  # everything the job writes (outputs, logs of its libraries) is private to this user
    bind_process(job_id=sys.argv[1])  # log records in the job's log name their job
    configure_logging("warning", json=False)  # job.log is read by people (CLI, console): text, warnings and up
    sys.exit(run(sys.argv[1]))
