"""Rate limits and token budgets, per key and per tenant, reserved and settled atomically.

Contract: :meth:`QuotaManager.reserve` checks, under one lock and all-or-nothing, every limit that applies to the
caller: requests per minute and tokens per minute (token buckets that start full and refill continuously), and
the token budget of the current period (tokens already recorded in usage, plus tokens reserved by requests still
running). A request reserves its worst case (prompt + max_tokens); :meth:`QuotaManager.settle` returns the unused
part when it ends. So concurrent requests can never spend beyond a budget. Refusals raise
:class:`~llmos.errors.RateLimitError` (with the seconds until enough capacity returns) or
:class:`~llmos.errors.InsufficientQuotaError`. ``x-ratelimit-*`` headers describe the tightest limits.

With a :class:`~llmos.security.budgets.BudgetLedger` (the server always passes one), token budgets are kept in the
database instead, so every front end of one database spends from the same budget (see that module); rate limits stay
per front end. Without one (unit tests, benchmarks of this class), budgets are kept in memory as follows.

Spending is authoritative in memory once loaded: what :meth:`QuotaManager.settle` adds is counted at once, whether
or not its usage record is written yet. A caller whose usage could not be recorded (``unrecorded`` names the
reason) is refused with :class:`~llmos.errors.UsageUnrecordedError` (503) until it is, so nothing is ever spent
unmetered; after a restart the spending is loaded again from the usage records.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from llmos.errors import InsufficientQuotaError, LlmosError, RateLimitError, UsageUnrecordedError
from llmos.security.budgets import BudgetLedger, Claim
from llmos.security.principal import Limits, Principal
from llmos.security.service import period_start


@dataclass
class Bucket:
    capacity: float
    per_second: float
    level: float
    updated: float = field(default_factory=time.monotonic)

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.per_second)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing / self.per_second


@dataclass
class Reservation:
    scopes: list[tuple[str, Limits]]
    tokens: int
    headers: dict[str, str]
    settled: bool = False
    claims: list[Claim] = field(default_factory=list)
    """Budget claims taken in the database ledger (empty without one)."""


class QuotaManager:
    def __init__(
        self,
        usage_since: Callable[[str, datetime], int],
        unrecorded: Callable[[str | None], str | None] = lambda _prefix: None,
        ledger: BudgetLedger | None = None,
    ) -> None:
        """``usage_since(scope, start)`` returns tokens recorded for ``scope`` ("key:P" / "tenant:T") since start;
        ``unrecorded(key_prefix)`` why that caller's requests must be refused now (its usage is not recorded)."""
        self._usage_since = usage_since
        self._unrecorded = unrecorded
        self._ledger = ledger
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], Bucket] = {}
        self._spent: dict[tuple[str, datetime], int] = {}
        """Tokens used in the period, per scope: loaded from usage once, then kept up to date here."""
        self._reserved: dict[str, int] = {}

    @staticmethod
    def scopes(principal: Principal) -> list[tuple[str, Limits]]:
        scopes = []
        if principal.key_prefix is not None:
            scopes.append((f"key:{principal.key_prefix}", principal.key_limits))
        if principal.tenant_id is not None:
            scopes.append((f"tenant:{principal.tenant}", principal.tenant_limits))
        return scopes

    def _bucket(self, scope: str, kind: str, per_minute: int) -> Bucket:
        bucket = self._buckets.get((scope, kind))
        if bucket is None or bucket.capacity != per_minute:
            bucket = Bucket(float(per_minute), per_minute / 60.0, float(per_minute))
            self._buckets[(scope, kind)] = bucket
        return bucket

    def _spent_now(self, scope: str, limits: Limits) -> int:
        start = period_start(limits.budget_period)
        key = (scope, start)
        if key not in self._spent:
            self._spent[key] = self._usage_since(scope, start)
        return self._spent[key]

    def reserve(self, principal: Principal, tokens: int) -> Reservation:
        reason = self._unrecorded(principal.key_prefix)
        if reason is not None:
            raise UsageUnrecordedError(reason)
        now = time.monotonic()
        headers: dict[str, str] = {}
        with self._lock:
            scopes = self.scopes(principal)
            for scope, limits in scopes:
                if limits.requests_per_minute is not None:
                    bucket = self._bucket(scope, "requests", limits.requests_per_minute)
                    bucket.refill(now)
                    wait = bucket.wait_for(1)
                    self._header(headers, "requests", limits.requests_per_minute, bucket, 1)
                    if wait > 0:
                        raise RateLimitError(
                            f"rate limit of {limits.requests_per_minute} requests per minute reached for"
                            f" {scope.replace(':', ' ')}; retry in {math.ceil(wait)}s",
                            retry_after=wait,
                            headers=headers,
                        )
                if limits.tokens_per_minute is not None:
                    bucket = self._bucket(scope, "tokens", limits.tokens_per_minute)
                    bucket.refill(now)
                    self._header(headers, "tokens", limits.tokens_per_minute, bucket, tokens)
                    if tokens > limits.tokens_per_minute:
                        raise RateLimitError(
                            f"this request may use {tokens} tokens, more than the {limits.tokens_per_minute} tokens"
                            f" per minute allowed for {scope.replace(':', ' ')}; lower max_tokens",
                            retry_after=60.0,
                            headers=headers,
                        )
                    wait = bucket.wait_for(tokens)
                    if wait > 0:
                        raise RateLimitError(
                            f"rate limit of {limits.tokens_per_minute} tokens per minute reached for"
                            f" {scope.replace(':', ' ')}; retry in {math.ceil(wait)}s",
                            retry_after=wait,
                            headers=headers,
                        )
                if limits.token_budget is not None and self._ledger is None:
                    used = self._spent_now(scope, limits) + self._reserved.get(scope, 0)
                    if used + tokens > limits.token_budget:
                        raise InsufficientQuotaError(
                            f"the token budget of {scope.replace(':', ' ')} ({limits.token_budget} tokens per"
                            f" {limits.budget_period}) would be exceeded: {used} used or reserved, this request may"
                            f" use {tokens}"
                        )
            for scope, limits in scopes:  # every check passed: take from all of them at once
                if limits.requests_per_minute is not None:
                    self._buckets[(scope, "requests")].level -= 1
                if limits.tokens_per_minute is not None:
                    self._buckets[(scope, "tokens")].level -= tokens
                self._reserved[scope] = self._reserved.get(scope, 0) + tokens
        reservation = Reservation(scopes, tokens, headers)
        if self._ledger is not None:
            claims = [
                Claim(scope, period_start(limits.budget_period), limits.token_budget, limits.budget_period, tokens)
                for scope, limits in scopes
                if limits.token_budget is not None
            ]
            if claims:
                try:
                    self._ledger.reserve(claims)
                except LlmosError:
                    self._give_back(reservation, 0, refund_request=True)
                    raise
                reservation.claims = claims
        return reservation

    @staticmethod
    def _header(headers: dict[str, str], kind: str, limit: int, bucket: Bucket, need: float) -> None:
        remaining = max(0, math.floor(bucket.level - need))
        current = headers.get(f"x-ratelimit-remaining-{kind}")
        if current is not None and int(current) <= remaining:
            return
        headers[f"x-ratelimit-limit-{kind}"] = str(limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(remaining)
        headers[f"x-ratelimit-reset-{kind}"] = f"{math.ceil((bucket.capacity - bucket.level) / bucket.per_second)}s"

    def settle(self, reservation: Reservation, used: int) -> None:
        """The request is over and used ``used`` tokens: return the rest of what it reserved."""
        if reservation.settled:
            return
        reservation.settled = True
        if reservation.claims and self._ledger is not None:
            self._ledger.settle_later(reservation.claims, used)  # the request's end never waits for the database
        self._give_back(reservation, used)

    def _give_back(self, reservation: Reservation, used: int, *, refund_request: bool = False) -> None:
        unused = max(0, reservation.tokens - used)
        with self._lock:
            for scope, limits in reservation.scopes:
                self._reserved[scope] = max(0, self._reserved.get(scope, 0) - reservation.tokens)
                if limits.token_budget is not None and self._ledger is None:
                    start = period_start(limits.budget_period)
                    self._spent[(scope, start)] = self._spent_now(scope, limits) + used
                bucket = self._buckets.get((scope, "tokens"))
                if bucket is not None:
                    bucket.level = min(bucket.capacity, bucket.level + unused)
                requests = self._buckets.get((scope, "requests"))
                if refund_request and requests is not None:
                    requests.level = min(requests.capacity, requests.level + 1)
