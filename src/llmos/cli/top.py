"""``llmos top``: a live terminal view of a running llmos server, local or remote.

Contract: the command polls ``GET /admin/runtime`` (resident models, engine activity, memory against the budget,
process RSS; needs an admin key when the server requires keys) and ``GET /admin/jobs`` (job states and progress)
every ``--interval`` seconds and redraws one screen with :class:`rich.live.Live`. Tokens per second are the change
of each model's ``generated_tokens`` / ``prompt_tokens`` counters between two polls, divided by the time between
them (a model that was not resident at the previous poll, or whose counters went back because it was reloaded, shows
``-``). ``--once`` takes two polls ``--interval`` apart and prints one snapshot, without a live screen.

The server is ``--url`` or, like ``llmos ps``, ``http://LLMOS_HOST:LLMOS_PORT``; the key is ``--api-key`` or
``LLMOS_API_KEY``, sent as ``Authorization: Bearer``. An unreachable server is one line and exit code 1 (at start;
once the screen is up, a lost server is shown on it and polled again), a rejected key (401) or a key without the
admin role (403) is one line naming the problem, Ctrl-C leaves with exit code 0.

:func:`rates` and :func:`render` are pure functions (snapshots in, numbers / a rich renderable out), tested without a
server.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Group, RenderableType
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from llmos.cli.common import app, human_size, out, server_url
from llmos.errors import AuthenticationError, BackendUnavailableError, PermissionDeniedError

if TYPE_CHECKING:
    import httpx

RECENT_JOBS = 5
"""Finished jobs shown below the running and queued ones."""
ACTIVE_STATES = ("running", "queued")


def model_key(model: dict[str, Any]) -> str:
    """What identifies one resident model between two polls (a name may be re-pointed at another version)."""
    return f"{model.get('name')}@{model.get('digest')}"


def rates(previous: dict[str, Any] | None, current: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Tokens per second per model between two snapshots (``{"time": monotonic seconds, "runtime": ...}``).

    ``{model_key: {"generated": tok/s or None, "prompt": tok/s or None}}``: None where the model was not resident at
    the previous poll, where it has no counters (no engine), or where a counter went back (the model was reloaded).
    """
    found: dict[str, dict[str, float | None]] = {}
    before = {model_key(m): m for m in (previous or {}).get("runtime", {}).get("models", [])}
    elapsed = current["time"] - previous["time"] if previous else 0.0
    for model in current["runtime"].get("models", []):
        key = model_key(model)
        old = before.get(key)
        item: dict[str, float | None] = {"generated": None, "prompt": None}
        for field, counter in (("generated", "generated_tokens"), ("prompt", "prompt_tokens")):
            now_value, old_value = model.get(counter), (old or {}).get(counter)
            if elapsed > 0 and isinstance(now_value, int) and isinstance(old_value, int) and now_value >= old_value:
                item[field] = (now_value - old_value) / elapsed
        found[key] = item
    return found


def _rate_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _expiry(model: dict[str, Any], now: float) -> str:
    if model.get("pinned"):
        return "pinned"
    expires_at = model.get("expires_at")
    if expires_at is None:
        return "never"
    seconds = max(0, int(expires_at - now))
    return f"in {seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"in {seconds}s"


def _kv_text(model: dict[str, Any]) -> str:
    used, total = model.get("kv_cells_used"), model.get("kv_cells_total")
    if not isinstance(used, int) or not isinstance(total, int) or total <= 0:
        return "-"
    return f"{used}/{total} ({used / total:.0%})"


def _models_table(runtime: dict[str, Any], model_rates: dict[str, dict[str, float | None]], now: float) -> Table:
    table = Table(title="resident models", title_justify="left", box=None, header_style="bold", expand=False)
    for column in ("NAME", "BACKEND", "MEMORY", "IN FLIGHT", "RUNNING", "WAITING", "KV CACHE", "GEN TOK/S"):
        table.add_column(column, justify="right" if column not in ("NAME", "BACKEND") else "left")
    table.add_column("PROMPT TOK/S", justify="right")
    table.add_column("EXPIRES")
    models = runtime.get("models", [])
    for model in models:
        rate = model_rates.get(model_key(model), {})
        running = f"{model['running']}/{model['slots']}" if "running" in model and "slots" in model else "-"
        replicas = model.get("replicas", 1)
        name = escape(str(model.get("name")))
        if isinstance(replicas, int) and replicas > 1:
            name += f" [dim]x{model.get('replicas_alive', replicas)}/{replicas}[/]"
        table.add_row(
            name,
            escape(str(model.get("backend", "-"))),
            human_size(model.get("memory")),
            str(model.get("in_flight", "-")),
            running,
            str(model.get("waiting", "-")),
            _kv_text(model),
            _rate_text(rate.get("generated")),
            _rate_text(rate.get("prompt")),
            _expiry(model, now),
        )
    if not models:
        table.add_row("[dim](no model resident)[/]", *[""] * 9)
    return table


def _summary(data: dict[str, Any]) -> RenderableType:
    runtime = data["runtime"]
    budget, used = runtime.get("budget") or 0, runtime.get("used") or 0
    model_rates = data.get("rates", {})
    generated = [r["generated"] for r in model_rates.values() if r.get("generated") is not None]
    total_rate = f"{sum(generated):.1f} tok/s generated" if generated else "- tok/s generated"
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("llmos top", f"{escape(data['url'])}  {time.strftime('%H:%M:%S', time.localtime(data['wall']))}")
    memory = Table.grid(padding=(0, 1))
    memory.add_row(
        ProgressBar(total=float(budget) or 1.0, completed=float(min(used, budget or used)), width=24),
        f"{human_size(used)} of {human_size(budget)} budget"
        + (f" ({used / budget:.0%})" if budget else "")
        + f"; server RSS {human_size(runtime.get('rss'))}",
    )
    grid.add_row("memory", memory)
    waiting = sum(m.get("waiting", 0) for m in runtime.get("models", []) if isinstance(m.get("waiting"), int))
    running = sum(m.get("running", 0) for m in runtime.get("models", []) if isinstance(m.get("running"), int))
    grid.add_row(
        "engine", f"{len(runtime.get('models', []))} resident, {running} running, {waiting} waiting; {total_rate}"
    )
    if data.get("error"):
        grid.add_row("[red]error[/]", f"[red]{escape(str(data['error']))}[/]")
    return grid


def _job_progress(job: dict[str, Any]) -> RenderableType:
    progress = job.get("progress") or {}
    step, total = progress.get("step"), progress.get("total")
    if not isinstance(step, int | float) or not isinstance(total, int | float) or total <= 0:
        return Text("-")
    bar = Table.grid(padding=(0, 1))
    bar.add_row(ProgressBar(total=float(total), completed=float(min(step, total)), width=20), f"{step}/{total}")
    return bar


def _job_loss(job: dict[str, Any]) -> str:
    metrics = (job.get("progress") or {}).get("metrics") or {}
    for key in ("loss", "val_loss"):
        if isinstance(metrics.get(key), int | float):
            return f"{metrics[key]:.4f}"
    return "-"


def _job_eta(job: dict[str, Any]) -> str:
    eta = (job.get("progress") or {}).get("eta_seconds")
    if job.get("state") != "running" or not isinstance(eta, int | float):
        return "-"
    seconds = int(eta)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _job_note(job: dict[str, Any]) -> str:
    """What a job produced (its model, and an evaluation's first metric), or the first line of its error."""
    result = job.get("result") or {}
    text = str(result.get("model") or job.get("error") or "").strip()
    metrics = result.get("metrics")
    if isinstance(metrics, dict):
        shown = [f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)][:1]
        text = " ".join([text, *shown]).strip()
    return escape(text.splitlines()[0][:60]) if text else "-"


def shown_jobs(jobs: list[dict[str, Any]], recent: int = RECENT_JOBS) -> list[dict[str, Any]]:
    """Running and queued jobs (all of them), then the ``recent`` newest others; the API lists newest first."""
    active = [j for j in jobs if j.get("state") in ACTIVE_STATES]
    others = [j for j in jobs if j.get("state") not in ACTIVE_STATES][:recent]
    return active + others


def _jobs_table(jobs: list[dict[str, Any]] | None) -> RenderableType:
    if jobs is None:
        return Text("jobs: not available from this server with this key", style="dim")
    table = Table(title="jobs", title_justify="left", box=None, header_style="bold")
    for column in ("ID", "KIND", "STATE", "PROGRESS", "LOSS", "ETA", "RESULT"):
        table.add_column(column)
    styles = {"running": "green", "queued": "yellow", "failed": "red", "interrupted": "red", "cancelled": "dim"}
    selected = shown_jobs(jobs)
    for job in selected:
        state = str(job.get("state", "-"))
        table.add_row(
            escape(str(job.get("id", "-"))),
            escape(str(job.get("kind", "-"))),
            Text(state, style=styles.get(state, "")),
            _job_progress(job),
            _job_loss(job),
            _job_eta(job),
            _job_note(job),
        )
    if not selected:
        table.add_row("[dim](no jobs)[/]", *[""] * 6)
    return table


def render(data: dict[str, Any]) -> RenderableType:
    """One screen of ``llmos top`` from a snapshot (pure: no I/O, no clock).

    ``data``: ``url``, ``wall`` (the poll's wall-clock time, for expiries), ``runtime`` (the ``/admin/runtime``
    body), ``jobs`` (the ``/admin/jobs`` list, or None when the key may not see jobs), ``rates`` (from
    :func:`rates`) and optionally ``error`` (a line shown in red, e.g. when the server stopped answering).
    """
    return Group(
        _summary(data),
        Text(""),
        _models_table(data["runtime"], data.get("rates", {}), data["wall"]),
        Text(""),
        _jobs_table(data.get("jobs")),
    )


# --- polling --------------------------------------------------------------------------------------------------------


def _get(client: httpx.Client, base: str, path: str) -> httpx.Response:
    import httpx

    try:
        response = client.get(f"{base}{path}")
    except httpx.HTTPError as exc:
        raise BackendUnavailableError(f"no llmos server answers at {base} ({type(exc).__name__})") from exc
    if response.status_code == 401:
        problem = "rejected the API key" if "authorization" in client.headers else "requires an API key"
        raise AuthenticationError(
            f"{base} {problem} (401: {_message(response)}); pass an admin key with --api-key or LLMOS_API_KEY"
        )
    if response.status_code == 403:
        raise PermissionDeniedError(f"{base}{path} needs an admin key (403: {_message(response)})")
    return response


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200].strip() or response.reason_phrase


def poll(client: httpx.Client, base: str) -> dict[str, Any]:
    """One snapshot: the runtime state and the job list, stamped with monotonic and wall-clock time."""
    response = _get(client, base, "/admin/runtime")
    if response.status_code != 200:
        raise BackendUnavailableError(f"{base}/admin/runtime answered {response.status_code}: {_message(response)}")
    jobs: list[dict[str, Any]] | None = None
    try:
        jobs_response = _get(client, base, "/admin/jobs")
        if jobs_response.status_code == 200:
            jobs = list(jobs_response.json().get("data", []))
    except PermissionDeniedError:
        jobs = None
    return {"time": time.monotonic(), "wall": time.time(), "runtime": response.json(), "jobs": jobs}


def _view(base: str, previous: dict[str, Any] | None, current: dict[str, Any]) -> dict[str, Any]:
    return {**current, "url": base, "rates": rates(previous, current)}


@app.command()
def top(
    url: Annotated[str | None, typer.Option("--url", help="Server address (default from LLMOS_HOST/PORT).")] = None,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="LLMOS_API_KEY", help="Admin API key when the server requires keys."),
    ] = None,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between polls.", min=0.1)] = 1.0,
    once: Annotated[
        bool, typer.Option("--once", help="Poll twice, INTERVAL apart, print one snapshot and exit (no live screen).")
    ] = False,
) -> None:
    """Live view of a running server: resident models, running and waiting requests, tokens per second, memory
    against the budget, and jobs with their progress. Ctrl-C exits."""
    import httpx

    base = server_url(url).rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(headers=headers, timeout=10) as client:
        try:
            previous = poll(client, base)
            if once:
                time.sleep(interval)
                out.print(render(_view(base, previous, poll(client, base))))
                return
            _live(client, base, previous, interval)
        except KeyboardInterrupt:
            return


def _live(client: httpx.Client, base: str, previous: dict[str, Any], interval: float) -> None:
    from rich.live import Live

    view = _view(base, None, previous)
    with Live(render(view), console=out, auto_refresh=False, screen=out.is_terminal) as live:
        while True:
            time.sleep(interval)
            try:
                current = poll(client, base)
            except BackendUnavailableError as exc:  # keep the last picture, say why it is stale, poll again
                live.update(render({**view, "error": exc.message}), refresh=True)
                continue
            view = _view(base, previous, current)
            previous = current
            live.update(render(view), refresh=True)
