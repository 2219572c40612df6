"""``llmos jobs``: follow and control the job queue (training, evaluation, pipelines) from the command line.

Contract: thin adapters over :mod:`llmos.jobs.service`. :func:`open_jobs` and :func:`follow_log` are shared with the
commands that queue jobs (``llmos train``, ``llmos eval``, ``llmos pipeline``).
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llmos.cli.common import JsonOption, app, err, out, print_json, record, settings

jobs_app = typer.Typer(help="Follow and control long-running jobs (training, ...).", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


def open_jobs() -> Any:
    from llmos.jobs.service import JobService

    return JobService(settings())


def _job_row(job: Any) -> list[str]:
    progress = job.progress or {}
    step = f"{progress.get('step', 0)}/{progress.get('total', '?')}" if progress else "-"
    metrics = progress.get("metrics") or {}
    loss = f"{metrics['loss']:.4f}" if isinstance(metrics.get("loss"), float) else "-"
    eta = progress.get("eta_seconds")
    eta_text = f"{eta:.0f}s" if isinstance(eta, float | int) and job.state == "running" else "-"
    result = job.result.get("model") or (job.error or "")[:60] or "-"
    return [job.id, job.kind, job.state, step, loss, eta_text, job.created_at.strftime("%Y-%m-%d %H:%M"), result]


@jobs_app.command("list")
def jobs_list(
    state_filter: Annotated[str | None, typer.Option("--state", help="Only jobs in this state.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List jobs, newest first (running jobs whose process is gone are marked interrupted first)."""
    jobs = open_jobs()
    jobs.reconcile()
    views = jobs.list_jobs(state=state_filter)
    if as_json:
        print_json([v.to_dict() for v in views])
        return
    table = Table(box=None, header_style="bold")
    for column in ("ID", "KIND", "STATE", "STEP", "LOSS", "ETA", "CREATED", "RESULT"):
        table.add_column(column)
    for view in views:
        table.add_row(*(escape(c) for c in _job_row(view)))
    out.print(table)


@jobs_app.command("show")
def jobs_show(job_id: Annotated[str, typer.Argument(help="Job id.")], as_json: JsonOption = False) -> None:
    """Show a job: state, parameters, progress, result or error."""
    jobs = open_jobs()
    jobs.reconcile()
    view = jobs.get(job_id)
    data = view.to_dict()
    if as_json:
        data["loss_curve"] = jobs.metrics(job_id)
        print_json(data)
        return
    for key in ("id", "kind", "state", "attempts", "created_at", "started_at", "finished_at", "error"):
        out.print(f"{key:>12}: {escape(str(data[key]))}")
    out.print(f"{'params':>12}: {escape(json.dumps(data['params']))}")
    out.print(f"{'progress':>12}: {escape(json.dumps(data['progress']))}")
    out.print(f"{'result':>12}: {escape(json.dumps(data['result']))}")


@jobs_app.command("logs")
def jobs_logs(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
) -> None:
    """Print a job's log (with -f, follow it until the job ends)."""
    jobs = open_jobs()
    jobs.get(job_id)
    follow_log(jobs, job_id, follow)


def follow_log(jobs: Any, job_id: str, follow: bool, console: Console = out) -> Any:
    """Print the job's log (to ``console``); with ``follow``, as it grows until the job ends. Returns the job's view
    (its final one when following)."""
    path = jobs.log_path(job_id)
    position = 0
    while True:
        if path.exists():
            with path.open("rb") as handle:
                handle.seek(position)
                chunk = handle.read()
                position += len(chunk)
            if chunk:
                console.print(escape(chunk.decode("utf-8", "replace")), end="", highlight=False)
        if not follow:
            return jobs.get(job_id)
        jobs.reconcile()
        view = jobs.get(job_id)
        if view.state not in ("queued", "running"):
            if path.exists() and path.stat().st_size > position:
                continue
            return view
        time.sleep(0.5)


@jobs_app.command("cancel")
def jobs_cancel(job_id: Annotated[str, typer.Argument(help="Job id.")]) -> None:
    """Cancel a queued job, or ask a running one to stop (it stops at its next step)."""
    view = open_jobs().cancel(job_id)
    record("jobs.cancel", job_id)
    err.print(f"{job_id}: {view.state}" + (" (stop requested)" if view.state == "running" else ""))


@jobs_app.command("resume")
def jobs_resume(job_id: Annotated[str, typer.Argument(help="Job id.")]) -> None:
    """Queue an interrupted, failed or cancelled job again; it continues from its last checkpoint."""
    view = open_jobs().resume(job_id)
    record("jobs.resume", job_id)
    err.print(f"{job_id}: {view.state}")
