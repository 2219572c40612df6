"""Probes for container orchestrators: ``/health`` (alive) and ``/ready`` (able to serve).

Contract: both are open (no API key) and cheap.

* ``GET /health`` answers 200 ``{"status": "ok"}`` whenever the process serves HTTP, also while models preload:
  a liveness probe must not restart a server that is busy loading.
* ``GET /ready`` answers 200 ``{"status": "ready", "checks": {...}}`` when every check passes, else 503 with
  ``"status": "not_ready"`` and each check's ``ok`` and, for a failed one, ``reason``. Checks: ``preload`` (the
  models named with ``--model`` / ``--pin`` are loaded: ``loading`` while they load, the load error's message if one
  failed), ``database`` (a ``SELECT 1`` on the registry database), ``disk`` (free space where ``LLMOS_HOME`` lives
  is at least ``ready_min_free_bytes``), ``audit`` (the last audit write succeeded, or a trial write does now) and
  ``usage`` (no usage record waits to be written); ``models`` lists the models whose process died and that were not
started again yet, and the crashes of the last ten minutes (model, signal or exit code; a crashed model restarts on
its next request, so this check never fails). Bodies name no paths and no sizes (the probes need no key).
"""

from __future__ import annotations

import shutil
import time
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from llmos.api.state import AppState
from llmos.runtime.residency import alive

router = APIRouter()
RECENT_SECONDS = 600.0


@router.get("/health")
async def health() -> JSONResponse:
    return JSONResponse({"status": "ok"})


def _database(state: AppState) -> dict[str, Any]:
    try:
        with state.registry.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        return {"ok": False, "reason": f"database unreachable ({type(exc).__name__})"}
    return {"ok": True}


def _disk(state: AppState) -> dict[str, Any]:
    minimum = state.settings.ready_min_free_bytes
    try:
        free = shutil.disk_usage(state.settings.home).free
    except OSError as exc:
        return {"ok": False, "reason": f"cannot read free disk space ({type(exc).__name__})"}
    if free < minimum:
        return {"ok": False, "reason": "free disk space of the store is below ready_min_free_bytes"}
    return {"ok": True}


def _preload(state: AppState) -> dict[str, Any]:
    if not state.ready.is_set():
        return {"ok": False, "reason": "loading", "models": state.preload}
    if state.preload_error:
        return {"ok": False, "reason": state.preload_error}
    return {"ok": True}


def _models(state: AppState) -> dict[str, Any]:
    """Models whose process died and has not been started again: named with how it ended. A crashed model is
    restarted by its next request, so the server stays ready; the check reports, it does not fail."""
    failures = state.residency.failures
    crashed = []
    for entry in state.residency.snapshot():
        last = failures.last(entry.view.name) if failures is not None else None
        if not alive(entry.instance):
            crashed.append(last.public() if last is not None else {"model": entry.view.name, "reason": "stopped"})
    horizon = time.time() - RECENT_SECONDS
    recent = [f.public() for f in (failures.recent() if failures is not None else []) if f.at >= horizon]
    return {"ok": True, "crashed": crashed, "recent_crashes": recent}


def readiness(state: AppState) -> dict[str, dict[str, Any]]:
    return {"preload": _preload(state), "database": _database(state), "disk": _disk(state),
            "models": _models(state), **state.security.records_health()}  # fmt: skip


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    state: AppState = request.app.state.llmos
    checks = await to_thread.run_sync(readiness, state)
    ok = all(check["ok"] for check in checks.values())
    return JSONResponse({"status": "ready" if ok else "not_ready", "checks": checks}, status_code=200 if ok else 503)
