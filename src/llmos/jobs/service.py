"""The durable job queue: create, list, cancel and resume jobs; start queued ones as worker subprocesses.

Contract:

* A job is a row in the ``jobs`` table plus a directory ``<home>/jobs/<id>/`` holding ``job.log`` (the worker's
  output), ``metrics.jsonl`` (one JSON object per reported step: the loss curve) and ``checkpoints/``. Paths are
  derived from the id, which is generated here (never taken from input). The directory is 0700, its files 0600.
* :meth:`JobService.dispatch` first *reconciles* (a ``running`` job whose worker process is gone becomes
  ``interrupted``; with ``auto_resume`` it is queued again), then starts queued jobs oldest first while their
  resource has a free slot (``train``: ``LLMOS_TRAIN_JOB_SLOTS``, default 1; anything else: 2). It runs under a file
  lock, so several processes (server, CLI, finishing workers) may call it at any time; a job is never started twice.
  Workers run ``python -m llmos.jobs.worker ID`` with an argument list (no shell) in a new session.
* A worker process is identified by its PID *and* its start time (``/proc/<pid>/stat``), so a reused PID is not
  mistaken for a live worker, and a zombie counts as gone.
* Cancelling a queued job cancels it at once; a running one is asked to stop (flag in the database + SIGTERM) and
  becomes ``cancelled`` when its worker notices (within one training step).
* Visibility: a caller with a tenant sees only that tenant's jobs; another tenant's job is "not found".
* **Several front ends on one database** (PostgreSQL, or one SQLite file): a job is claimed with one conditional
  ``UPDATE`` (``queued`` -> ``running`` only if still queued), so exactly one front end starts it, and its row names
  the *runner*: the llmos home whose machine runs the worker (:func:`runner_id`). Slots count that runner's jobs only.
  PIDs are checked only by the runner itself; a job run elsewhere is alive while its worker refreshes
  ``heartbeat_at`` (every third of ``job_lease_seconds``). When the heartbeat is older than the lease, the runner
  is taken to be dead and another front end takes the job over: a resumable job is queued again (and restarts from
  the checkpoints that front end holds, else from the start), any other becomes ``interrupted``. Every state change
  of a running job is conditional on its attempt number, and a worker whose heartbeat finds the job taken over
  stops at once without writing anything (fencing), so two workers never finish one job.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from llmos.config import Settings
from llmos.errors import ConflictError, InvalidInputError, NotFoundError
from llmos.store.db import open_database, rows_matched, session_factory
from llmos.store.schema import Job, as_utc, utcnow

STATES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
FINAL = {"succeeded", "failed", "cancelled"}
RESUMABLE_FROM = {"interrupted", "failed", "cancelled"}
START_GRACE = timedelta(seconds=60)
"""A ``running`` job whose worker PID was never recorded is considered lost after this long."""


RUNNER_FILE = "runner-id"


def runner_id(home: Path) -> str:
    """This llmos home's identity as a job runner: random, created once (``<home>/runner-id``)."""
    path = home / RUNNER_FILE
    with contextlib.suppress(OSError):
        value = path.read_text().strip()
        if len(value) == 32:
            return value
    home.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{RUNNER_FILE}.{os.getpid()}.tmp")
    tmp.write_text(secrets.token_hex(16))
    with contextlib.suppress(FileExistsError, OSError):
        os.link(tmp, path)  # the first writer wins; a concurrent one reads the winner's id
    tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def process_start_ticks(pid: int) -> int | None:
    """The start time of a live (non-zombie) process in clock ticks since boot, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


@dataclass
class JobView:
    id: str
    kind: str
    state: str
    tenant_id: int | None
    created_by: str
    resource: str
    params: dict[str, Any]
    progress: dict[str, Any]
    result: dict[str, Any]
    error: str | None
    resumable: bool
    auto_resume: bool
    attempts: int
    pid: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    runner: str | None = None
    """The llmos home (runner id) that runs or last ran it."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("created_at", "started_at", "finished_at", "updated_at"):
            value = data[key]
            data[key] = value.isoformat() if value is not None else None
        return data


def _view(job: Job) -> JobView:
    return JobView(
        id=job.id,
        kind=job.kind,
        state=job.state,
        tenant_id=job.tenant_id,
        created_by=job.created_by,
        resource=job.resource,
        params=dict(job.params or {}),
        progress=dict(job.progress or {}),
        result=dict(job.result or {}),
        error=job.error,
        resumable=job.resumable,
        auto_resume=job.auto_resume,
        attempts=job.attempts,
        pid=job.pid,
        created_at=as_utc(job.created_at) or utcnow(),
        started_at=as_utc(job.started_at),
        finished_at=as_utc(job.finished_at),
        updated_at=as_utc(job.updated_at) or utcnow(),
        runner=job.runner,
    )


class JobService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.home / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.engine = open_database(settings.effective_database_url(), settings.home, settings.db_busy_timeout_ms)
        self.session = session_factory(self.engine)
        self.runner = runner_id(settings.home)
        self._children: list[subprocess.Popen[bytes]] = []

    def close(self) -> None:
        self.engine.dispose()

    # --- paths ---------------------------------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        if not job_id.isalnum():
            raise NotFoundError(f"job {job_id!r} not found")
        return self.root / job_id

    def log_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "job.log"

    def metrics_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "metrics.jsonl"

    def checkpoint_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "checkpoints"

    # --- queue ---------------------------------------------------------------------------------------------------

    def create(
        self,
        kind: str,
        params: dict[str, Any],
        *,
        tenant_id: int | None = None,
        created_by: str = "local",
        resource: str = "default",
        resumable: bool = True,
        auto_resume: bool = False,
    ) -> JobView:
        job_id = "j" + secrets.token_hex(6)
        now = utcnow()
        job = Job(
            id=job_id,
            kind=kind,
            tenant_id=tenant_id,
            created_by=created_by,
            state="queued",
            resource=resource,
            params=params,
            progress={},
            result={},
            resumable=resumable,
            auto_resume=auto_resume,
            cancel_requested=False,
            attempts=0,
            created_at=now,
            updated_at=now,
        )
        self.job_dir(job_id).mkdir(mode=0o700, parents=True, exist_ok=True)  # its files are the tenant's
        with self.session() as session, session.begin():
            session.add(job)
        return _view(job)

    def _find(self, session: Session, job_id: str, tenant_id: int | None) -> Job:
        job = session.get(Job, job_id)
        if job is None or (tenant_id is not None and job.tenant_id != tenant_id):
            raise NotFoundError(f"job {job_id!r} not found; `llmos jobs list` shows the jobs you can see")
        return job

    def get(self, job_id: str, *, tenant_id: int | None = None) -> JobView:
        with self.session() as session:
            return _view(self._find(session, job_id, tenant_id))

    def list_jobs(self, *, tenant_id: int | None = None, state: str | None = None, limit: int = 100) -> list[JobView]:
        if state is not None and state not in STATES:
            raise InvalidInputError(f"unknown job state {state!r}; states are {', '.join(STATES)}", param="state")
        with self.session() as session:
            query = select(Job).order_by(Job.created_at.desc()).limit(max(1, min(limit, 1000)))
            if tenant_id is not None:
                query = query.where(Job.tenant_id == tenant_id)
            if state is not None:
                query = query.where(Job.state == state)
            return [_view(job) for job in session.scalars(query)]

    def cancel(self, job_id: str, *, tenant_id: int | None = None) -> JobView:
        with self.session() as session, session.begin():
            job = self._find(session, job_id, tenant_id)
            if job.state in FINAL or job.state == "interrupted":
                raise ConflictError(f"job {job_id} is already {job.state}")
            if job.state == "queued":
                job.state = "cancelled"
                job.finished_at = utcnow()
            else:
                job.cancel_requested = True
            job.updated_at = utcnow()
            pid, started = job.pid, job.pid_started
        if pid is not None and started is not None and process_start_ticks(pid) == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        return self.get(job_id)

    def resume(self, job_id: str, *, tenant_id: int | None = None) -> JobView:
        """Queue an interrupted, failed or cancelled job again; its worker continues from the last checkpoint."""
        self.reconcile()
        with self.session() as session, session.begin():
            job = self._find(session, job_id, tenant_id)
            if job.state not in RESUMABLE_FROM:
                raise ConflictError(f"job {job_id} is {job.state}; only interrupted, failed or cancelled jobs resume")
            if not job.resumable:
                raise ConflictError(f"job {job_id} ({job.kind}) cannot be resumed")
            job.state = "queued"
            job.error = None
            job.cancel_requested = False
            job.finished_at = None
            job.updated_at = utcnow()
        self.dispatch()
        return self.get(job_id)

    # --- worker side ---------------------------------------------------------------------------------------------

    def record_metrics(self, job_id: str, record: dict[str, Any]) -> None:
        """Append one step's metrics to the job's loss curve."""
        fd = os.open(self.metrics_path(job_id), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def report(self, job_id: str, progress: dict[str, Any]) -> bool:
        """Store progress; returns True if cancellation was requested (or the job is gone)."""
        with self.session() as session, session.begin():
            job = session.get(Job, job_id)
            if job is None:
                return True
            job.progress = progress
            job.updated_at = utcnow()
            return bool(job.cancel_requested)

    def heartbeat(self, job_id: str, attempt: int) -> bool:
        """The worker of ``attempt`` is alive; False when the job is no longer that attempt's (taken over, ended)."""
        with self.session() as session, session.begin():
            refreshed = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == "running", Job.attempts == attempt, Job.runner == self.runner)
                .values(heartbeat_at=utcnow())
            )
            return bool(rows_matched(refreshed) == 1)

    def finish(
        self,
        job_id: str,
        state: str,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        attempt: int | None = None,
    ) -> None:
        """Record the end of a job (of ``attempt`` only, when given: a taken-over attempt writes nothing)."""
        with self.session() as session, session.begin():
            job = session.get(Job, job_id)
            if job is None or (attempt is not None and (job.attempts != attempt or job.state != "running")):
                return
            job.state = state
            job.result = result or dict(job.result or {})
            job.error = error
            job.finished_at = utcnow()
            job.updated_at = utcnow()
            job.pid = None
            job.pid_started = None

    def gauges(self) -> tuple[list[tuple[str, str, int]], list[tuple[str, str, float]]]:
        """For ``/metrics``: job counts by (kind, state), and (id, kind, last loss) of each running job.

        One grouped count and one indexed query; the loss is the one in the last progress report (at most 1 s old).
        """
        with self.session() as session:
            counts = session.execute(select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state))
            states = [(str(kind), str(state), int(count)) for kind, state, count in counts]
            running = session.execute(select(Job.id, Job.kind, Job.progress).where(Job.state == "running"))
            losses = []
            for job_id, kind, progress in running:
                reported = (progress or {}).get("metrics")
                loss = reported.get("loss") if isinstance(reported, dict) else None
                if isinstance(loss, int | float) and not isinstance(loss, bool) and loss == loss:
                    losses.append((str(job_id), str(kind), float(loss)))
        return states, losses

    def metrics(self, job_id: str, *, tenant_id: int | None = None) -> list[dict[str, Any]]:
        self.get(job_id, tenant_id=tenant_id)
        path = self.metrics_path(job_id)
        if not path.exists():
            return []
        records = []
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
        return records

    # --- scheduling ----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        fd = os.open(self.root / "dispatch.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _alive(self, job: Job, now: datetime) -> bool:
        if job.runner not in (None, self.runner):  # run on another machine: only its heartbeat tells
            seen = as_utc(job.heartbeat_at) or as_utc(job.started_at) or now
            return seen > now - timedelta(seconds=self.settings.job_lease_seconds)
        if job.pid is not None:
            return job.pid_started is not None and process_start_ticks(job.pid) == job.pid_started
        return (as_utc(job.started_at) or now) > now - START_GRACE

    def reconcile(self) -> list[str]:
        """Mark running jobs whose worker is gone as interrupted (queued again with auto-resume, or when their runner
        was another front end that stopped heartbeating: a takeover); returns their ids."""
        self._reap()
        lost = []
        now = utcnow()
        with self._lock(), self.session() as session, session.begin():
            for job in list(session.scalars(select(Job).where(Job.state == "running"))):
                if self._alive(job, now):
                    continue
                remote = job.runner not in (None, self.runner)
                values: dict[str, Any] = {"pid": None, "pid_started": None, "updated_at": now}
                if job.cancel_requested:
                    values.update(state="cancelled", finished_at=now)
                elif job.resumable and (job.auto_resume or remote):
                    values.update(state="queued")
                else:
                    values.update(
                        state="interrupted",
                        error="the worker process ended without finishing (killed or crashed); `llmos jobs resume`",
                    )
                changed = session.execute(  # only if nobody (another front end) changed it since it was read
                    update(Job)
                    .where(Job.id == job.id, Job.state == "running", Job.attempts == job.attempts)
                    .values(**values)
                    .execution_options(synchronize_session=False)
                )
                if rows_matched(changed) == 1:
                    lost.append(job.id)
        return lost

    def slots(self, resource: str) -> int:
        return self.settings.train_job_slots if resource == "train" else 2

    def dispatch(self) -> list[str]:
        """Reconcile, then start every queued job whose resource has a free slot; returns the started ids."""
        self.reconcile()
        started = []
        with self._lock():
            with self.session() as session:
                running: dict[str, int] = {}  # slots are this machine's: count the jobs it runs
                for job in session.scalars(select(Job).where(Job.state == "running")):
                    if job.runner in (None, self.runner):
                        running[job.resource] = running.get(job.resource, 0) + 1
                queued = list(session.scalars(select(Job).where(Job.state == "queued").order_by(Job.created_at)))
            for job in queued:
                if running.get(job.resource, 0) >= self.slots(job.resource):
                    continue
                if self._start(job.id):
                    running[job.resource] = running.get(job.resource, 0) + 1
                    started.append(job.id)
        return started

    def _start(self, job_id: str) -> bool:
        now = utcnow()
        with self.session() as session, session.begin():
            claimed = session.execute(  # one conditional update: exactly one front end claims a queued job
                update(Job)
                .where(Job.id == job_id, Job.state == "queued")
                .values(
                    state="running",
                    attempts=Job.attempts + 1,
                    started_at=now,
                    updated_at=now,
                    heartbeat_at=now,
                    runner=self.runner,
                    pid=None,
                    pid_started=None,
                )
                .execution_options(synchronize_session=False)
            )
            if rows_matched(claimed) != 1:
                return False
        self.job_dir(job_id).mkdir(mode=0o700, parents=True, exist_ok=True)  # created elsewhere when taken over
        log = os.fdopen(os.open(self.log_path(job_id), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
        env = {**os.environ, "LLMOS_HOME": str(self.settings.home)}
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "llmos.jobs.worker", job_id],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            self.finish(job_id, "failed", error=f"could not start the worker: {exc.strerror}")
            return True
        finally:
            log.close()
        self._children.append(process)
        with self.session() as session, session.begin():
            job = session.get(Job, job_id)
            if job is not None and job.state == "running" and job.pid is None:
                job.pid = process.pid
                job.pid_started = process_start_ticks(process.pid)
        return True

    def _reap(self) -> None:
        """Collect exited workers started by this process (no zombies in a long-running server)."""
        self._children = [child for child in self._children if child.poll() is None]
