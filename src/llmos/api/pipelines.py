"""Admin routes for pipelines and aliases (the same operations as ``llmos pipeline``, ``history``, ``rollback``).

Contract: developers and admins only. ``POST /admin/pipelines`` takes ``{"recipe": {...}}`` (the YAML recipe's
fields as JSON) or ``{"yaml": "..."}``, validates it completely (400 naming the bad field; 404 for a base or dataset
the caller cannot see), stores it under its name for the caller's tenant and, unless ``"run": false``, queues a run:
the response is the stored pipeline plus ``job`` (202 Accepted: the run happens in the background). ``POST
/admin/pipelines/{name}/runs`` runs a stored one. ``GET /admin/models/{name}/history`` lists an alias's moves;
``POST /admin/rollback`` moves an alias back. :func:`start_for_missing_model` lets a generation request for a model that
does not exist yet start the stored pipeline that promotes it, when the caller asks for that.
"""

from __future__ import annotations

from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from llmos.api.auth import require_role, tenant_scope
from llmos.api.body import AdminBody, no_body, parse_body
from llmos.api.state import app_state, job_service
from llmos.errors import InvalidInputError, ModelNotFoundError, NotFoundError, PermissionDeniedError
from llmos.jobs import pipeline as pipelines
from llmos.registry import aliases
from llmos.security.principal import Principal

router = APIRouter(prefix="/admin")


class PipelineRequest(AdminBody):
    recipe: dict[str, Any] | None = None
    yaml: str | None = Field(default=None, max_length=100_000)
    run: bool = True


class RollbackRequest(AdminBody):
    alias: str = Field(min_length=1, max_length=300)
    to: str | None = Field(default=None, max_length=80)


async def _queue(request: Request, caller: Principal, recipe: pipelines.Recipe) -> str:
    state = app_state(request)
    await to_thread.run_sync(lambda: pipelines.check_recipe(state.registry, recipe, caller.may_see))
    jobs = job_service(request)
    view = await to_thread.run_sync(
        lambda: pipelines.start(jobs, recipe, tenant_id=caller.tenant_id, created_by=caller.actor)
    )
    state.security.audit(caller.actor, caller.tenant, "pipeline.run", f"{recipe.name} {view.id}", "ok")
    return view.id


@router.post("/pipelines")
async def create_pipeline(request: Request) -> JSONResponse:
    caller = require_role(request, "developer")
    state = app_state(request)
    body = await parse_body(request, PipelineRequest, state.settings.max_request_bytes)
    if (body.recipe is None) == (body.yaml is None):
        raise InvalidInputError("give the recipe either as 'recipe' (an object) or as 'yaml' (text)", param="recipe")
    raw = body.recipe if body.recipe is not None else pipelines.load_recipe_text(body.yaml or "")
    if "import" in raw:
        raise InvalidInputError(
            "'import' reads a file on the server; over the API register the dataset first (POST /admin/datasets)",
            param="import",
        )
    recipe = pipelines.parse_recipe(raw)
    await to_thread.run_sync(lambda: pipelines.check_recipe(state.registry, recipe, caller.may_see))
    stored = await to_thread.run_sync(lambda: pipelines.save_pipeline(state.registry, recipe, caller.tenant_id))
    state.security.audit(caller.actor, caller.tenant, "pipeline.save", recipe.name, "ok")
    response = stored.to_dict()
    if body.run:
        response["job"] = await _queue(request, caller, recipe)
    return JSONResponse(response, status_code=202 if body.run else 200)


@router.get("/pipelines")
async def list_pipelines(request: Request) -> dict[str, Any]:
    caller = require_role(request, "developer")
    stored = await to_thread.run_sync(
        lambda: pipelines.list_pipelines(app_state(request).registry, tenant_scope(caller))
    )
    return {"object": "list", "data": [s.to_dict() for s in stored]}


@router.get("/pipelines/{name}")
async def get_pipeline(request: Request, name: str) -> dict[str, Any]:
    caller = require_role(request, "developer")
    stored = await to_thread.run_sync(
        lambda: pipelines.get_pipeline(app_state(request).registry, name, tenant_scope(caller))
    )
    return stored.to_dict()


@router.post("/pipelines/{name}/runs")
async def run_pipeline(request: Request, name: str) -> JSONResponse:
    caller = require_role(request, "developer")
    await no_body(request, app_state(request).settings.max_request_bytes)
    stored = await to_thread.run_sync(
        lambda: pipelines.get_pipeline(app_state(request).registry, name, tenant_scope(caller))
    )
    recipe = pipelines.recipe_from_stored(stored.recipe)
    job = await _queue(request, caller, recipe)
    return JSONResponse({"object": "pipeline.run", "pipeline": name, "job": job, "status": "queued"}, status_code=202)


@router.get("/models/{name:path}/history")
async def alias_history(request: Request, name: str) -> dict[str, Any]:
    caller = require_role(request, "developer")
    registry = app_state(request).registry
    view = await to_thread.run_sync(registry.show, name)
    if not caller.may_see(view.tenant_id):
        raise ModelNotFoundError(f"model {name!r} not found")
    moves = await to_thread.run_sync(aliases.history, registry, name)
    return {"object": "list", "data": [m.to_dict() for m in moves]}


@router.post("/rollback")
async def rollback(request: Request) -> dict[str, Any]:
    caller = require_role(request, "developer")
    state = app_state(request)
    body = await parse_body(request, RollbackRequest, state.settings.max_request_bytes)
    view = await to_thread.run_sync(state.registry.show, body.alias)
    if not caller.may_see(view.tenant_id):
        raise ModelNotFoundError(f"model {body.alias!r} not found")
    if view.tenant_id is None and not caller.is_admin:
        raise PermissionDeniedError(f"moving the public alias {view.name} needs an admin key")
    moved = await to_thread.run_sync(
        lambda: aliases.rollback(state.registry, body.alias, to=body.to, reason=f"rollback ({caller.actor})")
    )
    state.security.audit(caller.actor, caller.tenant, "alias.rollback", moved.name, "ok")
    return moved.to_dict()


async def start_for_missing_model(request: Request, caller: Principal, model: str, pipeline: str) -> JSONResponse:
    """A generation request for ``model`` that does not exist yet, asking for ``pipeline`` to produce it.

    The stored pipeline must promote exactly that alias; the run is queued and its job id returned (202).
    """
    if not caller.at_least("developer"):
        raise PermissionDeniedError("starting a pipeline needs a developer or admin key")
    registry = app_state(request).registry
    try:
        stored = await to_thread.run_sync(lambda: pipelines.get_pipeline(registry, pipeline, tenant_scope(caller)))
    except NotFoundError as exc:
        raise InvalidInputError(str(exc), param="pipeline") from exc
    promoted = f"{stored.recipe.get('output')}:{stored.recipe.get('promote')}"
    if stored.recipe.get("promote") is None or promoted not in (model, f"{model}:latest"):
        raise InvalidInputError(f"pipeline {pipeline!r} promotes {promoted}, not {model}", param="pipeline")
    recipe = pipelines.recipe_from_stored(stored.recipe)
    job = await _queue(request, caller, recipe)
    body = {"object": "pipeline.run", "pipeline": pipeline, "model": model, "job": job, "status": "queued"}
    return JSONResponse(body, status_code=202)
