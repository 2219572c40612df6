"""The memory manager: which models are resident, under one byte budget.

Contract:

* :meth:`Residency.lease` returns a :class:`Lease` on a loaded instance of the version a name resolves to, loading
  it on first use. Given a :class:`~llmos.registry.views.VersionView` (a name the caller already resolved and
  authorised), it leases exactly that version, by its digest: a tag moved since is not followed. Instances are keyed
  by digest and backend, so concurrent first requests for the same version cause exactly one load, whatever name
  they used.
* Every resident model is accounted at the larger of its estimate (from its metadata) and its *measured* cost
  (RSS growth of the load, after one-time library imports); a measurement above the estimate also raises later
  estimates of the same version. Lazily mapped weights make a load's RSS growth an underestimate, hence the max.
  Before a load, idle models (no lease held) are evicted least-recently-used first until the new one fits. A model
  with leases in flight is never evicted: the request waits up to ``wait_s`` for memory, then gets
  :class:`~llmos.errors.OverloadedError` (503). A model larger than the whole budget fails at once with
  :class:`~llmos.errors.InsufficientMemoryError` naming both numbers.
* Keep-alive follows Ollama: each release sets the model's expiry to ``now + keep_alive`` (the request's value, else
  the default); ``0`` unloads it as soon as it is idle, a negative value keeps it until evicted. Pinned models are
  never evicted and never expire. A reaper thread unloads expired idle models.
* An instance whose engine or model process died (``alive`` False) is dropped by the next lease of its version,
  which loads it afresh, unless the model keeps crashing: then the lease is refused with
  :class:`~llmos.errors.ModelRestartingError` until the back-off of the
  :class:`~llmos.runtime.failures.FailureLog` has passed.
* Loads and unloads are reported to an optional listener (metrics). Instances are closed outside the lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from llmos.config import Settings
from llmos.errors import (
    EngineStoppedError,
    InsufficientMemoryError,
    InvalidInputError,
    ModelLoadError,
    ModelRestartingError,
    ModelUnavailableError,
    NotFoundError,
    OverloadedError,
)
from llmos.registry.service import Registry, ResolvedModel
from llmos.registry.views import VersionView
from llmos.runtime.failures import FailureLog
from llmos.runtime.memory import estimate_bytes, human, parse_size, process_rss, release_freed_memory

FOREVER = -1.0


class Instance(Protocol):
    view: VersionView
    backend_name: str

    def close(self) -> None: ...


def alive(instance: object) -> bool:
    """Whether an instance still serves (one whose engine or model process died reports ``alive`` False)."""
    return bool(getattr(instance, "alive", True))


Loader = Callable[[ResolvedModel, str], Instance]
"""Builds an instance of a resolved version on the named backend."""


class ResidencyListener(Protocol):
    def loaded(self, model: str, backend: str, seconds: float, bytes_used: int) -> None: ...

    def unloaded(self, model: str, backend: str, reason: str) -> None: ...


@dataclass(eq=False)
class Entry:
    key: str
    view: VersionView
    backend: str
    reserved: int
    pinned: bool = False
    state: str = "loading"
    instance: Instance | None = None
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    expires_at: float | None = None
    """Monotonic deadline; None = never."""
    loaded_at: float = 0.0
    load_seconds: float = 0.0
    measured: int | None = None


class Lease:
    """A claim on a resident instance; the model cannot be evicted until :meth:`release`."""

    def __init__(self, residency: Residency, entry: Entry) -> None:
        self._residency = residency
        self._entry = entry
        self._released = False
        assert entry.instance is not None
        self.instance: Any = entry.instance

    def release(self, keep_alive: float | None = None) -> None:
        if not self._released:
            self._released = True
            self._residency._release(self._entry, keep_alive)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def parse_keep_alive(value: str | float | int | None) -> float | None:
    """Seconds from Ollama-style keep-alive: ``"5m"``, ``"1h30m"``, ``"90s"``, numbers (seconds); negative = forever."""
    from llmos.errors import InvalidInputError

    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidInputError("keep_alive must be a duration such as '5m', a number of seconds, 0 or -1")
    if isinstance(value, int | float):
        if value != value or value in (float("inf"), float("-inf")):
            raise InvalidInputError("keep_alive must be finite", param="keep_alive")
        return FOREVER if value < 0 else float(value)
    text = str(value).strip().lower()
    if text.startswith("-"):
        return FOREVER
    import re

    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise InvalidInputError(
            f"invalid keep_alive {value!r}: use a duration such as '5m' or '1h30m', seconds, 0 or -1",
            param="keep_alive",
        )
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


class Residency:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        loader: Loader,
        *,
        backend_for: Callable[[VersionView], str],
        listener: ResidencyListener | None = None,
        pinned: Iterable[str] = (),
        estimator: Callable[[VersionView, str], int] | None = None,
        prepare: Callable[[str], None] | None = None,
        failures: FailureLog | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.loader = loader
        self.backend_for = backend_for
        self.listener = listener
        self.estimator = estimator
        self.prepare = prepare
        """Called before measuring a load, so one-time costs (importing a backend's libraries) are not charged to
        the first model that happens to use them."""
        self.budget = parse_size(settings.memory_budget)
        self.default_keep_alive = parse_keep_alive(settings.keep_alive)
        self.wait_s = settings.memory_wait_seconds
        self.failures = failures
        """Model process crashes: how long a model that keeps crashing waits before it is started again."""
        self._pinned_names = list(pinned)
        self._pinned_digests: set[str] = set()
        self._cond = threading.Condition()
        self._load_lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self._measured: dict[str, int] = {}
        self._closed = False
        self._reaper = threading.Thread(target=self._reap, name="llmos-residency-reaper", daemon=True)
        self._reaper.start()

    # --- accounting -------------------------------------------------------------------------------------------------

    def used(self) -> int:
        with self._cond:
            return sum(e.reserved for e in self._entries.values())

    def estimate(self, view: VersionView, backend: str) -> int:
        if self.estimator is not None:
            predicted = self.estimator(view, backend)
        else:
            predicted = estimate_bytes(
                backend=backend,
                file_size=view.size,
                parameter_count=view.parameter_count,
                details=view.details,
                kv_tokens=0,
            )
        return max(predicted, self._measured.get(f"{view.digest}/{backend}", 0))

    # --- leasing ----------------------------------------------------------------------------------------------------

    def lease(self, name: str | VersionView, keep_alive: float | None = None) -> Lease:
        """A lease on the loaded model ``name`` resolves to (loading it, and evicting idle ones, if needed).

        ``name`` may be a resolved view: then the lease is on that very version (``repository@digest``), never on
        whatever its tag names by now.
        """
        if self._closed:
            raise EngineStoppedError("the server is shutting down")
        # present; its bytes are re-hashed when it is loaded (_load)
        if isinstance(name, VersionView):  # by digest; the view keeps the caller's name (logs, /admin/runtime)
            resolved = replace(self.registry.resolve(f"{name.repository}@{name.digest}"), view=name)
        else:
            resolved = self.registry.resolve(name)
        view = resolved.view
        backend = self.backend_for(view)
        key = f"{view.digest}/{backend}"
        deadline = time.monotonic() + self.wait_s
        victims: list[Entry] | None = []
        dead: list[Entry] = []
        try:
            with self._cond:
                while True:
                    entry = self._entries.get(key)
                    if entry is not None and entry.state == "ready" and not alive(entry.instance):
                        self._forget_dead(entry, view)  # its process died: load it afresh
                        dead.append(entry)
                        continue
                    if entry is not None and entry.state == "ready":
                        entry.in_flight += 1
                        return Lease(self, entry)
                    if entry is not None:  # being loaded by another request: wait for that load, however long
                        self._cond.wait()
                        continue
                    estimate = self.estimate(view, backend)
                    if estimate > self.budget:
                        raise InsufficientMemoryError(
                            f"{view.name} needs about {human(estimate)} on {backend}, more than the whole memory"
                            f" budget of {human(self.budget)} (LLMOS_MEMORY_BUDGET)"
                        )
                    victims = self._make_room(estimate)
                    if victims is not None:
                        entry = Entry(key, view, backend, estimate, pinned=self._is_pinned(view, view.name))
                        self._entries[key] = entry
                        break
                    self._wait(deadline, view, "models in use hold the memory it needs")
        finally:
            for crashed in dead:  # its requests have already failed; what is left is to reap its process
                self._close(crashed, "crashed")
        for victim in victims or []:
            self._close(victim, "budget")
        if dead and self.failures is not None:
            self.failures.restarted(view.name)
        return self._load(entry, resolved, keep_alive)

    def _forget_dead(self, entry: Entry, view: VersionView) -> None:
        """Under the lock: drop the entry of an instance that died, unless the model must first wait out the
        back-off of one that keeps crashing (then the request is refused with the time to wait)."""
        wait = self.failures.backoff(view.name) if self.failures is not None else 0.0
        if wait > 0:
            last = self.failures.last(view.name) if self.failures is not None else None
            why = f" (last: {last.reason})" if last is not None else ""
            raise ModelRestartingError(
                f"{view.name} keeps crashing{why}; it is restarted in {wait:.0f} s", retry_after=wait
            )
        entry.state = "unloading"
        del self._entries[entry.key]
        self._cond.notify_all()

    def _wait(self, deadline: float, view: VersionView, why: str) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise OverloadedError(
                f"{view.name} cannot be loaded now: {why} (budget {human(self.budget)}, in use"
                f" {human(sum(e.reserved for e in self._entries.values()))}); retry shortly",
                retry_after=5.0,
            )
        self._cond.wait(remaining)

    def _make_room(self, needed: int) -> list[Entry] | None:
        """Pick idle models to evict (LRU first) so ``needed`` bytes fit; None if even that is not enough."""
        used = sum(e.reserved for e in self._entries.values())
        if used + needed <= self.budget:
            return []
        idle = sorted(
            (e for e in self._entries.values() if e.state == "ready" and e.in_flight == 0 and not e.pinned),
            key=lambda e: e.last_used,
        )
        chosen: list[Entry] = []
        for entry in idle:
            if used + needed <= self.budget:
                break
            chosen.append(entry)
            used -= entry.reserved
        if used + needed > self.budget:
            return None
        for entry in chosen:
            entry.state = "unloading"
            del self._entries[entry.key]
        return chosen

    def _load(self, entry: Entry, resolved: ResolvedModel, keep_alive: float | None) -> Lease:
        try:
            self.registry.check_integrity(resolved)  # every load re-hashes the files: no stat cache to fool
            with self._load_lock:
                if self.prepare is not None:
                    self.prepare(entry.backend)
                release_freed_memory()
                before = process_rss()
                started = time.monotonic()
                instance = self.loader(resolved, entry.backend)
                seconds = time.monotonic() - started
                release_freed_memory()  # transient load buffers (file maps, copies) are not the model's cost
                # what the load added here, plus what it holds in its own model process(es)
                measured = max(process_rss() - before, 0) + int(getattr(instance, "resident_bytes", 0))
        except BaseException as exc:
            with self._cond:
                self._entries.pop(entry.key, None)
                self._cond.notify_all()
            if isinstance(exc, ModelLoadError):
                raise ModelUnavailableError(f"{entry.view.name} failed to load: {exc.message}") from exc
            raise
        victims: list[Entry] = []
        with self._cond:
            entry.instance = instance
            entry.state = "ready"
            entry.measured = measured
            entry.reserved = max(measured, entry.reserved, 1)
            entry.loaded_at = time.time()
            entry.load_seconds = seconds
            entry.in_flight += 1
            entry.expires_at = self._expiry(keep_alive)
            self._measured[entry.key] = measured
            over = sum(e.reserved for e in self._entries.values()) - self.budget
            if over > 0:  # the estimate was low: make up for it with idle models, oldest first
                for other in sorted(self._entries.values(), key=lambda e: e.last_used):
                    if over <= 0:
                        break
                    if other is not entry and other.state == "ready" and other.in_flight == 0 and not other.pinned:
                        other.state = "unloading"
                        del self._entries[other.key]
                        victims.append(other)
                        over -= other.reserved
            self._cond.notify_all()
        for victim in victims:
            self._close(victim, "budget")
        if self.listener is not None:
            self.listener.loaded(entry.view.name, entry.backend, seconds, entry.reserved)
        return Lease(self, entry)

    def _expiry(self, keep_alive: float | None) -> float | None:
        seconds = self.default_keep_alive if keep_alive is None else keep_alive
        if seconds is None or seconds < 0:
            return None
        return time.monotonic() + seconds

    def _release(self, entry: Entry, keep_alive: float | None) -> None:
        unload_now = False
        with self._cond:
            entry.in_flight -= 1
            entry.last_used = time.monotonic()
            entry.expires_at = self._expiry(keep_alive)
            if entry.expires_at is not None and entry.in_flight == 0 and not entry.pinned:
                unload_now = entry.expires_at <= time.monotonic() and self._entries.get(entry.key) is entry
                if unload_now:
                    entry.state = "unloading"
                    del self._entries[entry.key]
            self._cond.notify_all()
        if unload_now:
            self._close(entry, "keep_alive")

    def _is_pinned(self, view: VersionView, requested: str) -> bool:
        if view.digest in self._pinned_digests:
            return True
        for name in self._pinned_names:
            try:
                if self.registry.show(name).digest == view.digest:
                    self._pinned_digests.add(view.digest)
                    return True
            except (NotFoundError, InvalidInputError):  # an unknown or malformed name pins nothing (a database
                continue  # error is not that: it propagates)
        return False

    # --- unloading --------------------------------------------------------------------------------------------------

    def unload(self, name: str) -> bool:
        """Unload the version ``name`` resolves to once it is idle (admin / keep_alive=0). True if it was resident."""
        digest = self.registry.show(name).digest
        found = False
        with self._cond:
            for entry in list(self._entries.values()):
                if entry.view.digest == digest:
                    found = True
                    entry.expires_at = time.monotonic()
                    entry.pinned = False
            self._cond.notify_all()
        self._reap_once()
        return found

    def _close(self, entry: Entry, reason: str) -> None:
        if entry.instance is not None:
            entry.instance.close()
            entry.instance = None
        release_freed_memory()
        if self.listener is not None:
            self.listener.unloaded(entry.view.name, entry.backend, reason)

    def _reap_once(self) -> None:
        now = time.monotonic()
        expired: list[Entry] = []
        with self._cond:
            for entry in list(self._entries.values()):
                if (
                    entry.state == "ready"
                    and entry.in_flight == 0
                    and not entry.pinned
                    and entry.expires_at is not None
                    and entry.expires_at <= now
                ):
                    entry.state = "unloading"
                    del self._entries[entry.key]
                    expired.append(entry)
            if expired:
                self._cond.notify_all()
        for entry in expired:
            self._close(entry, "expired")

    def _reap(self) -> None:
        while not self._closed:
            time.sleep(0.5)
            self._reap_once()

    # --- introspection and shutdown -----------------------------------------------------------------------------------

    def snapshot(self) -> list[Entry]:
        with self._cond:
            return [e for e in self._entries.values() if e.state == "ready"]

    def expires_in(self, entry: Entry) -> float | None:
        return None if entry.expires_at is None else max(0.0, entry.expires_at - time.monotonic())

    def close(self) -> None:
        self._closed = True
        with self._cond:
            entries, self._entries = list(self._entries.values()), {}
            self._cond.notify_all()
        for entry in entries:
            if entry.instance is not None:
                self._close(entry, "shutdown")
