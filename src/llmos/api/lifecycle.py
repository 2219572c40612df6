"""Admin routes for datasets and jobs (the same operations as ``llmos data`` and ``llmos jobs`` / ``llmos train``).

Contract: developers and admins only (consumers get 403). A caller sees its own tenant's datasets and jobs plus
public datasets; admins see all; anything else is "not found" (404, never 403). ``POST /admin/datasets`` takes rows
inline (bounded by the request size limit) and registers a version owned by the caller's tenant. ``POST
/admin/jobs`` queues a training job (validated before it is queued) and returns it; ``GET .../logs`` returns the
log text, ``GET .../metrics`` the loss curve. The server dispatches the queue itself every few seconds.
"""

from __future__ import annotations

from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import Field

from llmos.api.auth import require_role
from llmos.api.body import parse_body
from llmos.api.openai.schemas import Strict
from llmos.api.state import AppState
from llmos.errors import NotFoundError
from llmos.jobs.service import JobService
from llmos.jobs.train import check_inputs, config_from_params
from llmos.registry.datasets import load_rows, rows_of_split, show_dataset, store_rows
from llmos.registry.views import VersionView
from llmos.security.principal import Principal

router = APIRouter(prefix="/admin")


class DatasetRequest(Strict):
    name: str = Field(min_length=1, max_length=300)
    rows: list[dict[str, Any]] = Field(min_length=1)


class TrainRequest(Strict):
    base: str = Field(min_length=1, max_length=300)
    data: str = Field(min_length=1, max_length=300)
    name: str = Field(min_length=1, max_length=300)
    method: str = Field(default="lora", max_length=16)
    validation: str | None = Field(default=None, max_length=300)
    epochs: int = Field(default=3, ge=1, le=10_000)
    max_steps: int | None = Field(default=None, ge=1, le=10**9)
    optimizer: str = Field(default="adamw", max_length=16)
    lr: float | None = Field(default=None, gt=0, le=10)
    batch_size: int = Field(default=8, ge=1, le=4096)
    grad_accum: int = Field(default=1, ge=1, le=1024)
    warmup_steps: int = Field(default=10, ge=0, le=10**9)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    checkpoint_every: int = Field(default=20, ge=1, le=10**9)
    eval_every: int = Field(default=0, ge=0, le=10**9)
    patience: int | None = Field(default=None, ge=1, le=10**6)
    auto_resume: bool = False


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.llmos
    return state


def _jobs(request: Request) -> JobService:
    jobs: JobService = request.app.state.jobs
    return jobs


def _scope(caller: Principal) -> int | None:
    return None if caller.is_admin else caller.tenant_id


def _dataset_dict(view: VersionView) -> dict[str, Any]:
    """A dataset version for the API: its details (rows, shape, splits, report) included, model-only fields not."""
    data = view.to_dict(full=True)
    for key in ("chat_template", "tokenizer", "architecture", "parameter_count", "quantization", "context_length"):
        data.pop(key, None)
    return data


def _visible_dataset(caller: Principal, view: VersionView, name: str) -> VersionView:
    if not caller.may_see(view.tenant_id):
        raise NotFoundError(f"dataset {name!r} not found")
    return view


@router.get("/datasets")
async def list_datasets(request: Request) -> dict[str, Any]:
    caller = require_role(request, "developer")
    views = await to_thread.run_sync(lambda: _state(request).registry.list_versions(kind="dataset"))
    data = [_dataset_dict(v) for v in views if caller.may_see(v.tenant_id)]
    return {"object": "list", "data": data}


@router.get("/datasets/{name:path}/preview")
async def preview_dataset(request: Request, name: str, rows: int = 5, split: str | None = None) -> dict[str, Any]:
    caller = require_role(request, "developer")
    registry = _state(request).registry
    _visible_dataset(caller, await to_thread.run_sync(show_dataset, registry, name), name)
    _, all_rows = await to_thread.run_sync(load_rows, registry, name)
    return {"object": "list", "data": rows_of_split(all_rows, split)[: max(0, min(rows, 1000))]}


@router.get("/datasets/{name:path}")
async def get_dataset(request: Request, name: str) -> dict[str, Any]:
    caller = require_role(request, "developer")
    view = await to_thread.run_sync(show_dataset, _state(request).registry, name)
    return _dataset_dict(_visible_dataset(caller, view, name))


@router.post("/datasets")
async def create_dataset(request: Request) -> dict[str, Any]:
    caller = require_role(request, "developer")
    body = await parse_body(request, DatasetRequest, _state(request).settings.max_request_bytes)
    state = _state(request)

    def store() -> VersionView:
        return store_rows(
            state.registry,
            body.rows,
            body.name,
            operation="import",
            report={"rows": len(body.rows), "source": "api"},
            tenant_id=caller.tenant_id,
        )

    view = await to_thread.run_sync(store)
    state.security.audit(caller.actor, caller.tenant, "data.import", view.name, "ok")
    return _dataset_dict(view)


@router.delete("/datasets/{name:path}")
async def delete_dataset(request: Request, name: str) -> dict[str, Any]:
    caller = require_role(request, "developer")
    state = _state(request)
    _visible_dataset(caller, await to_thread.run_sync(show_dataset, state.registry, name), name)
    await to_thread.run_sync(state.registry.remove, name)
    state.security.audit(caller.actor, caller.tenant, "data.rm", name, "ok")
    return {"id": name, "object": "dataset", "deleted": True}


@router.get("/jobs")
async def list_jobs(request: Request, state: str | None = None) -> dict[str, Any]:
    caller = require_role(request, "developer")
    jobs = _jobs(request)
    views = await to_thread.run_sync(lambda: jobs.list_jobs(tenant_id=_scope(caller), state=state))
    return {"object": "list", "data": [v.to_dict() for v in views]}


@router.post("/jobs")
async def create_job(request: Request) -> dict[str, Any]:
    caller = require_role(request, "developer")
    body = await parse_body(request, TrainRequest, _state(request).settings.max_request_bytes)
    params = body.model_dump(exclude={"auto_resume"})
    config_from_params(params)
    state = _state(request)

    await to_thread.run_sync(lambda: check_inputs(state.registry, params, caller.may_see))
    jobs = _jobs(request)
    view = await to_thread.run_sync(
        lambda: jobs.create(
            "train",
            params,
            tenant_id=caller.tenant_id,
            created_by=caller.actor,
            resource="train",
            auto_resume=body.auto_resume,
        )
    )
    state.security.audit(caller.actor, caller.tenant, "jobs.create", view.id, "ok")
    await to_thread.run_sync(jobs.dispatch)
    return (await to_thread.run_sync(lambda: jobs.get(view.id))).to_dict()


@router.get("/jobs/{job_id}")
async def get_job(request: Request, job_id: str) -> dict[str, Any]:
    caller = require_role(request, "developer")
    jobs = _jobs(request)
    return (await to_thread.run_sync(lambda: jobs.get(job_id, tenant_id=_scope(caller)))).to_dict()


@router.get("/jobs/{job_id}/metrics")
async def job_metrics(request: Request, job_id: str) -> dict[str, Any]:
    caller = require_role(request, "developer")
    jobs = _jobs(request)
    records = await to_thread.run_sync(lambda: jobs.metrics(job_id, tenant_id=_scope(caller)))
    return {"object": "list", "data": records}


@router.get("/jobs/{job_id}/logs")
async def job_logs(request: Request, job_id: str) -> PlainTextResponse:
    caller = require_role(request, "developer")
    jobs = _jobs(request)
    jobs.get(job_id, tenant_id=_scope(caller))
    path = jobs.log_path(job_id)
    text = await to_thread.run_sync(lambda: path.read_text(errors="replace") if path.exists() else "")
    return PlainTextResponse(text[-1_000_000:])


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
    caller = require_role(request, "developer")
    jobs = _jobs(request)
    view = await to_thread.run_sync(lambda: jobs.cancel(job_id, tenant_id=_scope(caller)))
    _state(request).security.audit(caller.actor, caller.tenant, "jobs.cancel", job_id, "ok")
    return view.to_dict()


@router.post("/jobs/{job_id}/resume")
async def resume_job(request: Request, job_id: str) -> dict[str, Any]:
    caller = require_role(request, "developer")
    jobs = _jobs(request)
    view = await to_thread.run_sync(lambda: jobs.resume(job_id, tenant_id=_scope(caller)))
    _state(request).security.audit(caller.actor, caller.tenant, "jobs.resume", job_id, "ok")
    return view.to_dict()
