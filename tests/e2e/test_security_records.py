"""Audit and usage records fail closed, and admin bodies are strict: real servers, a real store on SQLite and on
PostgreSQL.

A trigger that aborts every insert makes a table unwritable, as a full or broken database would.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from llmos.config import Settings
from llmos.errors import AuditUnavailableError
from llmos.registry import sources
from llmos.registry.service import Registry
from llmos.security.principal import Limits
from llmos.security.service import SecurityService
from tests.helpers import ServerProcess, run_cli, store_sql, store_url
from tests.postgres import DATABASES, database_env

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
UNKNOWN = "unknown_field_xyz"


on_both_databases = pytest.mark.parametrize("database", DATABASES, indirect=True)


def block(home: Path, table: str) -> None:
    if store_url(home).startswith("postgresql"):
        store_sql(home, "CREATE OR REPLACE FUNCTION block_insert() RETURNS trigger LANGUAGE plpgsql"
                        " AS $$ BEGIN RAISE EXCEPTION 'x'; END $$")  # fmt: skip
        store_sql(home, f"CREATE TRIGGER block_{table} BEFORE INSERT ON {table} EXECUTE FUNCTION block_insert()")
    else:
        store_sql(home, f"CREATE TRIGGER block_{table} BEFORE INSERT ON {table} BEGIN SELECT RAISE(ABORT, 'x'); END")


def unblock(home: Path, table: str) -> None:
    on_table = f" ON {table}" if store_url(home).startswith("postgresql") else ""
    store_sql(home, f"DROP TRIGGER block_{table}{on_table}")


def count(home: Path, query: str) -> int:
    return int(store_sql(home, query)[0][0])


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    assert found, f"{name} missing from /metrics"
    return float(found.group(1))


def wait_ready(base: str, seconds: float = 10.0) -> httpx.Response:
    deadline = time.monotonic() + seconds
    while True:
        response = httpx.get(f"{base}/ready")
        if response.status_code == 200 or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


# --- audit and strict bodies: a server without a model ----------------------------------------------------------------


@pytest.fixture(scope="module", params=DATABASES)
def admin_server(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[tuple[ServerProcess, str, Path]]:
    with pytest.MonkeyPatch.context() as patch:
        database_env(request, request.param, patch)
        home = tmp_path_factory.mktemp("records") / "home"
        security = SecurityService(Settings(home=home))
        security.create_tenant("acme")
        key, _ = security.create_key("acme", "admin")
        security.close()
        server = ServerProcess(home)
        yield server, key, home
        server.stop()


def test_every_admin_route_refuses_an_unknown_field(admin_server: tuple[ServerProcess, str, Path]) -> None:
    server, key, home = admin_server
    headers = {"Authorization": f"Bearer {key}"}
    document = httpx.get(f"{server.base}/openapi.json", headers=headers).json()
    walked = []
    for path, operations in document["paths"].items():
        if not path.startswith("/admin/"):  # Ollama's /api/* ignore unknown fields, as Ollama does
            continue
        for method in operations:
            if method not in ("post", "put", "patch"):
                continue
            url = server.base + re.sub(r"\{[^}]+\}", "x", path)
            response = httpx.request(method, url, json={UNKNOWN: 1}, headers=headers, timeout=30)
            assert response.status_code == 400, (method, path, response.text)
            error = response.json()["error"]
            assert error["param"] == UNKNOWN and UNKNOWN in error["message"], (method, path, error)
            walked.append(f"{method} {path}")
    assert len(walked) >= 12, walked  # keys, tenants, unload, datasets, jobs (+cancel, resume), evaluations, ...
    # the case: a misspelt budget is an error naming it (and the field it meant), not a key without a budget
    misspelt = httpx.post(f"{server.base}/admin/keys", headers=headers,
                          json={"tenant": "acme", "role": "consumer", "budget": 40})  # fmt: skip
    assert misspelt.status_code == 400 and misspelt.json()["error"]["param"] == "budget"
    assert "token_budget" in misspelt.json()["error"]["message"]
    assert count(home, "SELECT COUNT(*) FROM api_keys") == 1


def test_audit_failure_refuses_key_and_tenant_changes(admin_server: tuple[ServerProcess, str, Path]) -> None:
    server, key, home = admin_server
    headers = {"Authorization": f"Bearer {key}"}
    keys_before = count(home, "SELECT COUNT(*) FROM api_keys")
    block(home, "audit_log")
    try:
        created = httpx.post(f"{server.base}/admin/keys", json={"tenant": "acme", "role": "admin"}, headers=headers)
        assert created.status_code == 503, created.text
        assert created.json()["error"]["code"] == "audit_unavailable"
        tenant = httpx.post(f"{server.base}/admin/tenants", json={"name": "initech"}, headers=headers)
        assert tenant.status_code == 503
        assert count(home, "SELECT COUNT(*) FROM api_keys") == keys_before
        assert count(home, "SELECT COUNT(*) FROM tenants WHERE name = 'initech'") == 0
        # the CLI: one line, non-zero exit, nothing created
        cli = run_cli(home, "keys", "create", "--tenant", "acme", "--role", "admin")
        assert cli.returncode == 1 and cli.stdout == ""
        assert len(cli.stderr.strip().splitlines()) == 1 and "audit log cannot be written" in cli.stderr
        assert run_cli(home, "tenants", "create", "umbrella").returncode == 1
        assert count(home, "SELECT COUNT(*) FROM api_keys") == keys_before
        scraped = httpx.get(f"{server.base}/metrics", headers=headers).text
        assert metric(scraped, "llmos_audit_write_failures_total") >= 2
        ready = httpx.get(f"{server.base}/ready")
        assert ready.status_code == 503 and not ready.json()["checks"]["audit"]["ok"]
        assert "audit" in ready.json()["checks"]["audit"]["reason"]
    finally:
        unblock(home, "audit_log")
    assert wait_ready(server.base).status_code == 200
    created = httpx.post(f"{server.base}/admin/keys", json={"tenant": "acme", "role": "consumer"}, headers=headers)
    assert created.status_code == 200
    assert count(home, "SELECT COUNT(*) FROM api_keys") == keys_before + 1


# --- usage: a server with a model, restarted ------------------------------------------------------------------------


@on_both_databases
def test_unrecorded_usage_refuses_the_key_and_spending_survives_a_restart(tmp_path: Path, database: str) -> None:
    home = tmp_path / "home"
    settings = Settings(home=home)
    registry = Registry(settings)
    sources.pull(registry, "smollm2")
    registry.close()
    security = SecurityService(settings)
    security.create_tenant("acme")
    admin, _ = security.create_key("acme", "admin")
    budgeted, info = security.create_key("acme", "consumer", limits=Limits(token_budget=400))
    security.close()
    body = {"model": "smollm2", "messages": QUESTION, "max_tokens": 4, "temperature": 0}

    def chat(server: ServerProcess, **changes: object) -> httpx.Response:
        return httpx.post(f"{server.base}/v1/chat/completions", json={**body, **changes},
                          headers={"Authorization": f"Bearer {budgeted}"}, timeout=120)  # fmt: skip

    server = ServerProcess(home)
    try:
        first = chat(server)
        assert first.status_code == 200, first.text
        spent = first.json()["usage"]["total_tokens"]
        block(home, "usage")
        try:
            second = chat(server)  # served; its record cannot be written
            assert second.status_code == 200
            spent += second.json()["usage"]["total_tokens"]
            refused = chat(server)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "usage_unrecorded" and info.prefix in refused.text
            admin_headers = {"Authorization": f"Bearer {admin}"}
            scraped = httpx.get(f"{server.base}/metrics", headers=admin_headers).text
            assert metric(scraped, "llmos_usage_write_failures_total") >= 1
            assert metric(scraped, "llmos_usage_records_pending") == 1
            ready = httpx.get(f"{server.base}/ready")
            assert ready.status_code == 503 and "usage records" in ready.json()["checks"]["usage"]["reason"]
        finally:
            unblock(home, "usage")
        assert wait_ready(server.base).status_code == 200  # the pending record was retried and written
        recorded = "SELECT SUM(prompt_tokens + completion_tokens) FROM usage WHERE key_prefix = "
        assert count(home, f"{recorded}'{info.prefix}'") == spent
    finally:
        server.stop()
    # after a restart the budget still counts both requests: a request that fits only if they were forgotten is
    # refused, and the refusal names exactly what was spent
    server = ServerProcess(home)
    try:
        prompt = first.json()["usage"]["prompt_tokens"]
        over = chat(server, max_tokens=400 - spent - prompt + 1)
        assert over.status_code == 429, over.text
        assert over.json()["error"]["code"] == "insufficient_quota"
        assert f"{spent} used or reserved" in over.json()["error"]["message"]
    finally:
        server.stop()


@on_both_databases
def test_pending_usage_is_replayed_after_a_restart(tmp_path: Path, database: str) -> None:
    """A record the database refused is kept in a file, refused on, and written by the next process that can."""
    settings = Settings(home=tmp_path / "home")
    security = SecurityService(settings)
    security.create_tenant("acme")
    _, info = security.create_key("acme", "consumer")
    block(settings.home, "usage")
    fields = {"request_id": "r1", "tenant": "acme", "key_prefix": info.prefix, "model": "m", "endpoint": "chat",
              "prompt_tokens": 5, "completion_tokens": 7, "latency_ms": 1, "status": 200}  # fmt: skip
    assert security.record_usage(**fields).result(10) is False
    assert security.unrecorded(info.prefix) and security.unrecorded("other") is None
    security.close()  # a restart while the table is still unwritable
    again = SecurityService(settings)
    assert again.unrecorded(info.prefix)  # still refused: the record came back from the file
    unblock(settings.home, "usage")
    deadline = time.monotonic() + 10
    while again.unrecorded(info.prefix) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert again.unrecorded(info.prefix) is None
    assert again.usage_since(datetime(2000, 1, 1, tzinfo=UTC), key_prefix=info.prefix) == 12
    again.close()
    assert not (settings.home / "usage-pending.jsonl").exists()


@on_both_databases
def test_audited_changes_roll_back_without_their_event(tmp_path: Path, database: str) -> None:
    settings = Settings(home=tmp_path / "home")
    security = SecurityService(settings)
    security.create_tenant("acme")
    _, info = security.create_key("acme", "consumer")
    block(settings.home, "audit_log")
    with pytest.raises(AuditUnavailableError):
        security.create_key("acme", "admin")
    with pytest.raises(AuditUnavailableError):
        security.create_tenant("initech")
    with pytest.raises(AuditUnavailableError):
        security.revoke_key(info.prefix)
    keys = security.keys()
    assert [k.prefix for k in keys] == [info.prefix] and keys[0].revoked_at is None
    assert [t.name for t in security.tenants()] == ["acme"]
    assert security.audit_failures == 3
    security.close()
