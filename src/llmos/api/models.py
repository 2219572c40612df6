"""Model routes for people and tools beyond the OpenAI surface: the caller's identity, models with details, tagging.

Contract: ``GET /admin/me`` names the caller (actor, tenant, role) for any valid key, so clients such as the web
console can show only what the role allows. ``GET /admin/models`` lists every model tag the caller may see with its
details (format, size, quantization, tags, lineage); ``GET /admin/models/{name}`` adds the parent chain as a graph
(nodes and edges, newest first), the version's evaluation reports and its latest compression report.
``POST /admin/models/tag`` with ``{"source", "target"}`` points a tag at a version (admins only: a tag decides which
version every tenant's requests reach); the move is recorded in the tag history and audited. Models the caller may not
see give the same 404 as a model that does not exist.
"""

from __future__ import annotations

from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Request
from pydantic import Field

from llmos.api.auth import principal, require_role, visible_view, visible_views
from llmos.api.body import AdminBody, parse_body
from llmos.api.state import app_state
from llmos.errors import LlmosError
from llmos.evaluation.compression import latest_report
from llmos.evaluation.reports import reports
from llmos.registry.service import Registry
from llmos.registry.views import VersionView

router = APIRouter(prefix="/admin")
LINEAGE_DEPTH = 12
"""How many generations of parents a model's graph shows."""


class TagRequest(AdminBody):
    source: str = Field(min_length=1, max_length=300, description="The version to tag (name:tag or name@digest).")
    target: str = Field(min_length=1, max_length=300, description="The new tag, as name:tag.")


def _model_dict(view: VersionView) -> dict[str, Any]:
    data = view.to_dict()
    data["short_digest"] = view.short_digest
    return data


@router.get("/me")
async def me(request: Request) -> dict[str, Any]:
    caller = principal(request)
    auth = await to_thread.run_sync(app_state(request).security.auth_required)
    return {"actor": caller.actor, "tenant": caller.tenant, "role": caller.role, "auth": auth}


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    caller = require_role(request, "consumer")
    views = await to_thread.run_sync(lambda: app_state(request).registry.list_versions(kind="model"))
    visible = visible_views(caller, views)
    return {"object": "list", "data": [_model_dict(v) for v in visible]}


def _label(view: VersionView) -> str:
    """``name:tag`` where the version has a tag (also when it was found by digest), else ``name@digest``."""
    if view.tag is None and view.tags:
        return f"{view.repository}:{view.tags[0]}"
    return view.name


def lineage_graph(registry: Registry, view: VersionView, depth: int = LINEAGE_DEPTH) -> dict[str, Any]:
    """The version and its ancestors as ``{"nodes": [...], "edges": [...]}`` (edges point parent → child)."""
    nodes: dict[str, dict[str, Any]] = {}
    edges: list[dict[str, Any]] = []
    frontier = [view]
    for _ in range(depth):
        following: list[VersionView] = []
        for current in frontier:
            nodes.setdefault(
                current.digest, {"digest": current.digest, "name": _label(current), "format": current.format}
            )
            for parent in current.lineage:
                if parent.parent_digest is None:
                    continue
                edges.append({"from": parent.parent_digest, "to": current.digest, "operation": parent.operation})
                if parent.parent_digest in nodes:
                    continue
                try:
                    found = registry.show(f"{current.repository}@{parent.parent_digest}")
                except LlmosError:
                    found = None
                if found is None and parent.parent_name:
                    try:
                        found = registry.show(parent.parent_name)
                    except LlmosError:
                        found = None
                if found is not None and found.digest == parent.parent_digest:
                    following.append(found)
                else:  # removed since, or stored under another name: a node without details
                    name = parent.parent_name or parent.parent_digest
                    nodes[parent.parent_digest] = {"digest": parent.parent_digest, "name": name, "format": None}
        if not following:
            break
        frontier = following
    return {"nodes": list(nodes.values()), "edges": edges}


@router.get("/models/{name:path}")
async def get_model(request: Request, name: str) -> dict[str, Any]:
    caller = require_role(request, "consumer")
    state = app_state(request)
    view = visible_view(caller, await to_thread.run_sync(state.registry.show, name), name)

    def details() -> dict[str, Any]:
        data = _model_dict(view)
        data["graph"] = lineage_graph(state.registry, view)
        evaluations = [r.to_dict() for r in reports(state.settings, task=None, digests={view.digest})]
        data["evaluations"] = [e for e in reversed(evaluations) if e.get("task") != "compression"][:50]
        data["compression"] = latest_report(state.registry, view.digest)
        return data

    return await to_thread.run_sync(details)


@router.post("/models/tag")
async def tag_model(request: Request) -> dict[str, Any]:
    caller = require_role(request, "admin")
    state = app_state(request)
    body = await parse_body(request, TagRequest, state.settings.max_request_bytes)
    tagged = await to_thread.run_sync(
        lambda: state.registry.tag(body.source, body.target, reason=f"tag ({caller.actor})")
    )
    state.security.audit(caller.actor, caller.tenant, "model.tag", tagged.name, "ok")
    return _model_dict(tagged)
