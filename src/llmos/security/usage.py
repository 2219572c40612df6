"""Usage records: committed before a request's response completes, in group commits, and never dropped.

Contract:

* :meth:`UsageLog.record` hands one record to a writer thread and returns a :class:`~concurrent.futures.Future`
  that resolves to True once the record is committed, or to False once its commit failed. Records handed in while a
  commit is under way share the next transaction (group commit): a request pays a share of one commit however many
  finish together, and nothing waits on a timer.
* Inside :func:`collecting` (the HTTP layer opens one per request), each record's future is also collected, and
  :func:`committed` waits for them: the response's remaining bytes are sent only after its usage is in the database
  (or known not to be), so a client holding a complete answer never has unrecorded spending.
* A record whose commit fails is kept pending, never dropped: the writer retries every pending record every
  ``retry_seconds`` together with newer ones, and mirrors them to ``<home>/usage-pending.jsonl`` (0600, replaced
  atomically) so that neither a restart nor a crash forgets them. The next process that opens the store replays
  that file (a lock on ``usage-pending.lock``, held while a process has pending records, keeps a live owner's
  records from being replayed twice). While a caller (key prefix, or None for the keyless local caller) has a
  pending record, :meth:`UsageLog.unrecorded` is True for it, and the quota manager refuses its requests.
* :attr:`UsageLog.failures` counts failed commits (retries included), :attr:`UsageLog.last_error` names the last
  error's type and :meth:`UsageLog.pending` the records waiting, for ``/metrics`` and ``/ready``.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from llmos.store.schema import UsageRecord, utcnow

log = logging.getLogger("llmos.security")
PENDING_FILE = "usage-pending.jsonl"
LOCK_FILE = "usage-pending.lock"
MAX_BATCH = 1000
_COLLECTED: ContextVar[list[Future[bool]] | None] = ContextVar("llmos_usage_commits", default=None)


@dataclass
class _Item:
    fields: dict[str, Any]
    future: Future[bool]


_STOP = _Item({}, Future())


@contextmanager
def collecting() -> Iterator[list[Future[bool]]]:
    """Collect the commit futures of every record made in this context (one HTTP request)."""
    futures: list[Future[bool]] = []
    token = _COLLECTED.set(futures)
    try:
        yield futures
    finally:
        _COLLECTED.reset(token)


async def committed(futures: list[Future[bool]]) -> None:
    """Wait until every collected record is committed or known to have failed (the writer resolves them all)."""
    while futures:
        await asyncio.wrap_future(futures.pop())


def _resolve(future: Future[bool], ok: bool) -> None:
    with suppress(InvalidStateError):  # the waiting request was cancelled meanwhile
        future.set_result(ok)


def _to_json(fields: dict[str, Any]) -> str:
    return json.dumps({k: v.isoformat() if isinstance(v, datetime) else v for k, v in fields.items()})


def _from_json(line: str) -> dict[str, Any]:
    fields = json.loads(line)
    if not isinstance(fields, dict):
        raise ValueError("a pending usage record is not an object")
    fields["created_at"] = datetime.fromisoformat(str(fields["created_at"]))
    return fields


class UsageLog:
    def __init__(self, sessions: Callable[[], Session], home: Path, retry_seconds: float = 1.0) -> None:
        self._sessions = sessions
        self._path = home / PENDING_FILE
        self._lock_path = home / LOCK_FILE
        self._retry = retry_seconds
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._pending: list[dict[str, Any]] = []
        """Records not in the database yet; only the writer thread changes it (init and close: when none runs)."""
        self._blocked: frozenset[str | None] = frozenset()
        self._lock_fd: int | None = None
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        self.failures = 0
        self.last_error: str | None = None
        self._adopt()

    # --- the request side -------------------------------------------------------------------------------------------

    def record(self, **fields: Any) -> Future[bool]:
        fields.setdefault("created_at", utcnow())
        future: Future[bool] = Future()
        self._ensure_writer()
        self._queue.put(_Item(fields, future))
        collected = _COLLECTED.get()
        if collected is not None:
            collected.append(future)
        return future

    def unrecorded(self, key_prefix: str | None) -> bool:
        """True while a record of this caller waits to be written (its requests must be refused meanwhile)."""
        return key_prefix in self._blocked

    def pending(self) -> int:
        return len(self._pending)

    # --- the writer -------------------------------------------------------------------------------------------------

    def _ensure_writer(self) -> None:
        with self._writer_lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._run, name="llmos-usage-writer", daemon=True)
                self._writer.start()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                item = self._queue.get(timeout=self._retry if self._pending else None)
            except queue.Empty:  # time to retry what is pending
                self._commit([])
                continue
            items: list[_Item] = []
            while True:  # everything that arrived during the previous commit goes into this one
                if item is _STOP:
                    stopping = True
                else:
                    items.append(item)
                if len(items) >= MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            self._commit(items)

    def _commit(self, items: list[_Item]) -> None:
        """Write the pending records and ``items`` in one transaction; resolve the items' futures either way."""
        rows = [*self._pending, *(item.fields for item in items)]
        ok = True
        try:
            if rows:
                with self._sessions() as session, session.begin():
                    session.add_all([UsageRecord(**fields) for fields in rows])
        except Exception as exc:
            ok = False
            self.failures += 1
            self.last_error = type(exc).__name__
            if items:
                log.error("could not write %d usage records (%s); they stay pending and are retried", len(rows),
                          type(exc).__name__)  # fmt: skip
        try:
            had_pending = bool(self._pending)
            self._pending = [] if ok else rows
            # blocked before the futures resolve: the response that waits on them completes only after its caller
            # is refused, so the caller's next request cannot slip through
            self._blocked = frozenset(fields.get("key_prefix") for fields in self._pending)
            if ok and had_pending:
                log.warning("pending usage records written; their keys are served again")
                self._release_file()
            elif not ok:
                self._spill()
        finally:
            for item in items:
                _resolve(item.future, ok)

    # --- the pending file -------------------------------------------------------------------------------------------

    def _own_lock(self) -> bool:
        if self._lock_fd is not None:
            return True
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live process owns the pending file
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _spill(self) -> None:
        """Mirror the pending records to the pending file (fsynced, replaced atomically)."""
        if not self._own_lock():  # another live process owns the file: these stay in memory, retried
            return
        temporary = self._path.with_name(self._path.name + ".tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.writelines(_to_json(fields) + "\n" for fields in self._pending)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self._path)
            directory = os.open(self._path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            log.error("could not save %d pending usage records (%s)", len(self._pending), type(exc).__name__)

    def _release_file(self) -> None:
        if self._lock_fd is not None:
            try:
                self._path.unlink(missing_ok=True)
            except OSError as exc:
                log.error("could not remove the pending usage file (%s)", type(exc).__name__)
        self._release_lock()

    def _adopt(self) -> None:
        """Replay the records a previous process left pending (if no live process owns them)."""
        if not self._path.exists() or not self._own_lock():
            return
        try:
            lines = self._path.read_text(encoding="utf-8").splitlines()
            self._pending = [_from_json(line) for line in lines if line.strip()]
        except (OSError, ValueError, KeyError) as exc:
            log.error("the pending usage file is unreadable (%s); it is kept, not replayed", type(exc).__name__)
            self._release_lock()
            return
        if not self._pending:
            self._release_file()
            return
        log.warning("replaying %d usage records a previous process could not write", len(self._pending))
        self._commit([])
        if self._pending:  # still refused: the writer retries them
            self._ensure_writer()

    # --- shutdown ---------------------------------------------------------------------------------------------------

    def flush(self, timeout: float = 10.0) -> None:
        """Stop the writer after it has tried to write everything queued (a later record starts it again)."""
        with self._writer_lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            self._queue.put(_STOP)
            writer.join(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Flush; records still pending stay in the pending file for the next process."""
        self.flush(timeout)
        stranded: list[_Item] = []
        while True:  # records made while the writer was stopping
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                stranded.append(item)
        if stranded or self._pending:
            self._commit(stranded)
        self._release_lock()
