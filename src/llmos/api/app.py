"""The FastAPI application of ``llmos serve``.

Contract: :func:`create_app` wires settings, a :class:`~llmos.runtime.manager.ModelManager`, metrics, error
mapping and middleware, and mounts the OpenAI routes, ``/health``, ``/metrics`` and the admin routes. Models named
in ``preload`` are loaded in a background thread at startup; ``/health`` answers 503 until they are ready (and 500
with the reason if one failed), then 200. Shutdown stops every engine.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from llmos.api import errors
from llmos.api.middleware import RequestContextMiddleware
from llmos.api.openai.routes import router as openai_router
from llmos.api.state import AppState
from llmos.config import Settings
from llmos.engine.core import EngineStats
from llmos.errors import LlmosError
from llmos.observability.metrics import CONTENT_TYPE, Metrics
from llmos.runtime.manager import ModelManager


def create_app(settings: Settings, preload: Iterable[str] = ()) -> FastAPI:
    holder: dict[str, ModelManager] = {}

    def engine_stats() -> list[tuple[str, EngineStats]]:
        manager = holder.get("manager")
        return [(r.model.name, r.model.engine.stats()) for r in manager.resident()] if manager else []

    metrics = Metrics(engine_stats)
    manager = ModelManager(settings, step_listener=metrics.observe_step)
    holder["manager"] = manager
    state = AppState(settings=settings, manager=manager, metrics=metrics, preload=list(preload))

    def load_preloads() -> None:
        try:
            for name in state.preload:
                manager.get(name)
        except LlmosError as exc:
            state.preload_error = exc.message
        finally:
            state.ready.set()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=load_preloads, name="llmos-preload", daemon=True).start()
        try:
            yield
        finally:
            await to_thread.run_sync(manager.close)

    app = FastAPI(title="llmos", version="0.1.0", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.llmos = state
    errors.install(app)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    app.include_router(openai_router)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not state.ready.is_set():
            return JSONResponse({"status": "loading", "models": state.preload}, status_code=503)
        if state.preload_error:
            return JSONResponse({"status": "error", "error": state.preload_error}, status_code=500)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        body = await to_thread.run_sync(metrics.render)
        return Response(body, media_type=CONTENT_TYPE)

    @app.get("/admin/runtime")
    async def runtime(request: Request) -> dict[str, Any]:
        models = []
        for resident in manager.resident():
            stats = resident.model.engine.stats()
            models.append(
                {
                    "name": resident.model.name,
                    "digest": resident.model.view.digest,
                    "backend": "llama.cpp",
                    "size": resident.model.view.size,
                    "loaded_at": resident.loaded_at,
                    "load_seconds": round(resident.load_seconds, 3),
                    "slots": resident.model.backend.n_seq_max,
                    "context_per_sequence": resident.model.engine.max_context,
                    "running": stats.running,
                    "waiting": stats.waiting,
                    "kv_cells_used": stats.kv_cells_used,
                    "kv_cells_total": stats.kv_cells_total,
                    "generated_tokens": stats.generated_tokens,
                    "prompt_tokens": stats.prompt_tokens,
                    "finished": stats.finished,
                }
            )
        return {"models": models}

    return app
