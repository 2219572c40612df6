"""What the HTTP handlers share: settings, the registry, the memory manager, metrics, readiness."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmos.config import Settings
from llmos.observability.metrics import Metrics
from llmos.registry.service import Registry
from llmos.runtime.loader import Loader
from llmos.runtime.residency import Residency
from llmos.security.quotas import QuotaManager
from llmos.security.service import SecurityService

if TYPE_CHECKING:
    from starlette.requests import Request

    from llmos.jobs.service import JobService


@dataclass
class AppState:
    settings: Settings
    registry: Registry
    loader: Loader
    residency: Residency
    metrics: Metrics
    security: SecurityService
    quotas: QuotaManager
    preload: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    preload_error: str | None = None


def app_state(request: Request) -> AppState:
    """The state of the app serving ``request`` (set by the app factory)."""
    state: AppState = request.app.state.llmos
    return state


def job_service(request: Request) -> JobService:
    """The job queue of the app serving ``request`` (set by the app factory)."""
    jobs: JobService = request.app.state.jobs
    return jobs
