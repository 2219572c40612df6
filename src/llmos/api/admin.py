"""Admin routes: what is resident and doing what, and unloading on demand.

Contract: ``GET /admin/runtime`` lists every resident model with backend, measured memory, leases in flight,
keep-alive expiry and engine activity, plus the budget and the process RSS; ``POST /admin/runtime/unload`` with
``{"model": NAME}`` unloads it as soon as it is idle (404 if the name is unknown).
"""

from __future__ import annotations

import time
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request
from pydantic import Field

from llmos.api.body import parse_body
from llmos.api.openai.schemas import Strict
from llmos.api.state import AppState
from llmos.runtime.memory import process_rss
from llmos.runtime.model import LoadedModel
from llmos.runtime.replicas import ReplicaSet

router = APIRouter(prefix="/admin")


class UnloadRequest(Strict):
    model: str = Field(min_length=1, max_length=300)


@router.get("/runtime")
async def runtime(request: Request) -> dict[str, Any]:
    state: AppState = request.app.state.llmos
    residency = state.residency
    models = []
    for entry in residency.snapshot():
        expires_in = residency.expires_in(entry)
        item: dict[str, Any] = {
            "name": entry.view.name,
            "digest": entry.view.digest,
            "backend": entry.backend,
            "size": entry.view.size,
            "memory": entry.reserved,
            "in_flight": entry.in_flight,
            "pinned": entry.pinned,
            "expires_at": None if expires_in is None else time.time() + expires_in,
            "loaded_at": entry.loaded_at,
            "load_seconds": round(entry.load_seconds, 3),
        }
        instance = entry.instance
        replicas: list[object] = list(instance.replicas) if isinstance(instance, ReplicaSet) else [instance]
        engines = [r for r in replicas if isinstance(r, LoadedModel)]
        if engines:
            all_stats = [r.engine.stats() for r in engines]
            item.update(
                {
                    "replicas": len(engines),
                    "replicas_alive": sum(r.engine.alive for r in engines),
                    "restarts": instance.restarts if isinstance(instance, ReplicaSet) else 0,
                    "slots": sum(r.backend.n_seq_max for r in engines),
                    "context_per_sequence": engines[0].engine.max_context,
                    "running": sum(s.running for s in all_stats),
                    "waiting": sum(s.waiting for s in all_stats),
                    "kv_cells_used": sum(s.kv_cells_used for s in all_stats),
                    "kv_cells_total": sum(s.kv_cells_total for s in all_stats),
                    "generated_tokens": sum(s.generated_tokens for s in all_stats),
                    "prompt_tokens": sum(s.prompt_tokens for s in all_stats),
                    "per_replica": [{"running": s.running, "waiting": s.waiting} for s in all_stats],
                }
            )
        models.append(item)
    return {"budget": residency.budget, "used": residency.used(), "rss": process_rss(), "models": models}


@router.post("/runtime/unload")
async def unload(request: Request) -> dict[str, Any]:
    state: AppState = request.app.state.llmos
    body = await parse_body(request, UnloadRequest, state.settings.max_request_bytes)
    was_resident = await to_thread.run_sync(state.residency.unload, body.model)
    return {"model": body.model, "unloaded": was_resident}
