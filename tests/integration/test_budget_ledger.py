"""Token budgets in the database: two processes (two front ends) spending one budget at once never overspend it."""

from __future__ import annotations

import multiprocessing
from datetime import UTC, datetime
from pathlib import Path

import pytest

from llmos.config import Settings
from llmos.errors import InsufficientQuotaError
from llmos.security.budgets import BudgetLedger, Claim
from llmos.security.quotas import QuotaManager
from llmos.security.service import SecurityService, period_start
from tests.postgres import DATABASES

pytestmark = pytest.mark.parametrize("database", DATABASES, indirect=True)

BUDGET = 300
TOKENS = 10
ATTEMPTS = 40


def _spend(home: str, url: str | None, start: object, results: object) -> None:
    """One front end: ATTEMPTS reservations of TOKENS each against the key's budget, each settled in full."""
    settings = Settings(home=Path(home), database_url=url)  # type: ignore[arg-type]
    security = SecurityService(settings)
    ledger = BudgetLedger(security.session, security.scope_usage_since, holder=Path(home).name * 32)
    start.wait()  # type: ignore[attr-defined]
    taken = 0
    for _ in range(ATTEMPTS):
        claim = Claim("key:shared", period_start("month"), BUDGET, "month", TOKENS)
        try:
            ledger.reserve([claim])
        except InsufficientQuotaError:
            continue
        ledger.settle([claim], TOKENS)
        taken += 1
    security.close()
    results.put(taken)  # type: ignore[attr-defined]


def test_two_processes_spend_exactly_the_budget_and_never_more(settings: Settings, tmp_path: Path) -> None:
    url = settings.effective_database_url()
    SecurityService(settings).close()  # migrate once, before the race
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    homes = [tmp_path / "a", tmp_path / "b"]  # two front ends: two homes, one database
    workers = [context.Process(target=_spend, args=(str(home), url, start, results)) for home in homes]
    for worker in workers:
        worker.start()
    start.set()
    taken = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    assert sum(taken) == BUDGET // TOKENS, taken  # 80 attempts of 10 tokens on a budget of 300: exactly 30 pass
    security = SecurityService(settings)
    try:
        ledger = BudgetLedger(security.session, security.scope_usage_since)
        assert ledger.committed("key:shared", period_start("month")) == BUDGET
        assert ledger.release_dead(set()) == 0  # every request settled: the front ends hold nothing any more
    finally:
        security.close()


def test_a_dead_front_ends_running_requests_are_given_back_once(settings: Settings) -> None:
    security = SecurityService(settings)
    try:
        dead = BudgetLedger(security.session, security.scope_usage_since, holder="a" * 32)
        live = BudgetLedger(security.session, security.scope_usage_since, holder="b" * 32)
        month = period_start("month")
        claim = Claim("key:k", month, 150, "month", 100)
        dead.reserve([claim])  # its front end dies before the request ends
        with pytest.raises(InsufficientQuotaError):
            live.reserve([claim])
        assert live.release_dead({"b" * 32}) == 100
        assert live.release_dead({"b" * 32}) == 0  # once
        live.reserve([claim])
        assert live.committed("key:k", month) == 100
        dead.settle([claim], 30)  # it was only slow: what it used is counted again, nothing given back twice
        assert live.committed("key:k", month) == 130
        live.settle([claim], 100)
        assert live.committed("key:k", month) == 130
    finally:
        security.close()


def test_a_refusal_takes_nothing_from_any_scope(settings: Settings) -> None:
    security = SecurityService(settings)
    try:
        ledger = BudgetLedger(security.session, security.scope_usage_since)
        month = period_start("month")
        roomy = Claim("tenant:t", month, 1000, "month", 50)
        tight = Claim("key:k", month, 40, "month", 50)
        with pytest.raises(InsufficientQuotaError, match="token budget of key k"):
            ledger.reserve([roomy, tight])
        assert ledger.committed("tenant:t", month) == 0  # all or nothing
        ledger.reserve([roomy])
        ledger.settle([roomy], 20)
        assert ledger.committed("tenant:t", month) == 20  # the unused 30 came back
    finally:
        security.close()


def test_a_new_period_starts_from_the_usage_already_recorded(settings: Settings) -> None:
    security = SecurityService(settings)
    try:
        security.create_tenant("acme")
        key, info = security.create_key("acme", "consumer")
        security.record_usage(
            request_id="r1", tenant="acme", key_prefix=info.prefix, model="m", endpoint="/v1/chat/completions",
            prompt_tokens=30, completion_tokens=12, latency_ms=5, status=200,
        )  # fmt: skip
        security.flush_usage()
        principal = security.authenticate(f"Bearer {key}")
        ledger = BudgetLedger(security.session, security.scope_usage_since)
        quotas = QuotaManager(security.scope_usage_since, ledger=ledger)
        scope = f"key:{info.prefix}"
        limited = type(principal)(**{**principal.__dict__, "key_limits": type(principal.key_limits)(token_budget=100)})
        reservation = quotas.reserve(limited, 50)
        assert ledger.committed(scope, period_start("month")) == 42 + 50
        quotas.settle(reservation, 8)
        ledger.flush()  # the quota manager settles from the ledger's writer thread
        assert ledger.committed(scope, period_start("month")) == 50
        with pytest.raises(InsufficientQuotaError):
            quotas.reserve(limited, 51)
        assert datetime.now(UTC) >= period_start("month")
    finally:
        security.close()
