"""Admin routes for jobs and evaluations (the same operations as ``llmos jobs`` / ``llmos train`` / ``llmos eval``).

Contract: developers and admins only (consumers get 403). A caller sees its own tenant's jobs; admins see all;
anything else is "not found" (404, never 403). ``POST /admin/jobs`` queues a training job, or with ``"kind": "eval"``
an evaluation job (validated before it is queued), and returns it; ``GET .../logs`` returns the log text, ``GET
.../metrics`` the loss curve. The server dispatches the queue itself every few seconds.

Evaluations: ``GET /admin/evaluations`` lists stored reports (newest first; ``model=`` and ``task=`` filter), and
with two or more ``model=`` parameters compares them: the latest report of ``task`` for each, one column per metric
(the same table as ``llmos eval compare --json``). ``POST /admin/evaluations`` queues an evaluation job (the body
of an eval job; a custom task comes inline as ``spec``, never as a server-side file path). Reports of models the
caller cannot see are not listed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from anyio import to_thread
from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse
from pydantic import Field, RootModel

from llmos.api.auth import require_role, tenant_scope
from llmos.api.body import AdminBody, no_body, parse_body, parse_json, read_body, validate
from llmos.api.state import app_state, job_service
from llmos.errors import InvalidInputError, NotFoundError
from llmos.evaluation.reports import comparison, reports
from llmos.evaluation.tasks import is_task_file
from llmos.jobs.evaluate import eval_params
from llmos.jobs.service import JobView
from llmos.jobs.train import check_inputs, config_from_params
from llmos.security.principal import Principal

router = APIRouter(prefix="/admin")


class TrainRequest(AdminBody):
    kind: Literal["train"] = "train"
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
    keep_checkpoints: bool = Field(
        default=False, description="Keep the job's (encrypted) checkpoints after it succeeds instead of removing them."
    )


class EvalRequest(AdminBody):
    """An evaluation job: the same options as ``llmos eval`` (one model)."""

    kind: Literal["eval"] = "eval"
    model: str = Field(min_length=1, max_length=300)
    task: str = Field(default="perplexity", min_length=1, max_length=64)
    spec: dict[str, Any] | None = Field(default=None, description="A custom task's fields (as in a task YAML file).")
    data: str | None = Field(default=None, max_length=300)
    split: str | None = Field(default=None, max_length=64)
    limit: int | None = Field(default=None, ge=1, le=1_000_000)
    window: int | None = Field(default=None, ge=2, le=1_048_576)
    stride: int | None = Field(default=None, ge=1, le=1_048_576)
    backend: Literal["llama.cpp", "torch"] | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=4096)


class JobRequest(RootModel[TrainRequest | EvalRequest]):
    """The body of ``POST /admin/jobs``: a training job (``kind`` train, the default) or an evaluation job."""


@router.get("/jobs")
async def list_jobs(request: Request, state: str | None = None) -> dict[str, Any]:
    caller = require_role(request, "developer")
    jobs = job_service(request)
    views = await to_thread.run_sync(lambda: jobs.list_jobs(tenant_id=tenant_scope(caller), state=state))
    return {"object": "list", "data": [v.to_dict() for v in views]}


async def _queue_eval(request: Request, caller: Principal, body: EvalRequest) -> dict[str, Any]:
    if is_task_file(body.task):
        raise InvalidInputError("give a custom task inline as 'spec', not as a file path", param="task")
    state = app_state(request)
    raw = body.model_dump(exclude={"kind"})
    params = await to_thread.run_sync(lambda: eval_params(state.registry, raw, caller.may_see))
    jobs = job_service(request)

    def create() -> JobView:
        return jobs.create("eval", params, tenant_id=caller.tenant_id, created_by=caller.actor, resource="eval")

    view = await to_thread.run_sync(create)
    state.security.audit(caller.actor, caller.tenant, "jobs.create", view.id, "ok")
    await to_thread.run_sync(jobs.dispatch)
    return (await to_thread.run_sync(lambda: jobs.get(view.id))).to_dict()


@router.post("/jobs")
async def create_job(request: Request) -> dict[str, Any]:
    caller = require_role(request, "developer")
    data = parse_json(await read_body(request, app_state(request).settings.max_request_bytes))
    kind = data.get("kind", "train")
    if kind == "eval":
        return await _queue_eval(request, caller, validate(EvalRequest, data))
    if kind != "train":
        raise InvalidInputError(f"unknown job kind {kind!r}; kinds: train, eval", param="kind")
    body = validate(TrainRequest, data)
    params = body.model_dump(exclude={"auto_resume", "kind"})
    config_from_params(params)
    state = app_state(request)

    await to_thread.run_sync(lambda: check_inputs(state.registry, params, caller.may_see))
    jobs = job_service(request)
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
    jobs = job_service(request)
    return (await to_thread.run_sync(lambda: jobs.get(job_id, tenant_id=tenant_scope(caller)))).to_dict()


@router.get("/jobs/{job_id}/metrics")
async def job_metrics(request: Request, job_id: str) -> dict[str, Any]:
    caller = require_role(request, "developer")
    jobs = job_service(request)
    records = await to_thread.run_sync(lambda: jobs.metrics(job_id, tenant_id=tenant_scope(caller)))
    return {"object": "list", "data": records}


@router.get("/jobs/{job_id}/logs")
async def job_logs(request: Request, job_id: str) -> PlainTextResponse:
    caller = require_role(request, "developer")
    jobs = job_service(request)
    jobs.get(job_id, tenant_id=tenant_scope(caller))
    path = jobs.log_path(job_id)
    text = await to_thread.run_sync(lambda: path.read_text(errors="replace") if path.exists() else "")
    return PlainTextResponse(text[-1_000_000:])


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
    return await _job_action(request, job_id, "cancel")


@router.post("/jobs/{job_id}/resume")
async def resume_job(request: Request, job_id: str) -> dict[str, Any]:
    return await _job_action(request, job_id, "resume")


async def _job_action(request: Request, job_id: str, action: Literal["cancel", "resume"]) -> dict[str, Any]:
    """Cancel or resume a job the caller may see (404 otherwise), audited as ``jobs.<action>``."""
    caller = require_role(request, "developer")
    await no_body(request, app_state(request).settings.max_request_bytes)
    act = getattr(job_service(request), action)
    view = await to_thread.run_sync(lambda: act(job_id, tenant_id=tenant_scope(caller)))
    app_state(request).security.audit(caller.actor, caller.tenant, f"jobs.{action}", job_id, "ok")
    return dict(view.to_dict())


# --- evaluations ----------------------------------------------------------------------------------------------------


@router.get("/evaluations")
async def list_evaluations(
    request: Request,
    model: Annotated[list[str] | None, Query(description="Model(s); two or more compare their latest reports.")] = None,
    task: Annotated[str | None, Query(max_length=64, description="Only this task (compare: perplexity).")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many reports, newest first.")] = 100,
) -> dict[str, Any]:
    caller = require_role(request, "developer")
    state = app_state(request)
    names = model or []

    def visible(name: str) -> None:
        view = state.registry.show(name)
        if not caller.may_see(view.tenant_id):
            raise NotFoundError(f"model {name!r} not found")

    for name in names:
        await to_thread.run_sync(visible, name)
    if len(names) >= 2:
        table = await to_thread.run_sync(lambda: comparison(state.settings, names, task or "perplexity"))
        return {"object": "evaluation.comparison", "task": table["task"], "metrics": table["metrics"],
                "data": table["rows"]}  # fmt: skip

    def listed() -> list[dict[str, Any]]:
        digests = None
        if not caller.is_admin:
            digests = {v.digest for v in state.registry.list_versions(kind="model") if caller.may_see(v.tenant_id)}
        found = reports(state.settings, names[0] if names else None, task=task, digests=digests)
        return [r.to_dict() for r in reversed(found[-limit:])]

    return {"object": "list", "data": await to_thread.run_sync(listed)}


@router.post("/evaluations")
async def create_evaluation(request: Request) -> dict[str, Any]:
    caller = require_role(request, "developer")
    body = await parse_body(request, EvalRequest, app_state(request).settings.max_request_bytes)
    return await _queue_eval(request, caller, body)
