"""Several engine instances of one model on one machine, with least-outstanding-requests routing.

Contract: a :class:`ReplicaSet` holds N independent :class:`~llmos.runtime.model.LoadedModel` replicas (each its
own backend, KV cache and engine thread) and is resident as one unit. :meth:`ReplicaSet.pick` returns the live
replica with the fewest queued + running requests. A replica whose engine died has already failed its in-flight
requests cleanly (they get an error event); it is skipped by :meth:`pick` and rebuilt in the background by the
factory, so new requests keep flowing to the others. This is the interface a multi-machine replica set implements.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from llmos.errors import EngineStoppedError
from llmos.registry.views import VersionView
from llmos.runtime.model import LoadedModel

log = logging.getLogger("llmos.runtime")


class ReplicaSet:
    kind = "generate"

    def __init__(
        self,
        view: VersionView,
        factory: Callable[[], LoadedModel],
        count: int,
        *,
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        self.view = view
        self._factory = factory
        self._on_restart = on_restart
        self._lock = threading.Lock()
        self.replicas: list[LoadedModel] = [factory() for _ in range(count)]
        self._restarting: set[int] = set()
        self.restarts = 0
        self._closed = False

    @property
    def name(self) -> str:
        return self.view.name

    @property
    def backend_name(self) -> str:
        return self.replicas[0].backend_name

    @property
    def alive(self) -> bool:
        """A replica set heals itself (dead replicas are rebuilt by :meth:`pick`): it is never replaced whole."""
        return not self._closed

    @property
    def resident_bytes(self) -> int:
        return sum(replica.resident_bytes for replica in self.replicas)

    def pick(self) -> LoadedModel:
        with self._lock:
            live = []
            for index, replica in enumerate(self.replicas):
                if replica.engine.alive:
                    live.append(replica)
                elif index not in self._restarting and not self._closed:
                    self._restarting.add(index)
                    threading.Thread(target=self._restart, args=(index,), daemon=True).start()
        if not live:
            raise EngineStoppedError(f"every replica of {self.name} is restarting; retry shortly")
        return min(live, key=lambda r: r.engine.outstanding)

    def _restart(self, index: int) -> None:
        old = self.replicas[index]
        log.warning("replica %d of %s died (%s); restarting it", index, self.name, old.engine.crashed)
        try:
            old.close()
            replacement = self._factory()
        except Exception:
            log.exception("restarting replica %d of %s failed", index, self.name)
            with self._lock:
                self._restarting.discard(index)
            return
        with self._lock:
            if self._closed:
                replacement.close()
                return
            self.replicas[index] = replacement
            self._restarting.discard(index)
            self.restarts += 1
        if self._on_restart is not None:
            self._on_restart(self.name)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            replicas = list(self.replicas)
        for replica in replicas:
            replica.close()
