"""Security end to end: real keys, a real server, the official openai client; the store on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy.exc import DBAPIError

from llmos.config import Settings
from llmos.registry import sources
from llmos.registry.service import Registry
from llmos.security.service import SecurityService
from tests.helpers import ServerProcess, run_cli, store_sql
from tests.postgres import DATABASES, database_env

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class World:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.keys: dict[str, str] = {}


@pytest.fixture(scope="module", params=DATABASES)
def module_database(request: pytest.FixtureRequest) -> Iterator[str]:
    """The module's one store (and server) on each database in turn."""
    with pytest.MonkeyPatch.context() as patch:
        yield database_env(request, request.param, patch)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, smollm2_file: Path, module_database: str) -> World:
    home = tmp_path_factory.mktemp("secure") / "home"
    settings = Settings(home=home)
    registry = Registry(settings)
    sources.pull(registry, "smollm2")
    registry.close()
    world = World(home)
    for tenant in ("acme", "globex"):
        assert run_cli(home, "tenants", "create", tenant).returncode == 0
    globex_id = SecurityService(settings).tenant_id("globex")
    registry = Registry(settings)
    registry.import_path(smollm2_file, "globex-private", tenant_id=globex_id)
    registry.close()

    def key(name: str, *args: str) -> None:
        result = run_cli(home, "keys", "create", *args)
        assert result.returncode == 0, result.stderr
        world.keys[name] = result.stdout.strip()

    key("admin", "--tenant", "acme", "--role", "admin")
    key("developer", "--tenant", "acme", "--role", "developer")
    key("consumer", "--tenant", "acme", "--role", "consumer", "--models", "globex-private")
    key("limited", "--tenant", "acme", "--role", "consumer", "--rpm", "5")
    key("budget", "--tenant", "acme", "--role", "consumer", "--budget", "400")
    key("globex", "--tenant", "globex", "--role", "developer")
    key("revoked", "--tenant", "acme", "--role", "consumer")
    key("canary", "--tenant", "acme", "--role", "consumer")
    key("surfaces", "--tenant", "acme", "--role", "developer")
    key("budget_mixed", "--tenant", "acme", "--role", "consumer", "--budget", "300")
    prefix = world.keys["revoked"].split("_")[1]
    assert run_cli(home, "keys", "revoke", prefix).returncode == 0
    security = SecurityService(settings)
    world.keys["expired"], _ = security.create_key("acme", "consumer", expires_in=timedelta(seconds=1))
    security.close()
    time.sleep(1.2)
    return world


@pytest.fixture(scope="module")
def server(world: World) -> Iterator[ServerProcess]:
    process = ServerProcess(world.home, "--model", "smollm2")
    yield process
    process.stop()


def client(server: ServerProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=key, max_retries=0, timeout=120)


def test_health_is_open_everything_else_needs_a_key(server: ServerProcess) -> None:
    assert httpx.get(f"{server.base}/health").status_code == 200
    assert httpx.get(f"{server.base}/ready").status_code == 200
    for path in ("/v1/models", "/metrics", "/admin/runtime", "/docs", "/nothing"):
        response = httpx.get(f"{server.base}{path}")
        assert response.status_code == 401, path
        assert response.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("which", ["missing", "malformed", "unknown", "revoked", "expired"])
def test_bad_keys_get_401(server: ServerProcess, world: World, which: str) -> None:
    keys = {
        "missing": "",
        "malformed": "sk-not-an-llmos-key",
        "unknown": "llmos_0123456789ab_" + "x" * 43,
        "revoked": world.keys["revoked"],
        "expired": world.keys["expired"],
    }
    with pytest.raises(openai.AuthenticationError) as info:
        client(server, keys[which] or "none").chat.completions.create(model="smollm2", messages=QUESTION)
    assert info.value.status_code == 401
    if which in ("revoked", "expired"):
        assert which in str(info.value)


def test_roles_and_tenants(server: ServerProcess, world: World) -> None:
    admin = client(server, world.keys["admin"])
    assert "Paris" in (admin.chat.completions.create(
        model="smollm2", messages=QUESTION, temperature=0, max_tokens=16).choices[0].message.content or "")  # fmt: skip
    # a consumer key on a model outside its allow-list: 404, as if it did not exist
    with pytest.raises(openai.NotFoundError):
        client(server, world.keys["consumer"]).chat.completions.create(model="smollm2", messages=QUESTION)
    # a developer key on admin routes: 403
    denied = httpx.get(f"{server.base}/admin/runtime", headers={"Authorization": f"Bearer {world.keys['developer']}"})
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    # another tenant's private model: invisible, unusable, undeletable for acme; fine for globex
    developer = client(server, world.keys["developer"])
    assert "globex-private:latest" not in [m.id for m in developer.models.list().data]
    with pytest.raises(openai.NotFoundError):
        developer.models.retrieve("globex-private")
    with pytest.raises(openai.NotFoundError):
        developer.chat.completions.create(model="globex-private", messages=QUESTION)
    with pytest.raises(openai.NotFoundError):
        developer.models.delete("globex-private")
    with pytest.raises(openai.NotFoundError):  # the consumer's allow-list does not open another tenant's model
        client(server, world.keys["consumer"]).chat.completions.create(model="globex-private", messages=QUESTION)
    globex = client(server, world.keys["globex"])
    assert "globex-private:latest" in [m.id for m in globex.models.list().data]
    with pytest.raises(openai.PermissionDeniedError):  # public models belong to nobody: only an admin deletes them
        globex.models.delete("smollm2")


SURFACES = {
    # route: (body for a model, the endpoint label of its usage rows)
    "/v1/responses": ({"input": "Capital of France?", "max_output_tokens": 8}, "responses"),
    "/v1/messages": ({"messages": [{"role": "user", "content": "Capital of France?"}], "max_tokens": 8}, "messages"),
    "/api/chat": (
        {
            "messages": [{"role": "user", "content": "Capital of France?"}],
            "stream": False,
            "options": {"num_predict": 8},
        },
        "ollama_chat",
    ),
    "/api/generate": (
        {"prompt": "Capital of France?", "stream": False, "options": {"num_predict": 8}},
        "ollama_generate",
    ),
}


def _error_message(path: str, body: dict[str, object]) -> str:
    """The message of an error body in the shape of the route's API family."""
    if path.startswith("/api/"):
        return str(body["error"])
    if path.startswith("/v1/messages"):
        assert body["type"] == "error"
    return str(body["error"]["message"])  # type: ignore[index]


def test_every_api_surface_hides_other_tenants_and_records_usage(server: ServerProcess, world: World) -> None:
    key = world.keys["surfaces"]
    for path, (fields, _endpoint) in SURFACES.items():
        for header in ({"Authorization": f"Bearer {key}"}, {"x-api-key": key}):
            hidden = httpx.post(
                f"{server.base}{path}", json={"model": "globex-private", **fields}, headers=header, timeout=60
            )
            assert hidden.status_code == 404, (path, hidden.text)
            assert "globex-private" in _error_message(path, hidden.json())
        served = httpx.post(
            f"{server.base}{path}", json={"model": "smollm2", **fields}, headers={"x-api-key": key}, timeout=60
        )
        assert served.status_code == 200, (path, served.text)
        wrong = httpx.post(
            f"{server.base}{path}", json={"model": "smollm2", **fields}, headers={"x-api-key": "nope"}, timeout=60
        )
        assert wrong.status_code == 401 and _error_message(path, wrong.json())
    prefix = key.split("_")[1]
    rows = store_sql(
        world.home,
        "SELECT endpoint, SUM(prompt_tokens), SUM(completion_tokens) FROM usage"
        " WHERE key_prefix = :prefix AND status = 200 GROUP BY endpoint",
        {"prefix": prefix},
    )
    used = {endpoint: (prompt, completion) for endpoint, prompt, completion in rows}
    for _path, (_fields, endpoint) in SURFACES.items():
        assert used[endpoint][0] > 0 and 0 < used[endpoint][1] <= 8, (endpoint, used)


def test_stored_responses_belong_to_their_tenant(server: ServerProcess, world: World) -> None:
    globex = client(server, world.keys["globex"])
    stored = globex.responses.create(model="globex-private", input="Hello", max_output_tokens=4)
    assert globex.responses.retrieve(stored.id).id == stored.id
    for name in ("admin", "developer", "surfaces"):
        other = client(server, world.keys[name])
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(stored.id)
        with pytest.raises(openai.NotFoundError):
            other.responses.delete(stored.id)
        with pytest.raises(openai.NotFoundError):
            other.responses.create(model="smollm2", input="And?", previous_response_id=stored.id, max_output_tokens=4)
    assert globex.responses.retrieve(stored.id).id == stored.id  # still there


def test_a_token_budget_counts_every_api_surface(server: ServerProcess, world: World) -> None:
    key = world.keys["budget_mixed"]
    refused: list[tuple[str, httpx.Response]] = []
    for attempt in range(40):
        path = list(SURFACES)[attempt % len(SURFACES)]
        fields = SURFACES[path][0]
        response = httpx.post(
            f"{server.base}{path}", json={"model": "smollm2", **fields}, headers={"x-api-key": key}, timeout=60
        )
        assert response.status_code in (200, 429), response.text
        if response.status_code == 429:
            refused.append((path, response))
            if len(refused) == len(SURFACES):
                break
    assert {path for path, _ in refused} == set(SURFACES)
    for path, response in refused:
        assert "token budget" in _error_message(path, response.json())
    prefix = key.split("_")[1]
    [(total, endpoints)] = store_sql(
        world.home,
        "SELECT SUM(prompt_tokens + completion_tokens), COUNT(DISTINCT endpoint) FROM usage WHERE key_prefix = :p",
        {"p": prefix},
    )
    assert total <= 300 and endpoints == len(SURFACES)


def test_keys_cannot_escalate(server: ServerProcess, world: World) -> None:
    headers = {"Authorization": f"Bearer {world.keys['developer']}"}
    higher = httpx.post(f"{server.base}/admin/keys", json={"tenant": "acme", "role": "admin"}, headers=headers)
    assert higher.status_code == 403
    other = httpx.post(f"{server.base}/admin/keys", json={"tenant": "globex", "role": "consumer"}, headers=headers)
    assert other.status_code == 403
    made = httpx.post(f"{server.base}/admin/keys", json={"tenant": "acme", "role": "consumer"}, headers=headers)
    assert made.status_code == 200 and made.json()["key"].startswith("llmos_")
    listed = httpx.get(f"{server.base}/admin/keys", headers=headers).json()["data"]
    assert {k["tenant"] for k in listed} == {"acme"} and all("key" not in k for k in listed)


def test_keys_are_stored_hashed(world: World) -> None:
    dump = "\n".join(str(row) for row in store_sql(world.home, "SELECT * FROM api_keys"))
    hashes = {row[0] for row in store_sql(world.home, "SELECT key_hash FROM api_keys")}
    for key in world.keys.values():
        assert key not in dump and key.split("_", 2)[2] not in dump
    assert hashlib.sha256(world.keys["admin"].encode()).hexdigest() in hashes


async def _burst(base: str, key: str, count: int, max_tokens: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=count)) as http:
        body = {"model": "smollm2", "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0}
        headers = {"Authorization": f"Bearer {key}"}
        calls = [http.post(f"{base}/v1/chat/completions", json=body, headers=headers) for _ in range(count)]
        return list(await asyncio.gather(*calls))


def test_requests_per_minute_limit_is_exact(server: ServerProcess, world: World) -> None:
    responses = asyncio.run(_burst(server.base, world.keys["limited"], 20, 4))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 5 + [429] * 15
    for response in responses:
        if response.status_code == 429:
            assert response.json()["error"]["type"] == "rate_limit_error"
            assert int(response.headers["retry-after"]) >= 1
            assert response.headers["x-ratelimit-limit-requests"] == "5"
        else:
            assert "x-ratelimit-remaining-requests" in response.headers


def test_token_budget_is_never_exceeded(server: ServerProcess, world: World) -> None:
    responses = asyncio.run(_burst(server.base, world.keys["budget"], 50, 24))
    assert {r.status_code for r in responses} <= {200, 429}
    assert any(r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota" for r in responses)
    assert any(r.status_code == 200 for r in responses)
    # no wait: a request's usage record is committed before its response completes
    prefix = world.keys["budget"].split("_")[1]
    [used] = store_sql(
        world.home,
        "SELECT SUM(prompt_tokens + completion_tokens), COUNT(*) FROM usage WHERE key_prefix = :p",
        {"p": prefix},
    )
    served = sum(r.status_code == 200 for r in responses)
    assert used[1] == served
    assert used[0] <= 400


def test_usage_and_audit_are_recorded(server: ServerProcess, world: World) -> None:
    time.sleep(0.5)
    report = json.loads(run_cli(world.home, "usage", "--by", "tenant,model", "--json").stdout)
    acme = [row for row in report if row["tenant"] == "acme"]
    assert acme and sum(row["requests"] for row in acme) >= 5
    audit = json.loads(run_cli(world.home, "audit", "--json", "--limit", "500").stdout)
    actions = {(e["action"], e["outcome"]) for e in audit}
    assert {("tenant.create", "ok"), ("key.create", "ok"), ("key.revoke", "ok"), ("auth", "denied")} <= actions
    with pytest.raises(DBAPIError, match="append-only"):
        store_sql(world.home, "DELETE FROM audit_log")


def test_no_key_ever_reaches_logs_errors_or_the_audit_log(server: ServerProcess, world: World) -> None:
    canary = world.keys["canary"]
    secret = canary.split("_", 2)[2]  # llmos_<prefix>_<secret>; the secret itself may hold "_"
    ok = client(server, canary).chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=4)
    assert ok.choices
    tampered = canary[:-4] + "AAAA"
    with pytest.raises(openai.AuthenticationError) as denied:
        client(server, tampered).chat.completions.create(model="smollm2", messages=QUESTION)
    outputs = [str(denied.value.body), server.read_log()]
    outputs.append(run_cli(world.home, "audit", "--json", "--limit", "1000").stdout)
    outputs.append(run_cli(world.home, "keys", "list", "--json").stdout)
    outputs.append(httpx.get(f"{server.base}/metrics", headers={"Authorization": f"Bearer {world.keys['admin']}"}).text)
    for table in ("api_keys", "usage", "audit_log"):
        outputs.append("\n".join(str(row) for row in store_sql(world.home, f"SELECT * FROM {table}")))  # noqa: S608
    for text in outputs:
        assert secret not in text
        assert tampered.split("_", 2)[2] not in text


def test_serving_beyond_loopback_without_a_key_is_refused(tmp_path: Path, database: str) -> None:
    # ``database`` (SQLite, not parametrized): an empty store of its own, not the module's shared one
    result = run_cli(tmp_path / "empty-home", "serve", "--host", "203.0.113.5", "--port", "9")
    assert result.returncode == 1
    assert "llmos keys create" in result.stderr and "203.0.113.5" in result.stderr
