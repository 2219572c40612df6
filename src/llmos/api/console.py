"""The web console at ``/console``: a single-page app that drives the same HTTP API as every other client.

Contract: ``/console/`` answers the app's ``index.html`` (never cached, so a new build is picked up at once) and
``/console/assets/...`` its content-hashed scripts and styles (cached for a year). These files hold no data and are
served without a key, like ``/health``; every piece of data the console shows comes from the authenticated API with
the key the user logs in with, so the console can never see more than that key could with ``curl``.
``/console/info.json`` tells the login page whether a key is needed. A strict Content-Security-Policy allows only
the console's own scripts and styles and connections back to this server.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

from llmos.api.state import AppState
from llmos.console import STATIC_DIR
from llmos.errors import NotFoundError

router = APIRouter(prefix="/console", include_in_schema=False)
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def _missing() -> NotFoundError:
    return NotFoundError("the web console is not built into this installation; run `make console` in a checkout")


def _index() -> Response:
    index = STATIC_DIR / "index.html"
    if not index.is_file():
        raise _missing()
    return FileResponse(index, headers={"cache-control": "no-cache", "content-security-policy": CSP})


@router.get("")
async def console_root() -> RedirectResponse:
    return RedirectResponse("/console/", status_code=307)


@router.get("/")
async def console_index() -> Response:
    return _index()


@router.get("/info.json")
async def console_info(request: Request) -> JSONResponse:
    state: AppState = request.app.state.llmos
    return JSONResponse({"auth_required": state.security.auth_required(), "version": request.app.version})


@router.get("/{path:path}")
async def console_file(path: str) -> Response:
    root = STATIC_DIR.resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        if "." not in Path(path).name:  # a client-side route reloaded in the browser: the app handles it
            return _index()
        raise NotFoundError(f"no console file {path!r}")
    cache = "public, max-age=31536000, immutable" if path.startswith("assets/") else "no-cache"
    return FileResponse(target, headers={"cache-control": cache, "content-security-policy": CSP})
