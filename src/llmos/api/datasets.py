"""Admin routes for datasets (the same operations as ``llmos data``).

Contract: developers and admins only (consumers get 403). A caller sees its own tenant's datasets plus public
datasets; admins see all; anything else is "not found" (404, never 403). ``POST /admin/datasets`` takes rows inline
(bounded by the request size limit) and registers a version owned by the caller's tenant.
"""

from __future__ import annotations

from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request
from pydantic import Field

from llmos.api.auth import require_role
from llmos.api.body import AdminBody, parse_body
from llmos.api.state import app_state
from llmos.errors import NotFoundError
from llmos.registry.datasets import load_rows, rows_of_split, show_dataset, store_rows
from llmos.registry.views import VersionView
from llmos.security.principal import Principal

router = APIRouter(prefix="/admin")


class DatasetRequest(AdminBody):
    name: str = Field(min_length=1, max_length=300)
    rows: list[dict[str, Any]] = Field(min_length=1)


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
    views = await to_thread.run_sync(lambda: app_state(request).registry.list_versions(kind="dataset"))
    data = [_dataset_dict(v) for v in views if caller.may_see(v.tenant_id)]
    return {"object": "list", "data": data}


@router.get("/datasets/{name:path}/preview")
async def preview_dataset(request: Request, name: str, rows: int = 5, split: str | None = None) -> dict[str, Any]:
    caller = require_role(request, "developer")
    registry = app_state(request).registry
    _visible_dataset(caller, await to_thread.run_sync(show_dataset, registry, name), name)
    _, all_rows = await to_thread.run_sync(load_rows, registry, name)
    return {"object": "list", "data": rows_of_split(all_rows, split)[: max(0, min(rows, 1000))]}


@router.get("/datasets/{name:path}")
async def get_dataset(request: Request, name: str) -> dict[str, Any]:
    caller = require_role(request, "developer")
    view = await to_thread.run_sync(show_dataset, app_state(request).registry, name)
    return _dataset_dict(_visible_dataset(caller, view, name))


@router.post("/datasets")
async def create_dataset(request: Request) -> dict[str, Any]:
    caller = require_role(request, "developer")
    body = await parse_body(request, DatasetRequest, app_state(request).settings.max_request_bytes)
    state = app_state(request)

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
    state = app_state(request)
    _visible_dataset(caller, await to_thread.run_sync(show_dataset, state.registry, name), name)
    await to_thread.run_sync(state.registry.remove, name)
    state.security.audit(caller.actor, caller.tenant, "data.rm", name, "ok")
    return {"id": name, "object": "dataset", "deleted": True}
