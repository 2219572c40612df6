"""The FastAPI application of ``llmos serve``.

Contract: :func:`create_app` wires settings, the registry, a :class:`~llmos.runtime.residency.Residency` memory
manager with its :class:`~llmos.runtime.loader.Loader`, metrics, tracing (when the OTEL environment asks for it),
error mapping and middleware, and mounts the OpenAI routes, ``/health``, ``/ready``, ``/metrics``, the admin
routes and the registry transfer routes (``/v1/registry``). Models named in ``preload`` are loaded in a background
thread at startup; ``/ready`` answers 503 until they are ready (see :mod:`llmos.api.health`), ``/health`` 200 as long
as the process serves. Shutdown unloads every model.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response

from llmos.api import errors, openapi
from llmos.api.admin import router as admin_router
from llmos.api.anthropic.routes import router as anthropic_router
from llmos.api.auth import AuthMiddleware
from llmos.api.console import router as console_router
from llmos.api.datasets import router as datasets_router
from llmos.api.health import router as health_router
from llmos.api.jobs import router as jobs_router
from llmos.api.middleware import HardeningMiddleware, RequestContextMiddleware
from llmos.api.models import router as models_router
from llmos.api.ollama.routes import router as ollama_router
from llmos.api.openai.embeddings import router as embeddings_router
from llmos.api.openai.routes import router as openai_router
from llmos.api.pipelines import router as pipelines_router
from llmos.api.responses.routes import router as responses_router
from llmos.api.state import AppState
from llmos.api.transfer import router as transfer_router
from llmos.config import Settings
from llmos.engine.core import EngineStats
from llmos.errors import BackendUnavailableError, LlmosError
from llmos.jobs.service import JobService
from llmos.observability.metrics import CONTENT_TYPE, Metrics
from llmos.observability.tracing import Tracing
from llmos.registry.peers import FrontEnds, advertised_url
from llmos.registry.service import Registry
from llmos.runtime.failures import FailureLog, ModelFailure
from llmos.runtime.launcher import Launcher
from llmos.runtime.loader import Loader
from llmos.runtime.memory import process_rss
from llmos.runtime.model import LoadedModel
from llmos.runtime.replicas import ReplicaSet
from llmos.runtime.residency import Residency
from llmos.security.budgets import BudgetLedger
from llmos.security.quotas import QuotaManager
from llmos.security.service import SecurityService

log = logging.getLogger(__name__)


def _make_loader(
    settings: Settings,
    registry: Registry,
    overrides: dict[str, str] | None,
    replicas: dict[str, int] | None,
    metrics: Metrics,
    failures: FailureLog,
) -> Loader:
    """The local loader (each model in a process of its own unless ``model_processes`` is off), or with
    ``ray_address`` set, one that runs model replicas on the Ray cluster."""
    if not settings.ray_address:
        launcher = Launcher(settings) if settings.model_processes else None
        return Loader(
            settings,
            registry,
            overrides=overrides,
            replicas=replicas,
            step_listener=metrics.observe_step,
            launcher=launcher,
            failures=failures,
        )
    from llmos.distributed.cluster import LocalCluster, connect
    from llmos.distributed.serving import RayLoader

    address = settings.ray_address
    if address == "auto":
        info = LocalCluster(settings.home).info()
        if info is None:
            raise BackendUnavailableError("no Ray cluster runs for this home; start one with `llmos cluster start`")
        address = info.address
    connect(address, settings.home / "ray" / "home", allow_remote=settings.ray_allow_remote)
    return RayLoader(
        settings,
        registry,
        overrides=overrides,
        replicas=replicas,
        min_replicas=settings.ray_min_replicas,
        max_replicas=settings.ray_max_replicas,
    )


def _cause(failure: ModelFailure) -> str:
    """The metric label of a failure: ``SIGSEGV``, ``exit_1``, ``hang`` (plus ``_recovered`` for a safe-path
    restart that lost no request)."""
    if failure.signal is not None and not failure.reason.startswith("stopped answering"):
        cause = failure.signal
    elif failure.exit_code is not None:
        cause = f"exit_{failure.exit_code}"
    else:
        cause = "hang" if failure.reason.startswith("stopped answering") else "unknown"
    return cause + ("_recovered" if failure.recovered else "")


def create_app(
    settings: Settings,
    preload: Iterable[str] = (),
    *,
    pinned: Iterable[str] = (),
    backend_overrides: dict[str, str] | None = None,
    replicas: dict[str, int] | None = None,
) -> FastAPI:
    holder: dict[str, Residency] = {}

    def engine_stats() -> list[tuple[str, EngineStats]]:
        residency = holder.get("residency")
        stats: list[tuple[str, EngineStats]] = []
        for entry in residency.snapshot() if residency is not None else []:
            instance = entry.instance
            replicas = instance.replicas if isinstance(instance, ReplicaSet) else [instance]
            for index, replica in enumerate(replicas):
                if isinstance(replica, LoadedModel):
                    label = entry.view.name if len(replicas) == 1 else f"{entry.view.name}#{index}"
                    stats.append((label, replica.engine.stats()))
        return stats

    def memory() -> tuple[int, int, list[tuple[str, str, int]]]:
        residency = holder.get("residency")
        if residency is None:
            return 0, process_rss(), []
        return residency.budget, process_rss(), [(e.view.name, e.backend, e.reserved) for e in residency.snapshot()]

    jobs = JobService(settings)
    metrics = Metrics(engine_stats, memory, jobs=jobs.gauges, home=settings.home)
    tracing = Tracing.from_env()
    registry = Registry(settings)
    failures = FailureLog(lambda failure: metrics.model_crashed(failure.model, _cause(failure)))
    failures.restart_listener = metrics.model_restarted
    loader = _make_loader(settings, registry, backend_overrides, replicas, metrics, failures)
    residency = Residency(
        settings,
        registry,
        loader,
        backend_for=loader.backend_for,
        listener=metrics,
        pinned=pinned,
        estimator=loader.estimate,
        prepare=loader.prepare,
        failures=failures,
    )
    holder["residency"] = residency
    security = SecurityService(settings)
    front_ends = FrontEnds(registry.session, settings.job_lease_seconds)
    registry.blob_fetcher = front_ends.fetch_blob  # versions another front end registered: bytes from there
    security.peer_authenticator = front_ends.authenticate
    ledger = BudgetLedger(security.session, security.scope_usage_since, holder=front_ends.id)
    quotas = QuotaManager(security.scope_usage_since, security.unrecorded, ledger)
    metrics.watch_records(security.record_counts)
    state = AppState(settings, registry, loader, residency, metrics, security, quotas, preload=list(preload))

    def load_preloads() -> None:
        try:
            for name in state.preload:
                residency.lease(name, keep_alive=-1 if name in set(pinned) else None).release()
        except LlmosError as exc:
            state.preload_error = exc.message
        finally:
            state.ready.set()

    stop_dispatch = threading.Event()

    def dispatch_jobs() -> None:
        """Start queued jobs and mark jobs whose worker died as interrupted (resumed when they auto-resume)."""
        while not stop_dispatch.is_set():
            try:
                jobs.dispatch()
            except Exception:
                log.exception("job dispatch failed")
            try:
                front_ends.heartbeat()
                ledger.release_dead(front_ends.live_ids())
            except Exception as exc:  # the database is unreachable: /ready says so; peers see this one go stale
                log.warning("front-end heartbeat failed: %s", type(exc).__name__)
            stop_dispatch.wait(min(settings.job_dispatch_seconds, settings.job_lease_seconds / 3))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            front_ends.register(advertised_url(settings.host, settings.port, settings.advertise_url))
        except Exception as exc:
            log.warning("could not register this front end for its peers: %s", type(exc).__name__)
        threading.Thread(target=load_preloads, name="llmos-preload", daemon=True).start()
        threading.Thread(target=dispatch_jobs, name="llmos-jobs", daemon=True).start()
        try:
            yield
        finally:
            stop_dispatch.set()
            with contextlib.suppress(Exception):
                front_ends.unregister()
            jobs.close()
            await to_thread.run_sync(ledger.close)
            await to_thread.run_sync(residency.close)
            if loader.launcher is not None:
                await to_thread.run_sync(loader.launcher.close)
            await to_thread.run_sync(security.close)
            registry.close()
            tracing.shutdown()

    app = FastAPI(title="llmos", version="0.1.0", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.llmos = state
    app.state.jobs = jobs
    errors.install(app)
    app.add_middleware(AuthMiddleware, security=security)
    if settings.cors_origins:  # off unless origins are listed
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["authorization", "content-type"],
        )
    app.add_middleware(
        HardeningMiddleware, max_header_bytes=settings.max_header_bytes, read_seconds=settings.request_read_seconds
    )
    app.add_middleware(RequestContextMiddleware, metrics=metrics, tracing=tracing)  # outermost: ids, logs, metrics
    app.include_router(openai_router)
    app.include_router(embeddings_router)
    app.include_router(responses_router)
    app.include_router(anthropic_router)
    app.include_router(ollama_router)
    app.include_router(admin_router)
    app.include_router(datasets_router)
    app.include_router(jobs_router)
    app.include_router(pipelines_router)
    app.include_router(transfer_router)  # /v1/registry: push and pull between llmos servers
    app.include_router(models_router)  # after pipelines: /admin/models/{name}/history is matched first
    app.include_router(console_router)
    app.include_router(health_router)  # /health (alive) and /ready (preloads, database, disk)

    @app.get("/metrics")
    async def prometheus() -> Response:
        body = await to_thread.run_sync(metrics.render)
        return Response(body, media_type=CONTENT_TYPE)

    openapi.standard(app)
    return app
