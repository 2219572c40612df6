"""Registry transfer routes: another llmos pushes versions here, or pulls them from here (``llmos push`` / ``pull``).

Contract (in the spirit of the OCI distribution protocol; every route needs a developer or admin key):

* ``GET /v1/registry/{models|datasets}/{name}/manifest``: the version's transfer document (manifest, blob list,
  lineage; see :mod:`llmos.registry.transfer`). A version the key may not see is a 404, as everywhere else.
* ``GET /v1/registry/blobs/{digest}``: the blob's plaintext (decrypted when stored encrypted), ``Range: bytes=N-``
  answered with 206 for resuming; only for a blob of a version the key may see (else 404).
  ``HEAD /v1/registry/blobs/{digest}``: 200 when a register call by this key may name the blob (it is in a version
  the key may see, or this key's tenant uploaded it completely), else 404.
* ``GET /v1/registry/uploads/{digest}``: ``{"offset", "complete"}``: bytes of an upload received so far (resume from
  ``offset``). ``PATCH /v1/registry/uploads/{digest}?offset=N&size=TOTAL`` appends the body (at most
  :data:`UPLOAD_REQUEST_MAX` bytes per request, streamed to disk, never held in memory) at exactly ``offset`` (409
  with the right offset otherwise). The request that completes the blob verifies its sha256: a mismatch is a 400
  (``param: digest``), the upload is discarded and audited. Uploads are staged per tenant outside the blob store.
* ``POST /v1/registry/{models|datasets}`` with a transfer document (its ``name`` is the name to register) registers
  the version owned by the key's tenant, with its lineage and tag, when every blob is present and verified;
  otherwise 400 and nothing is registered. The version id is the sender's (the manifest is rebuilt and compared).
"""

from __future__ import annotations

import re
import shutil
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.requests import ClientDisconnect

from llmos.api.auth import require_role
from llmos.api.body import parse_json, read_body
from llmos.api.state import AppState, app_state
from llmos.errors import DiskFullError, InvalidInputError, ModelNotFoundError, NotFoundError, PayloadTooLargeError
from llmos.registry.transfer import (
    KINDS,
    Staging,
    commit,
    kind_of,
    parse_document,
    read_range,
    version_document,
    versions_with_blob,
)
from llmos.registry.views import VersionView
from llmos.security.principal import Principal
from llmos.store.blobs import validate_digest

router = APIRouter(prefix="/v1/registry")
UPLOAD_REQUEST_MAX = 64 * 1024 * 1024
"""Most bytes one PATCH may carry; clients send blobs in chunks (each request must also beat the read deadline)."""
WRITE_BATCH = 1024 * 1024
_RANGE = re.compile(r"^bytes=(\d+)-$")


def _readable(caller: Principal, view: VersionView) -> bool:
    if not caller.may_see(view.tenant_id):
        return False
    return kind_of(view) == "dataset" or caller.may_use(view.repository, view.name)


def _staging(state: AppState, caller: Principal) -> Staging:
    owner = "local" if caller.tenant_id is None else f"tenant-{caller.tenant_id}"
    return Staging(state.settings.home / "transfers" / "uploads" / owner)


def _kind(kind: str) -> str:
    if kind not in KINDS:
        raise NotFoundError(f"unknown registry collection {kind!r}; use models or datasets")
    return KINDS[kind]


def _readable_sizes(state: AppState, caller: Principal, digest: str) -> int | None:
    """The blob's size when some version the caller may see names it, else None."""
    for view in versions_with_blob(state.registry, digest):
        if _readable(caller, view):
            return next(f.size for f in view.files if f.digest == digest)
    return None


@router.get("/blobs/{digest}", include_in_schema=False)  # binary, resumable: not a JSON operation
async def get_blob(request: Request, digest: str) -> Response:
    caller = require_role(request, "developer")
    state = app_state(request)
    validate_digest(digest)
    size = await to_thread.run_sync(_readable_sizes, state, caller, digest)
    if size is None or not state.registry.blobs.exists(digest):
        raise NotFoundError(f"blob {digest} not found")
    start = 0
    requested = request.headers.get("range")
    if requested:
        match = _RANGE.match(requested.strip())
        if match is None:
            raise InvalidInputError("only 'Range: bytes=N-' is supported", param="range")
        start = int(match.group(1))
        if start > size:
            return Response(status_code=416, headers={"content-range": f"bytes */{size}"})
    headers = {"content-length": str(size - start), "x-llmos-digest": digest, "accept-ranges": "bytes"}
    if requested:
        headers["content-range"] = f"bytes {start}-{size - 1}/{size}" if size else f"bytes */{size}"
    return StreamingResponse(
        read_range(state.registry.blobs, digest, start),
        status_code=206 if requested else 200,
        media_type="application/octet-stream",
        headers=headers,
    )


def _usable(state: AppState, caller: Principal, digest: str) -> bool:
    return state.registry.blobs.exists(digest) and _readable_sizes(state, caller, digest) is not None


@router.head("/blobs/{digest}", include_in_schema=False)
async def head_blob(request: Request, digest: str) -> Response:
    caller = require_role(request, "developer")
    state = app_state(request)
    validate_digest(digest)
    staged = _staging(state, caller).complete(digest)
    present = staged is not None or await to_thread.run_sync(_usable, state, caller, digest)
    return Response(status_code=200 if present else 404, headers={"x-llmos-digest": digest})


def _upload_status(staging: Staging, digest: str, present: bool) -> dict[str, Any]:
    complete = present or staging.complete(digest) is not None
    return {"digest": digest, "offset": staging.received(digest), "complete": complete, "in_store": present}


@router.get("/uploads/{digest}")
async def upload_status(request: Request, digest: str) -> dict[str, Any]:
    caller = require_role(request, "developer")
    state = app_state(request)
    validate_digest(digest)
    present = await to_thread.run_sync(_usable, state, caller, digest)
    return _upload_status(_staging(state, caller), digest, present)


@router.patch("/uploads/{digest}")
async def upload_chunk(
    request: Request,
    digest: str,
    offset: int = Query(ge=0, le=2**62),
    size: int = Query(ge=0, le=2**62),
) -> dict[str, Any]:
    caller = require_role(request, "developer")
    state = app_state(request)
    validate_digest(digest)
    staging = _staging(state, caller)
    if staging.complete(digest) is not None:
        return _upload_status(staging, digest, False)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > UPLOAD_REQUEST_MAX:
        raise PayloadTooLargeError(f"send blobs in chunks of at most {UPLOAD_REQUEST_MAX} bytes per request")
    free = shutil.disk_usage(state.settings.home).free
    if free < 2 * size - offset:  # staged copy + the store's copy at registration
        raise DiskFullError(f"not enough free disk space here for a blob of {size} bytes")
    with staging.append(digest, offset, size) as appender:
        pending = bytearray()
        received = 0
        try:
            async for piece in request.stream():
                received += len(piece)
                if received > UPLOAD_REQUEST_MAX:
                    appender.handle.truncate(appender.start)
                    raise PayloadTooLargeError(f"send blobs in chunks of at most {UPLOAD_REQUEST_MAX} bytes")
                pending += piece
                if len(pending) >= WRITE_BATCH:
                    await to_thread.run_sync(appender.write, bytes(pending))
                    pending.clear()
            if pending:
                await to_thread.run_sync(appender.write, bytes(pending))
        except ClientDisconnect:  # what arrived (in order) stays; the client resumes from the new offset
            await to_thread.run_sync(appender.finish)
            return {"digest": digest, "offset": appender.offset, "complete": False, "in_store": False}
        try:
            complete = await to_thread.run_sync(appender.finish)
        except InvalidInputError as exc:
            state.security.audit(caller.actor, caller.tenant, "blob.upload", digest, "rejected", reason=exc.message)
            raise
    return {"digest": digest, "offset": appender.offset, "complete": complete, "in_store": False}


@router.get("/{kind}/{name:path}/manifest")
async def get_manifest(request: Request, kind: str, name: str) -> dict[str, Any]:
    caller = require_role(request, "developer")
    wanted = _kind(kind)
    state = app_state(request)
    view = await to_thread.run_sync(state.registry.show, name)
    if kind_of(view) != wanted or not _readable(caller, view):
        raise ModelNotFoundError(f"{wanted} {name!r} not found")
    return version_document(view)


@router.post("/{kind}")
async def register(request: Request, kind: str) -> dict[str, Any]:
    caller = require_role(request, "developer")
    wanted = _kind(kind)
    state = app_state(request)
    document = parse_document(parse_json(await read_body(request, state.settings.max_request_bytes)), kind=wanted)
    staging = _staging(state, caller)

    def run() -> VersionView:
        return commit(
            state.registry,
            document,
            staging,
            usable=lambda digest: _readable_sizes(state, caller, digest) is not None,
            tenant_id=caller.tenant_id,
        )

    view = await to_thread.run_sync(run)
    action = "data.receive" if wanted == "dataset" else "model.receive"
    state.security.audit(caller.actor, caller.tenant, action, view.name, "ok")
    return {"kind": wanted, **view.to_dict()}
