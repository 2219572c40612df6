"""Token budgets kept in the database, so every front end of one database spends from the same budget.

Contract: :class:`BudgetLedger` keeps, per scope (``tenant:NAME`` / ``key:PREFIX``) and budget period, one row of
``budget_ledger`` whose ``committed`` counts the tokens of settled requests plus the worst case of requests still
running, on every front end that shares the database (SQLite file or PostgreSQL server).

* :meth:`BudgetLedger.reserve` adds a request's worst case to each of its scopes in ONE transaction, each as a
  conditional ``UPDATE ... SET committed = committed + n WHERE committed + n <= budget``. The database serialises
  concurrent updates of a row (PostgreSQL re-checks the condition after waiting for the row lock; SQLite has one
  writer), so two front ends can never together pass a budget. If any scope refuses, nothing is taken from any of
  them and :class:`~llmos.errors.InsufficientQuotaError` is raised. Rows are updated in sorted order (no deadlock
  between two multi-scope reservations).
* A period's row is created on first use with the tokens already recorded in usage for that period (so upgrading a
  store with history, or a budget set mid-period, counts what was spent); two front ends creating it at once both
  end with the one row.
* :meth:`BudgetLedger.settle` gives back ``reserved - used`` when the request ends (to the period it was reserved
  in). :meth:`BudgetLedger.settle_later` does the same from a writer thread, so a request's end never waits for the
  database; settlements queued while one commits share the next transaction. :meth:`BudgetLedger.flush` waits for
  them (tests, shutdown). Until one is applied, its worst case stays counted: stricter, never looser.
* **A front end that dies mid-request** never settles. With a ``holder`` (the server passes its front-end id), each
  ledger keeps beside its rows how much of ``committed`` that holder's running requests hold (``budget_holds``,
  changed in the same transactions). :meth:`BudgetLedger.release_dead` (every live front end calls it with the ids
  of the live ones) gives a dead holder's holds back to the ledger and deletes them, once (the delete is conditional
  on the hold being unchanged). So the worst cases of a dead front end's requests count until another front end
  notices (one lease), then nothing: as with one server, a request cut by a crash is not charged (its usage was
  never recorded). Without a holder they stay counted: stricter, never looser.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from llmos.errors import InsufficientQuotaError, StorageError
from llmos.store.db import rows_matched
from llmos.store.schema import BudgetHold, utcnow
from llmos.store.schema import BudgetLedger as LedgerRow

log = logging.getLogger("llmos.security")


@dataclass(frozen=True)
class Claim:
    """``tokens`` against ``scope``'s budget of ``budget`` tokens in the period starting at ``period_start``."""

    scope: str
    period_start: datetime
    budget: int
    budget_period: str
    tokens: int

    @property
    def period(self) -> str:
        return self.period_start.isoformat()


class BudgetLedger:
    def __init__(
        self,
        sessions: Callable[[], Session],
        usage_since: Callable[[str, datetime], int],
        holder: str | None = None,
    ) -> None:
        """``usage_since(scope, start)``: tokens recorded in usage for a scope since ``start`` (a new row's start);
        ``holder``: the front end whose running requests' reservations are tracked as holds."""
        self._sessions = sessions
        self._usage_since = usage_since
        self.holder = holder
        self._known: set[tuple[str, str]] = set()
        self._pending: queue.Queue[tuple[list[Claim], int] | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()

    def _ensure_row(self, claim: Claim) -> None:
        key = (claim.scope, claim.period)
        if key in self._known:
            return
        with self._sessions() as session:
            exists = session.scalar(
                select(LedgerRow.committed).where(LedgerRow.scope == claim.scope, LedgerRow.period == claim.period)
            )
            if exists is None:
                spent = self._usage_since(claim.scope, claim.period_start)
                session.add(LedgerRow(scope=claim.scope, period=claim.period, committed=spent, updated_at=utcnow()))
                try:
                    session.commit()
                except IntegrityError:  # another front end created it first: theirs counts the same usage
                    session.rollback()
            if self.holder is not None and session.get(BudgetHold, (self.holder, *key)) is None:
                session.add(BudgetHold(holder=self.holder, scope=claim.scope, period=claim.period, tokens=0))
                try:
                    session.commit()
                except IntegrityError:  # this front end's other thread made it
                    session.rollback()
        self._known.add(key)

    def reserve(self, claims: list[Claim]) -> None:
        """Take every claim's tokens, or none of them (:class:`InsufficientQuotaError` naming the first refusal)."""
        claims = sorted(claims, key=lambda claim: (claim.scope, claim.period))
        try:
            for claim in claims:
                self._ensure_row(claim)
            with self._sessions() as session, session.begin():
                for claim in claims:
                    taken = session.execute(
                        update(LedgerRow)
                        .where(
                            LedgerRow.scope == claim.scope,
                            LedgerRow.period == claim.period,
                            LedgerRow.committed + claim.tokens <= claim.budget,
                        )
                        .values(committed=LedgerRow.committed + claim.tokens, updated_at=utcnow())
                    )
                    if rows_matched(taken) != 1:
                        used = session.scalar(
                            select(LedgerRow.committed).where(
                                LedgerRow.scope == claim.scope, LedgerRow.period == claim.period
                            )
                        )
                        raise InsufficientQuotaError(
                            f"the token budget of {claim.scope.replace(':', ' ')} ({claim.budget} tokens per"
                            f" {claim.budget_period}) would be exceeded: {used} used or reserved, this request may"
                            f" use {claim.tokens}"
                        )
                    self._hold(session, claim, claim.tokens)
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot reserve tokens against the budget: {type(exc).__name__}") from exc

    def settle(self, claims: list[Claim], used: int) -> None:
        """The request used ``used`` tokens: give each claim back what it reserved beyond that (now)."""
        self._settle_all([(claims, used)])

    def settle_later(self, claims: list[Claim], used: int) -> None:
        """:meth:`settle` from the writer thread (started on first use)."""
        with self._writer_lock:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._write, name="llmos-budget-settle", daemon=True)
                self._writer.start()
        self._pending.put((claims, used))

    def _write(self) -> None:
        while True:
            item = self._pending.get()
            batch = [item]
            while True:  # everything queued meanwhile goes in the same transaction
                try:
                    batch.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            settles = [entry for entry in batch if entry is not None]
            if settles:
                self._settle_all(settles)
            for _ in batch:
                self._pending.task_done()
            if None in batch:
                return

    def flush(self) -> None:
        """Wait until every settlement handed to :meth:`settle_later` is applied (or failed and logged)."""
        self._pending.join()

    def close(self) -> None:
        """Apply what is queued, then stop the writer."""
        with self._writer_lock:
            writer = self._writer
        if writer is not None and writer.is_alive():
            self._pending.put(None)
            writer.join(30)

    def _settle_all(self, settles: list[tuple[list[Claim], int]]) -> None:
        try:
            with self._sessions() as session, session.begin():
                for claims, used in settles:
                    for claim in sorted(claims, key=lambda claim: (claim.scope, claim.period)):
                        # normally the unused part comes back; if this front end was taken for dead meanwhile, the
                        # whole reservation already came back, so the used part is counted again
                        held = self._hold(session, claim, -claim.tokens)
                        change = -max(0, claim.tokens - used) if held else used
                        if change:
                            session.execute(
                                update(LedgerRow)
                                .where(LedgerRow.scope == claim.scope, LedgerRow.period == claim.period)
                                .values(committed=LedgerRow.committed + change, updated_at=utcnow())
                            )
        except SQLAlchemyError as exc:  # the worst case stays counted: stricter, never looser
            log.warning("could not give back unused budget tokens: %s", type(exc).__name__)

    def _hold(self, session: Session, claim: Claim, tokens: int) -> bool:
        """Change this holder's hold on ``claim``'s row by ``tokens``; False if the hold was released meanwhile (its
        holder was taken for dead: :meth:`release_dead` gave back everything it held)."""
        if self.holder is None:
            return True
        key = (BudgetHold.holder == self.holder, BudgetHold.scope == claim.scope, BudgetHold.period == claim.period)
        if tokens < 0:
            changed = session.execute(
                update(BudgetHold).where(*key, BudgetHold.tokens >= -tokens).values(tokens=BudgetHold.tokens + tokens)
            )
            return rows_matched(changed) == 1
        changed = session.execute(update(BudgetHold).where(*key).values(tokens=BudgetHold.tokens + tokens))
        if rows_matched(changed) == 0:  # released while this front end was taken for dead: hold again from here
            session.add(BudgetHold(holder=self.holder, scope=claim.scope, period=claim.period, tokens=tokens))
        return True

    def release_dead(self, live: set[str]) -> int:
        """Give the holds of every holder not in ``live`` back to their ledger rows; returns the tokens released."""
        released = 0
        with self._sessions() as session, session.begin():
            for hold in list(session.scalars(select(BudgetHold).where(BudgetHold.holder.not_in(live)))):
                gone = session.execute(  # only if nobody released or changed it meanwhile
                    delete(BudgetHold).where(
                        BudgetHold.holder == hold.holder,
                        BudgetHold.scope == hold.scope,
                        BudgetHold.period == hold.period,
                        BudgetHold.tokens == hold.tokens,
                    )
                )
                if rows_matched(gone) == 1 and hold.tokens:
                    session.execute(
                        update(LedgerRow)
                        .where(LedgerRow.scope == hold.scope, LedgerRow.period == hold.period)
                        .values(committed=LedgerRow.committed - hold.tokens, updated_at=utcnow())
                    )
                    released += hold.tokens
        if released:
            log.warning("gave back %d budget tokens held by requests of front ends that died", released)
        return released

    def committed(self, scope: str, period_start: datetime) -> int | None:
        """Tokens counted against ``scope`` in the period (None before its first request)."""
        with self._sessions() as session:
            return session.scalar(
                select(LedgerRow.committed).where(
                    LedgerRow.scope == scope, LedgerRow.period == period_start.isoformat()
                )
            )
