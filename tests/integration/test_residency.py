"""The residency manager with a real registry and instances that really hold memory (measured RSS, not estimates)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from llmos.config import Settings
from llmos.errors import InsufficientMemoryError, InvalidInputError, ModelUnavailableError, OverloadedError
from llmos.registry.service import Registry, ResolvedModel
from llmos.registry.views import VersionView
from llmos.runtime.memory import parse_size
from llmos.runtime.residency import Residency, parse_keep_alive
from tests.helpers import gguf_bytes

MB = 1024 * 1024


class Ballast:
    """An instance that holds ``size`` bytes of touched memory until closed."""

    def __init__(self, view: VersionView, size: int) -> None:
        self.view = view
        self.backend_name = "ballast"
        self.data: bytearray | None = bytearray(b"\x01" * size)
        self.closed = False

    def close(self) -> None:
        self.data = None
        self.closed = True


class Events:
    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []

    def loaded(self, model: str, backend: str, seconds: float, bytes_used: int) -> None:
        self.log.append(("load", model))

    def unloaded(self, model: str, backend: str, reason: str) -> None:
        self.log.append((reason, model))


@pytest.fixture
def registry(settings: Settings, tmp_path: Path) -> Registry:
    registry = Registry(settings)
    for index, name in enumerate(("a", "b", "c")):
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(gguf_bytes(tensors=[(f"t{index}", (32 * (index + 1),), 0)]))
        registry.import_path(path, name)
    return registry


def make(settings: Settings, registry: Registry, budget: str, *, sizes: dict[str, int] | None = None,
         keep_alive: str = "5m", pinned: tuple[str, ...] = (), wait_s: float = 0.5,
         load_delay: float = 0.0) -> tuple[Residency, Events, list[str]]:  # fmt: skip
    sizes = sizes or {"a": 60 * MB, "b": 60 * MB, "c": 60 * MB}
    loads: list[str] = []
    events = Events()

    def loader(resolved: ResolvedModel, backend: str) -> Ballast:
        loads.append(resolved.view.repository)
        time.sleep(load_delay)
        return Ballast(resolved.view, sizes[resolved.view.repository])

    configured = settings.model_copy(
        update={"memory_budget": budget, "keep_alive": keep_alive, "memory_wait_seconds": wait_s}
    )
    residency = Residency(
        configured,
        registry,
        loader,
        backend_for=lambda _view: "ballast",
        listener=events,
        pinned=pinned,
        estimator=lambda view, _backend: sizes[view.repository],
    )
    return residency, events, loads


def resident(residency: Residency) -> list[str]:
    return sorted(e.view.repository for e in residency.snapshot())


def test_loads_on_demand_and_evicts_least_recently_used(settings: Settings, registry: Registry) -> None:
    residency, events, loads = make(settings, registry, "150MiB")
    try:
        residency.lease("a").release()
        residency.lease("b").release()
        assert resident(residency) == ["a", "b"]
        residency.lease("a").release()  # a is now more recent than b
        residency.lease("c").release()
        assert resident(residency) == ["a", "c"]
        assert ("budget", "b:latest") in events.log
        assert loads == ["a", "b", "c"]
        assert residency.used() <= residency.budget
    finally:
        residency.close()


def test_measured_cost_replaces_the_estimate(settings: Settings, registry: Registry) -> None:
    residency, _events, _loads = make(settings, registry, "1GiB", sizes={"a": 120 * MB, "b": 1, "c": 1})
    try:
        residency.lease("a").release()
        (entry,) = residency.snapshot()
        assert entry.measured is not None and entry.measured > 100 * MB  # the bytes really held, as RSS growth
        assert residency.estimate(entry.view, "ballast") == entry.reserved
    finally:
        residency.close()


def test_a_model_in_use_is_never_evicted(settings: Settings, registry: Registry) -> None:
    residency, _events, _loads = make(settings, registry, "100MiB", wait_s=0.3)
    try:
        lease = residency.lease("a")
        with pytest.raises(OverloadedError, match="models in use"):
            residency.lease("b")
        assert resident(residency) == ["a"] and not lease.instance.closed
        lease.release()
        residency.lease("b").release()  # now a can go
        assert resident(residency) == ["b"]
    finally:
        residency.close()


def test_a_waiting_request_gets_memory_when_it_is_released(settings: Settings, registry: Registry) -> None:
    residency, _events, _loads = make(settings, registry, "100MiB", wait_s=5.0)
    try:
        lease = residency.lease("a")
        threading.Timer(0.3, lease.release).start()
        started = time.monotonic()
        residency.lease("b").release()
        assert time.monotonic() - started >= 0.25
    finally:
        residency.close()


def test_concurrent_first_requests_load_once(settings: Settings, registry: Registry) -> None:
    residency, _events, loads = make(settings, registry, "1GiB", load_delay=0.6, wait_s=0.1)
    try:
        leases = []
        threads = [threading.Thread(target=lambda: leases.append(residency.lease("a"))) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(leases) == 8  # waiting for someone else's load is not bounded by the memory wait
        assert loads == ["a"]
        assert len({id(lease.instance) for lease in leases}) == 1
        for lease in leases:
            lease.release()
    finally:
        residency.close()


def test_keep_alive_zero_forever_and_default(settings: Settings, registry: Registry) -> None:
    residency, events, _loads = make(settings, registry, "1GiB", keep_alive="0.3s")
    try:
        residency.lease("a").release(keep_alive=0)
        assert resident(residency) == []
        assert ("keep_alive", "a:latest") in events.log
        residency.lease("b").release(keep_alive=-1)
        residency.lease("c").release()  # the default: 0.3 s
        time.sleep(1.5)
        assert resident(residency) == ["b"]
        assert ("expired", "c:latest") in events.log
    finally:
        residency.close()


def test_pinned_models_are_never_evicted(settings: Settings, registry: Registry) -> None:
    residency, _events, _loads = make(settings, registry, "130MiB", pinned=("a",), wait_s=0.2)
    try:
        residency.lease("a").release(keep_alive=0)
        residency.lease("b").release()
        residency.lease("c").release()
        assert "a" in resident(residency)
    finally:
        residency.close()


def test_a_model_larger_than_the_budget_fails_with_the_numbers(settings: Settings, registry: Registry) -> None:
    residency, _events, loads = make(settings, registry, "1KiB")
    try:
        with pytest.raises(InsufficientMemoryError, match=r"needs about .* more than the whole memory budget"):
            residency.lease("a")
        assert loads == []
    finally:
        residency.close()


def test_damaged_or_missing_files_are_refused_naming_the_model(settings: Settings, registry: Registry) -> None:
    residency, _events, loads = make(settings, registry, "1GiB")
    try:
        blob = registry.resolve("a").primary_path
        blob.write_bytes(blob.read_bytes()[:-1] + b"\x07")
        with pytest.raises(ModelUnavailableError, match=r"a:latest .* damaged"):
            residency.lease("a")
        registry.resolve("b").primary_path.unlink()
        with pytest.raises(ModelUnavailableError, match=r"b:latest .* missing"):
            residency.lease("b")
        residency.lease("c").release()  # the others still serve
        assert loads == ["c"]
    finally:
        residency.close()


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("5m", 300.0), ("1h30m", 5400.0), ("90s", 90.0), ("250ms", 0.25), (0, 0.0), ("0", 0.0), (-1, -1.0),
     ("-1m", -1.0), (12.5, 12.5), (None, None)],
)  # fmt: skip
def test_keep_alive_grammar(value: object, seconds: float | None) -> None:
    assert parse_keep_alive(value) == seconds  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["soon", "5 minutes", "m5", True, float("nan"), "", "1h30"])
def test_keep_alive_garbage_is_refused(value: object) -> None:
    with pytest.raises(InvalidInputError, match="keep_alive"):
        parse_keep_alive(value)  # type: ignore[arg-type]


def test_memory_sizes() -> None:
    assert parse_size("8GB") == 8 * 1000**3
    assert parse_size("512MiB") == 512 * MB
    assert parse_size("50%", total=1000) == 500
    for bad in ("lots", "150%", "-3GB", "8XB"):
        with pytest.raises(InvalidInputError):
            parse_size(bad)


def test_a_dead_instance_is_loaded_afresh_by_the_next_lease_until_it_keeps_crashing(
    settings: Settings, registry: Registry
) -> None:
    from llmos.errors import ModelRestartingError
    from llmos.runtime.failures import FREE_RESTARTS, FailureLog, ModelFailure

    residency, events, loads = make(settings, registry, "1GiB")
    failures = FailureLog()
    residency.failures = failures
    try:
        with residency.lease("a") as lease:
            first = lease.instance
        for crash in range(FREE_RESTARTS):
            first.alive = False  # its process died
            failures.record(ModelFailure("a:latest", 1, "killed by SIGSEGV", "SIGSEGV", None, [], 0.5))
            with residency.lease("a") as lease:
                assert lease.instance is not first and getattr(lease.instance, "alive", True)
            assert first.closed and loads == ["a"] * (crash + 2)
            first = lease.instance
        assert failures.restarts == {"a:latest": FREE_RESTARTS}
        assert ("crashed", "a:latest") in events.log

        first.alive = False  # one crash too many in a row: a back-off before the next start
        failures.record(ModelFailure("a:latest", 1, "killed by SIGSEGV", "SIGSEGV", None, [], 0.5))
        with pytest.raises(ModelRestartingError) as refused:
            residency.lease("a")
        assert "SIGSEGV" in refused.value.message and 0 < refused.value.retry_after <= 1
        assert len(loads) == FREE_RESTARTS + 1
        time.sleep(refused.value.retry_after)
        with residency.lease("a") as lease:
            assert lease.instance is not first
    finally:
        residency.close()
