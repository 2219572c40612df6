"""Admin routes: runtime state, tenants, keys, usage and the audit log.

Contract: ``GET /admin/runtime`` lists every resident model with backend, measured memory, leases in flight,
keep-alive expiry and engine activity, plus the budget, the process RSS, the llama.cpp CPU path in use and why, and
the device torch models run on (``torch_device``: ``cpu`` or ``cuda:0 <name>, <memory> GiB``, asked of a child process
once so that the server never initialises CUDA itself);
``POST /admin/runtime/unload`` with ``{"model": NAME}`` unloads it as soon as it is idle (404 if the name is
unknown). Tenants, usage and audit are admin-only. Keys: admins manage every key; a developer may list, create
(developer or consumer role) and revoke keys of its own tenant. Every change is audited; a new key is returned
once and never again. Bodies are strict: an unknown field is a 400 naming it.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request
from pydantic import Field

from llmos.api.auth import require_role
from llmos.api.body import AdminBody, parse_body
from llmos.api.state import AppState
from llmos.runtime.doctor import torch_device_report, torch_report
from llmos.runtime.memory import process_rss
from llmos.runtime.model import LoadedModel
from llmos.runtime.replicas import ReplicaSet
from llmos.runtime.residency import alive
from llmos.security.principal import Limits

router = APIRouter(prefix="/admin")


class UnloadRequest(AdminBody):
    model: str = Field(min_length=1, max_length=300)


@router.get("/runtime")
async def runtime(request: Request) -> dict[str, Any]:
    require_role(request, "admin")
    state: AppState = request.app.state.llmos
    residency = state.residency
    models = []
    for entry in residency.snapshot():
        expires_in = residency.expires_in(entry)
        failure = residency.failures.last(entry.view.name) if residency.failures else None
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
            "alive": alive(entry.instance),
            "pid": getattr(getattr(entry.instance, "engine", None), "pid", None),
            "last_failure": failure.to_json() if failure is not None else None,
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
                    "per_replica": [
                        {"running": s.running, "waiting": s.waiting, "alive": r.engine.alive, **_placement(r)}
                        for r, s in zip(engines, all_stats, strict=True)
                    ],
                }
            )
        models.append(item)
    verdict = state.loader.llamacpp_verdict()
    llamacpp = None
    if verdict is not None:
        llamacpp = {"path": verdict.describe, "extra_buffers": verdict.extra_buffers, "build": verdict.build}
        llamacpp |= {"reason": verdict.reason, "source": verdict.source}
    return {
        "budget": residency.budget,
        "used": residency.used(),
        "rss": process_rss(),
        "llamacpp": llamacpp,
        "torch_device": await to_thread.run_sync(torch_device_report, state.settings, torch_report()),
        "models": models,
        "model_processes": state.loader.launcher is not None,
        "zygotes": state.loader.launcher.pids() if state.loader.launcher is not None else {},
        "failures": [failure.to_json() for failure in residency.failures.recent()] if residency.failures else [],
        "restarts": dict(residency.failures.restarts) if residency.failures else {},
    }


def _placement(replica: LoadedModel) -> dict[str, Any]:
    """Where a replica runs: its model process (pid), and for replicas on a Ray cluster, its node; and why it died
    if it did."""
    info = getattr(replica.engine, "info", None)
    placement: dict[str, Any] = {}
    if isinstance(info, dict):
        placement = {key: info[key] for key in ("node", "node_ip", "pid", "fetched_blobs") if key in info}
    failure = getattr(replica.engine, "failure", None)
    if failure is not None:
        placement["failure"] = failure.to_json()
    return placement


@router.post("/runtime/unload")
async def unload(request: Request) -> dict[str, Any]:
    caller = require_role(request, "admin")
    state: AppState = request.app.state.llmos
    body = await parse_body(request, UnloadRequest, state.settings.max_request_bytes)
    await to_thread.run_sync(state.registry.show, body.model)  # an unknown name is a 404 before anything is audited

    def audited_unload() -> bool:  # the event first: no audit, no unload
        state.security.require_audit(caller.actor, caller.tenant, "model.unload", body.model)
        return state.residency.unload(body.model)

    was_resident = await to_thread.run_sync(audited_unload)
    return {"model": body.model, "unloaded": was_resident}


LIMIT_MAX = 10**15
"""Largest rate or budget accepted (the database stores 64-bit integers)."""


class TenantRequest(AdminBody):
    name: str = Field(min_length=1, max_length=64)
    requests_per_minute: int | None = Field(default=None, ge=1, le=LIMIT_MAX)
    tokens_per_minute: int | None = Field(default=None, ge=1, le=LIMIT_MAX)
    token_budget: int | None = Field(default=None, ge=0, le=LIMIT_MAX)
    budget_period: str = "month"


class KeyRequest(AdminBody):
    tenant: str = Field(min_length=1, max_length=64)
    role: str
    models: list[str] | None = None
    expires_in_seconds: int | None = Field(default=None, ge=1, le=100 * 365 * 86400)
    requests_per_minute: int | None = Field(default=None, ge=1, le=LIMIT_MAX)
    tokens_per_minute: int | None = Field(default=None, ge=1, le=LIMIT_MAX)
    token_budget: int | None = Field(default=None, ge=0, le=LIMIT_MAX)
    budget_period: str = "month"


def _limits(body: TenantRequest | KeyRequest) -> Limits:
    return Limits(body.requests_per_minute, body.tokens_per_minute, body.token_budget, body.budget_period)


@router.get("/tenants")
async def list_tenants(request: Request) -> dict[str, Any]:
    require_role(request, "admin")
    state: AppState = request.app.state.llmos
    tenants = await to_thread.run_sync(state.security.tenants)
    return {"data": [{"name": t.name, "requests_per_minute": t.requests_per_minute,
                      "tokens_per_minute": t.tokens_per_minute, "token_budget": t.token_budget,
                      "budget_period": t.budget_period} for t in tenants]}  # fmt: skip


@router.post("/tenants")
async def create_tenant(request: Request) -> dict[str, Any]:
    caller = require_role(request, "admin")
    state: AppState = request.app.state.llmos
    body = await parse_body(request, TenantRequest, state.settings.max_request_bytes)
    await to_thread.run_sync(lambda: state.security.create_tenant(body.name, limits=_limits(body), actor=caller.actor))
    return {"name": body.name, "created": True}


@router.get("/keys")
async def list_keys(request: Request) -> dict[str, Any]:
    caller = require_role(request, "developer")
    state: AppState = request.app.state.llmos
    keys = await to_thread.run_sync(lambda: state.security.keys(None if caller.is_admin else caller.tenant))
    return {"data": [k.to_dict() for k in keys]}


@router.post("/keys")
async def create_key(request: Request) -> dict[str, Any]:
    caller = require_role(request, "developer")
    state: AppState = request.app.state.llmos
    body = await parse_body(request, KeyRequest, state.settings.max_request_bytes)
    expires = timedelta(seconds=body.expires_in_seconds) if body.expires_in_seconds else None
    key, info = await to_thread.run_sync(
        lambda: state.security.create_key(
            body.tenant, body.role, creator=caller, expires_in=expires, models=body.models, limits=_limits(body)
        )
    )
    return {"key": key, **info.to_dict()}


@router.delete("/keys/{prefix}")
async def revoke_key(prefix: str, request: Request) -> dict[str, Any]:
    caller = require_role(request, "developer")
    state: AppState = request.app.state.llmos
    info = await to_thread.run_sync(lambda: state.security.revoke_key(prefix, actor=caller))
    return info.to_dict()


@router.get("/usage")
async def usage(request: Request, by: str = "tenant") -> dict[str, Any]:
    require_role(request, "admin")
    state: AppState = request.app.state.llmos
    return {"data": await to_thread.run_sync(state.security.usage_report, by)}


@router.get("/audit")
async def audit(request: Request, limit: int = 100) -> dict[str, Any]:
    require_role(request, "admin")
    state: AppState = request.app.state.llmos
    events = await to_thread.run_sync(state.security.audit_events, max(1, min(limit, 1000)))
    return {"data": [{"time": e.created_at.isoformat(), "actor": e.actor, "tenant": e.tenant, "action": e.action,
                      "target": e.target, "outcome": e.outcome, "details": e.details} for e in events]}  # fmt: skip
