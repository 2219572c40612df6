"""What the HTTP handlers share: settings, the model manager, metrics, readiness."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from llmos.config import Settings
from llmos.observability.metrics import Metrics
from llmos.runtime.manager import ModelManager


@dataclass
class AppState:
    settings: Settings
    manager: ModelManager
    metrics: Metrics
    preload: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    preload_error: str | None = None
