"""Model replicas as Ray actors behind the same residency manager and HTTP front end as local replicas.

Contract:

* :class:`RayLoader` wraps the local :class:`~llmos.runtime.loader.Loader`: for a generation model it returns a
  :class:`RayReplicaSet`, a :class:`~llmos.runtime.replicas.ReplicaSet` whose replicas are
  :class:`~llmos.runtime.model.LoadedModel` objects backed by a :class:`ReplicaActor` each (placed by Ray with the
  ``SPREAD`` strategy, ``ray_replica_cpus`` CPUs (its compute threads) and the model's estimated memory as
  resources). Residency (load on demand, LRU
  eviction, keep-alive) is unchanged: loading the set starts its actors, evicting it kills them.
* **Blobs through the registry**: an actor never reads the front end's files. It asks the
  :class:`~llmos.distributed.blobs.BlobServer` actor, pinned to the front end's node, for each blob of the version
  it lacks in its node-local store (:func:`~llmos.distributed.blobs.fetch_version`, which Ray training ranks use
  too), writes it with the blob store's digest check (a corrupt transfer is refused), and loads from that
  node-local copy. Node-local means the Ray node's own llmos home (``LLMOS_HOME`` of the node's processes, which
  ``llmos cluster start|join`` sets): the actor runs with the front end's settings but that home and probe cache
  (:func:`node_settings`), and reports its node id, node address and how many blobs it fetched.
* **Routing and retries**: :meth:`ReplicaSet.pick` sends a request to the live replica with the fewest outstanding
  requests. A request whose replica dies before it produced a token is resubmitted to another live replica (at most
  twice); one that already streamed text ends with an ``EngineStoppedError`` event. A dead replica is replaced in
  the background.
* **Autoscaling**: between ``min_replicas`` and ``max_replicas``: a replica is added when requests wait beyond the
  replicas' slots for two checks in a row, and one is removed after ``idle_seconds`` with nothing outstanding
  (``ray_scale_down_seconds``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

from llmos.config import Settings
from llmos.distributed.blobs import BlobServer, fetch_version, node_dir
from llmos.engine.backends.base import Backend
from llmos.engine.core import EngineCore, EngineStats
from llmos.engine.request import GenerationOutput, GenerationRequest
from llmos.engine.streams import OutputStream
from llmos.errors import EngineStoppedError, LlmosError, ModelLoadError
from llmos.registry.service import Registry, ResolvedModel
from llmos.registry.views import VersionView
from llmos.runtime.channel import portable_error, rebuild_error
from llmos.runtime.loader import Loader
from llmos.runtime.model import LoadedModel
from llmos.runtime.remote import BackendClient, EngineClient
from llmos.runtime.replicas import ReplicaSet

log = logging.getLogger("llmos.distributed")

MAX_RETRIES = 2
RESERVATION_SECONDS = 10.0
"""How long a routing decision counts toward a replica's load before its request is submitted."""


# --- actors (run in Ray worker processes) -----------------------------------------------------------------------------


class _BatchingStream(OutputStream):
    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[GenerationOutput] = queue.SimpleQueue()

    def push(self, output: GenerationOutput) -> None:
        self.queue.put(output)

    def batches(self) -> Iterator[list[GenerationOutput]]:
        """Everything available at once (one Ray object per step under load, not one per token)."""
        while True:
            batch = [self.queue.get()]
            while True:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            yield batch
            if batch[-1].finished:
                return


def _portable(output: GenerationOutput) -> GenerationOutput:
    """Errors travel as :func:`~llmos.runtime.channel.portable_error`: llmos exceptions do not all pickle with their
    arguments."""
    if output.error is not None:
        output.state_error = portable_error(output.error)  # type: ignore[attr-defined]
        output.error = None
    return output


def node_settings(settings: Settings) -> Settings:
    """The front end's settings with this Ray node's own paths: its llmos home (``LLMOS_HOME`` of the node's
    processes, else :func:`~llmos.distributed.blobs.node_dir`) and probe cache; never the front end's paths, which
    need not exist on this machine."""
    home = os.environ.get("LLMOS_HOME")
    probes = os.environ.get("LLMOS_PROBE_CACHE_DIR")
    return settings.model_copy(
        update={
            "home": Path(home).expanduser() if home else node_dir(),
            "probe_cache_dir": Path(probes).expanduser() if probes else None,
        }
    )


class ReplicaActor:
    """One engine replica: fetches its model's blobs into the node-local store, loads it, generates."""

    def __init__(
        self, settings: Settings, view: VersionView, files: list[tuple[str, str]], backend: str, blob_server: Any
    ) -> None:
        import ray

        resolved, directory, self.fetched = fetch_version(blob_server, view, files)
        loader = Loader(node_settings(settings), cast(Registry, None))
        self.model: LoadedModel = loader.load_from(resolved, backend, directory)
        self.node = ray.get_runtime_context().get_node_id()
        self.node_ip = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]

    def info(self) -> dict[str, Any]:
        backend = self.model.backend
        return {
            "n_vocab": backend.n_vocab,
            "n_seq_max": backend.n_seq_max,
            "n_ctx_seq": self.model.engine.max_context,
            "backend_name": self.model.backend_name,
            "pid": os.getpid(),
            "node": self.node,
            "node_ip": self.node_ip,
            "fetched_blobs": self.fetched,
        }

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return self.model.backend.tokenize(text, add_special=add_special, parse_special=parse_special)

    def token_bytes(self, token: int) -> bytes:
        return self.model.backend.token_bytes(token)

    def detokenize(self, tokens: list[int]) -> str:
        return self.model.backend.detokenize(tokens)

    def generate(self, request: GenerationRequest) -> Iterator[list[GenerationOutput]]:
        stream = _BatchingStream()
        try:
            self.model.engine.submit(request, stream)
        except LlmosError as exc:
            failed = GenerationOutput(request.request_id, finished=True, finish_reason="error", error=exc)
            yield [_portable(failed)]
            return
        for batch in stream.batches():
            yield [_portable(output) for output in batch]

    def abort(self, request_id: str) -> None:
        self.model.engine.abort(request_id)

    def stats(self) -> EngineStats:
        return self.model.engine.stats()

    def close(self) -> None:
        self.model.close()


# --- the front end's view of a replica --------------------------------------------------------------------------------


class RemoteBackend(BackendClient):
    """Tokenization answered by the replica (or, if it just died, by another one of the same model); the fields
    the API reads are cached at start."""

    def __init__(self, actor: Any, info: dict[str, Any], alternatives: Callable[[], list[Any]]) -> None:
        super().__init__(info, f"ray:{info['backend_name']}")
        self._actor = actor
        self._alternatives = alternatives

    def _call(self, method: str, *args: Any) -> Any:
        import ray

        for actor in [self._actor, *(a for a in self._alternatives() if a is not self._actor)]:
            try:
                return ray.get(getattr(actor, method).remote(*args), timeout=60)
            except Exception as exc:  # this replica died or timed out: any other one tokenizes the same way
                log.warning("replica call %s failed (%s); trying another replica", method, type(exc).__name__)
        raise EngineStoppedError("no replica of this model answers; retry")

    def bind_adapter(self, seq_id: int, adapter: str | None) -> None:
        raise NotImplementedError("adapters are not served through Ray yet")


Resubmit = Callable[["RemoteEngine", GenerationRequest, OutputStream, int], bool]


class RemoteEngine(EngineClient):
    """The engine interface the API uses (submit / abort / stats), forwarded to a :class:`ReplicaActor`."""

    def __init__(self, actor: Any, info: dict[str, Any], name: str, resubmit: Resubmit) -> None:
        super().__init__(name, info["n_ctx_seq"])
        self.actor = actor
        self.info = info
        self._resubmit = resubmit
        self._lock = threading.Lock()
        self._outstanding = 0
        self._reserved: collections.deque[float] = collections.deque()

    @property
    def outstanding(self) -> int:
        """Requests submitted and not finished, plus those routed here in the last seconds but still tokenizing."""
        horizon = time.monotonic() - RESERVATION_SECONDS
        with self._lock:
            while self._reserved and self._reserved[0] < horizon:
                self._reserved.popleft()
            return self._outstanding + len(self._reserved)

    def reserve(self) -> None:
        """Count a request routed here before it is submitted (its prompt is tokenized in between)."""
        with self._lock:
            self._reserved.append(time.monotonic())

    def submit(self, request: GenerationRequest, stream: OutputStream, attempt: int = 0) -> None:
        if not self.alive:  # it died while the prompt was tokenized: hand the request to a live replica
            if attempt < MAX_RETRIES and self._resubmit(self, request, stream, attempt + 1):
                return
            raise EngineStoppedError(f"a replica of {self.name} stopped; retry")
        with self._lock:
            if self._reserved:
                self._reserved.popleft()
            self._outstanding += 1
        threading.Thread(target=self._pump, args=(request, stream, attempt), daemon=True).start()

    def _pump(self, request: GenerationRequest, stream: OutputStream, attempt: int) -> None:
        import ray

        produced = False
        try:
            generator = self.actor.generate.options(num_returns="streaming").remote(request)
            for ref in generator:
                now = time.monotonic()
                for output in ray.get(ref):
                    skew = now - output.time  # the replica's clock need not be ours
                    output.time = now
                    if output.admitted_at is not None:
                        output.admitted_at += skew
                    state_error = getattr(output, "state_error", None)
                    if state_error is not None:
                        output.error = rebuild_error(*state_error)
                    produced = produced or bool(output.token_ids or output.text)
                    stream.push(output)
        except Exception as exc:  # the actor died (or its node): retry a request that produced nothing yet
            self.crashed = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("replica of %s failed: %s", self.name, self.crashed)
            if produced or attempt >= MAX_RETRIES or not self._resubmit(self, request, stream, attempt + 1):
                stream.push(
                    GenerationOutput(
                        request.request_id,
                        finished=True,
                        finish_reason="error",
                        error=EngineStoppedError(f"the replica serving {self.name} failed; retry"),
                    )
                )
        finally:
            with self._lock:
                self._outstanding -= 1

    def abort(self, request_id: str) -> None:
        if self.alive:
            self.actor.abort.remote(request_id)

    def stats(self) -> EngineStats:
        import ray

        if not self.alive:
            return EngineStats()
        try:
            return cast(EngineStats, ray.get(self.actor.stats.remote(), timeout=5))
        except ray.exceptions.ActorDiedError as exc:  # its node or process is gone: the next pick replaces it
            self.crashed = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("replica of %s is dead: %s", self.name, self.crashed)
            return EngineStats()
        except Exception as exc:  # a replica that just died or is too busy to answer in time: no figures this time
            log.warning("replica of %s did not report its stats (%s)", self.name, type(exc).__name__)
            return EngineStats()

    def shutdown(self, timeout: float = 30.0) -> None:
        import ray

        self._closed = True
        with contextlib.suppress(Exception):  # a dead actor has nothing left to close
            ray.get(self.actor.close.remote(), timeout=timeout)
        ray.kill(self.actor, no_restart=True)


# --- the replica set ------------------------------------------------------------------------------------------------


class RayReplicaSet(ReplicaSet):
    def __init__(
        self,
        view: VersionView,
        factory: Callable[[], LoadedModel],
        *,
        min_replicas: int,
        max_replicas: int,
        check_seconds: float = 2.0,
        idle_seconds: float = 60.0,
    ) -> None:
        super().__init__(view, factory, min_replicas)
        self.min_replicas = min_replicas
        self.max_replicas = max(max_replicas, min_replicas)
        self.scale_events: list[tuple[float, int]] = []
        self._check_seconds = check_seconds
        self._idle_seconds = idle_seconds
        self._stop = threading.Event()
        if self.max_replicas > self.min_replicas:
            threading.Thread(target=self._autoscale, daemon=True, name=f"llmos-autoscale-{view.name}").start()

    def pick(self) -> LoadedModel:
        replica = super().pick()
        cast(RemoteEngine, replica.engine).reserve()
        return replica

    def resubmit(self, failed: RemoteEngine, request: GenerationRequest, stream: OutputStream, attempt: int) -> bool:
        """Send a request whose replica died before its first token to another live replica."""
        try:
            replica = self.pick()
        except LlmosError:
            return False
        engine = cast(RemoteEngine, replica.engine)
        if engine is failed:
            return False
        try:
            engine.submit(request, stream, attempt)
        except LlmosError:
            return False
        log.info("request %s resubmitted to another replica of %s (attempt %d)", request.request_id, self.name, attempt)
        return True

    def _autoscale(self) -> None:
        pressure = 0
        idle_since = time.monotonic()
        while not self._stop.wait(self._check_seconds):
            with self._lock:
                live = [r for r in self.replicas if r.engine.alive]
            outstanding = sum(r.engine.outstanding for r in live)
            slots = sum(r.backend.n_seq_max for r in live)
            pressure = pressure + 1 if outstanding > slots else 0
            if outstanding:
                idle_since = time.monotonic()
            if pressure >= 2 and len(self.replicas) < self.max_replicas:
                pressure = 0
                self._add()
            elif time.monotonic() - idle_since > self._idle_seconds and len(self.replicas) > self.min_replicas:
                idle_since = time.monotonic()
                self._remove()

    def _add(self) -> None:
        try:
            replica = self._factory()
        except Exception:
            log.exception("adding a replica of %s failed", self.name)
            return
        with self._lock:
            if self._closed:
                replica.close()
                return
            self.replicas.append(replica)
            self.scale_events.append((time.monotonic(), len(self.replicas)))
        log.info("%s scaled up to %d replicas", self.name, len(self.replicas))

    def _remove(self) -> None:
        with self._lock:
            idle = [r for r in self.replicas if r.engine.outstanding == 0]
            if not idle or len(self.replicas) <= self.min_replicas:
                return
            victim = idle[-1]
            self.replicas.remove(victim)
            self.scale_events.append((time.monotonic(), len(self.replicas)))
        victim.close()
        log.info("%s scaled down to %d replicas", self.name, len(self.replicas))

    def close(self) -> None:
        self._stop.set()
        super().close()


class RayLoader(Loader):
    """A :class:`Loader` whose generation models run as replica actors on the Ray cluster."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        *,
        min_replicas: int = 1,
        max_replicas: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(settings, registry, **kwargs)
        import ray

        self._ray = ray
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        here = ray.get_runtime_context().get_node_id()
        strategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node_id=here, soft=False)
        self.blob_server = (
            ray.remote(BlobServer).options(num_cpus=0, scheduling_strategy=strategy).remote(self.settings)
        )

    def estimate(self, view: VersionView, backend: str) -> int:
        return super().estimate(view, backend) // max(self.replicas.get(view.repository, 1), 1) * self.min_replicas

    def __call__(self, resolved: ResolvedModel, backend: str) -> Any:
        if backend == "sentence-transformers" or resolved.view.details.get("task") == "embedding":
            return self._load(resolved, backend)
        count = max(self.replicas.get(resolved.view.repository, self.min_replicas), 1)
        holder: list[RayReplicaSet] = []

        def resubmit(failed: RemoteEngine, request: GenerationRequest, stream: OutputStream, attempt: int) -> bool:
            return bool(holder) and holder[0].resubmit(failed, request, stream, attempt)

        def live_actors() -> list[Any]:
            replicas = list(holder[0].replicas) if holder else []
            return [cast(RemoteEngine, r.engine).actor for r in replicas if r.engine.alive]

        def factory() -> LoadedModel:
            return self.start_replica(resolved, backend, resubmit, live_actors)

        replica_set = RayReplicaSet(
            resolved.view,
            factory,
            min_replicas=count,
            max_replicas=max(self.max_replicas, count),
            check_seconds=self.settings.ray_scale_check_seconds,
            idle_seconds=self.settings.ray_scale_down_seconds,
        )
        holder.append(replica_set)
        return replica_set

    def start_replica(
        self, resolved: ResolvedModel, backend: str, resubmit: Resubmit, live_actors: Callable[[], list[Any]]
    ) -> LoadedModel:
        ray = self._ray
        view = resolved.view
        files = [(file.path, file.digest) for file in view.files]
        memory = max(super().estimate(view, backend) // max(self.replicas.get(view.repository, 1), 1), 1)
        cpus = self.settings.ray_replica_cpus
        replica_settings = self.settings.model_copy(update={"threads": cpus})
        actor = (
            ray.remote(ReplicaActor)
            .options(num_cpus=cpus, memory=memory, max_concurrency=512, scheduling_strategy="SPREAD", max_restarts=0)
            .remote(replica_settings, view, files, backend, self.blob_server)
        )
        try:
            info = ray.get(actor.info.remote(), timeout=self.settings.memory_wait_seconds + 600)
        except Exception as exc:
            ray.kill(actor, no_restart=True)
            raise ModelLoadError(f"a replica of {view.name} failed to start: {type(exc).__name__}") from exc
        log.info("replica of %s started on node %s (pid %s)", view.name, info["node"][:8], info["pid"])
        engine = RemoteEngine(actor, info, view.name, resubmit)
        backend_view = RemoteBackend(actor, info, live_actors)
        return LoadedModel(view, cast(Backend, backend_view), cast(EngineCore, engine))
