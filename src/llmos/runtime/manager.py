"""The set of loaded models a server runs, keyed by registry version.

Contract: :meth:`ModelManager.get` resolves a name through the registry and returns the loaded model for that
version, loading it on first use. Concurrent first requests for the same version cause exactly one load; the
others wait for it. Names that resolve to the same version share one loaded model. Loading runs in the calling
thread (the API calls it from a worker thread, never on the event loop). :meth:`ModelManager.close` stops every
engine. Memory budgets and eviction build on this (see the residency work).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from llmos.config import Settings
from llmos.engine.core import StepStats
from llmos.errors import EngineStoppedError
from llmos.registry.service import Registry
from llmos.runtime.model import LoadedModel, load


@dataclass
class ResidentModel:
    model: LoadedModel
    loaded_at: float
    load_seconds: float


class ModelManager:
    def __init__(
        self,
        settings: Settings,
        registry: Registry | None = None,
        *,
        step_listener: Callable[[str, StepStats], None] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry or Registry(settings)
        self.step_listener = step_listener
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Event] = {}
        self._resident: dict[str, ResidentModel] = {}
        self._closed = False

    def get(self, name: str) -> LoadedModel:
        """The loaded model ``name`` resolves to (loading it if needed). Raises ModelNotFoundError for unknown names."""
        if self._closed:
            raise EngineStoppedError("the server is shutting down")
        resolved = self.registry.resolve(name)
        digest = resolved.view.digest
        while True:
            with self._lock:
                resident = self._resident.get(digest)
                if resident is not None:
                    return resident.model
                waiter = self._loading.get(digest)
                if waiter is None:
                    waiter = threading.Event()
                    self._loading[digest] = waiter
                    break
            waiter.wait()
        try:
            started = time.monotonic()
            listener = self.step_listener
            model_name = resolved.view.name
            model = load(
                resolved,
                self.settings,
                step_listener=(lambda stats: listener(model_name, stats)) if listener else None,
            )
            with self._lock:
                self._resident[digest] = ResidentModel(model, time.time(), time.monotonic() - started)
            return model
        finally:
            with self._lock:
                self._loading.pop(digest, None)
            waiter.set()

    def resident(self) -> list[ResidentModel]:
        with self._lock:
            return list(self._resident.values())

    def close(self) -> None:
        with self._lock:
            models, self._resident = list(self._resident.values()), {}
            self._closed = True
        for resident in models:
            resident.model.close()
        self.registry.close()
