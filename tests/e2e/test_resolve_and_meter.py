"""A request is served by the version it was authorised for, and pays for every token generated for it."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from llmos.api.app import create_app
from llmos.config import Settings
from llmos.registry import aliases
from llmos.registry.service import Registry
from llmos.registry.views import VersionView
from llmos.runtime.residency import Lease
from llmos.security.principal import Limits
from llmos.security.service import SecurityService
from tests.helpers import ServerProcess, gguf_bytes

QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]


def fingerprint(digest: str) -> str:
    return f"llmos-{digest.removeprefix('sha256:')[:12]}"


def test_a_tag_moved_between_authorisation_and_load_changes_nothing(
    tmp_path: Path, smollm2_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(home=tmp_path / "home")
    registry = Registry(settings)
    v1 = registry.import_path(smollm2_file, "bot:v1")
    decoy = tmp_path / "decoy.gguf"  # another version, which cannot even generate: serving it would fail loudly
    decoy.write_bytes(gguf_bytes(tensors=[("decoy", (64,), 0)]))
    v2 = registry.import_path(decoy, "bot:v2")
    registry.tag("bot:v1", "bot:prod")
    registry.close()
    assert v1.digest != v2.digest

    app = create_app(settings)
    state = app.state.llmos
    lease = state.residency.lease
    moves: list[str] = []

    def move_then_lease(name: str | VersionView, keep_alive: float | None = None) -> Lease:
        """The hook between authorisation and load: the alias moves to the other version first."""
        if not moves:
            moves.append(aliases.move(state.registry, "bot:v2", "bot:prod", reason="moved mid-request").digest)
        return lease(name, keep_alive)

    monkeypatch.setattr(state.residency, "lease", move_then_lease)
    body: dict[str, Any] = {"messages": QUESTION, "max_tokens": 4, "temperature": 0}
    with TestClient(app) as http:
        answer = http.post("/v1/chat/completions", json={**body, "model": "bot:prod"})
        assert moves == [v2.digest] and state.registry.show("bot:prod").digest == v2.digest  # it did move
        assert answer.status_code == 200, answer.text
        data = answer.json()
        assert data["system_fingerprint"] == fingerprint(v1.digest) and data["choices"][0]["message"]["content"]
        assert data["model"] == "bot:prod"
        resident = {m["digest"] for m in http.get("/admin/runtime").json()["models"]}
        assert resident == {v1.digest}  # the version it was authorised for answered; the other was never loaded

        # the loaded version asked for under another name answers with that name, not the one that loaded it
        state.registry.tag("bot:v1", "bot:canary")
        other = http.post("/v1/completions", json={"model": "bot:canary", "prompt": "Hi", "max_tokens": 2})
        assert other.status_code == 200, other.text
        assert other.json()["model"] == "bot:canary" and other.json()["system_fingerprint"] == fingerprint(v1.digest)
        now = http.post("/v1/chat/completions", json={**body, "model": "bot:prod"})  # a new request follows the move
        assert now.status_code == 503 and "bot:prod failed to load" in now.json()["error"]["message"]


class Budgeted:
    def __init__(self, home: Path, server: ServerProcess, admin: str, consumer: str) -> None:
        self.home, self.server, self.admin, self.consumer = home, server, admin, consumer
        self.prefix = consumer.split("_")[1]

    def usage(self) -> tuple[int, int, int]:
        """Requests, prompt tokens and completion tokens recorded for the consumer key."""
        with sqlite3.connect(self.home / "llmos.db") as conn:
            count, prompt, completion = conn.execute(
                "SELECT COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM usage WHERE key_prefix = ?",
                (self.prefix,),
            ).fetchone()
        return int(count), int(prompt or 0), int(completion or 0)


@pytest.fixture
def budgeted(tmp_path: Path, smollm2_file: Path) -> Iterator[Budgeted]:
    home = tmp_path / "home"
    settings = Settings(home=home)
    registry = Registry(settings)
    registry.import_path(smollm2_file, "smollm2")
    registry.close()
    security = SecurityService(settings)
    security.create_tenant("acme")
    admin, _ = security.create_key("acme", "admin")
    consumer, _ = security.create_key("acme", "consumer", limits=Limits(token_budget=100))
    security.close()
    server = ServerProcess(home, "--model", "smollm2")
    try:
        yield Budgeted(home, server, admin, consumer)
    finally:
        server.stop()


def stream_first_chunk(base: str, key: str, max_tokens: int) -> int:
    """Stream a chat completion, read until its first generated text, then hang up; the response status."""
    body = {"model": "smollm2", "messages": QUESTION, "max_tokens": max_tokens, "stream": True, "temperature": 0}
    with (
        httpx.Client(timeout=60) as http,
        http.stream(
            "POST", f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as response,
    ):
        if response.status_code != 200:
            response.read()
            return response.status_code
        for line in response.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content"):
                    return 200  # leaving the blocks closes the connection mid-stream
    raise AssertionError("the stream ended before any text")


def test_a_stream_closed_after_its_first_chunk_pays_for_what_was_generated(budgeted: Budgeted) -> None:
    base, max_tokens = budgeted.server.base, 30
    served = 0
    while True:
        status = stream_first_chunk(base, budgeted.consumer, max_tokens)
        if status == 429:
            break
        assert status == 200 and served < 20, status
        served += 1
        deadline = time.monotonic() + 10
        while budgeted.usage()[0] < served:  # the server settles the request once the engine confirms the abort
            assert time.monotonic() < deadline, "the disconnected stream was never settled"
            time.sleep(0.05)
    requests, prompt, completion = budgeted.usage()
    admin = {"Authorization": f"Bearer {budgeted.admin}"}
    runtime = httpx.get(f"{base}/admin/runtime", headers=admin, timeout=30).json()
    generated = sum(m.get("generated_tokens", 0) for m in runtime["models"])
    assert requests == served >= 1
    assert completion == generated > 0  # every token the engine produced for the key is charged, read or not
    spent = prompt + completion
    assert spent <= 100 < spent + prompt // served + max_tokens  # refused once the next request could not fit
