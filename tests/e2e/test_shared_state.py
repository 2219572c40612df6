"""Two `llmos serve` front ends on one PostgreSQL database, each with its own home.

They share tenants, keys and token budgets (two front ends spending one budget at once never overspend it), jobs (a
job runs on exactly one of them; when that one dies, the other takes it over) and models (a version registered by
one is served by the other, which fetches the blobs it lacks from its peer by digest).

It runs on PostgreSQL, the shared database of a team deployment; the same statements run on one SQLite file, whose
budget race `tests/integration/test_budget_ledger.py` runs on both databases (a second pair of servers here would
add two minutes to the suite for no other path).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from llmos.config import Settings
from llmos.jobs.service import JobService, JobView, runner_id
from llmos.registry import sources
from llmos.registry.datasets import store_rows
from llmos.registry.service import Registry
from llmos.security.budgets import BudgetLedger
from llmos.security.service import SecurityService, period_start
from tests.helpers import ServerProcess, make_tiny_base, run_cli, toy_qa_rows

pytestmark = pytest.mark.timeout(600)

BUDGET = 300
QUESTION = [{"role": "user", "content": "Name a color."}]


@dataclass
class Deployment:
    url: str
    homes: list[Path]
    servers: list[ServerProcess]
    key: str

    def env(self) -> dict[str, str]:
        return {"LLMOS_DATABASE_URL": self.url}

    def settings(self, index: int) -> Settings:
        return Settings(home=self.homes[index], database_url=self.url)  # type: ignore[arg-type]


def _server(home: Path, url: str) -> ServerProcess:
    env = {"LLMOS_DATABASE_URL": url, "LLMOS_JOB_LEASE_SECONDS": "5", "LLMOS_JOB_DISPATCH_SECONDS": "0.3"}
    return ServerProcess(home, env=env)


@pytest.fixture(scope="module")
def deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, smollm2_file: Path
) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("shared")
    url = request.getfixturevalue("postgres_server").create_database()
    homes = [root / "a" / "home", root / "b" / "home"]
    first = Settings(home=homes[0], database_url=url)  # type: ignore[arg-type]
    registry = Registry(first)
    sources.pull(registry, "smollm2")  # only front end A holds the model's bytes
    registry.close()
    base = make_tiny_base(root / "base")
    for home in homes:  # the job's inputs are on both (the job must survive A's death)
        settings = Settings(home=home, database_url=url)  # type: ignore[arg-type]
        registry = Registry(settings)
        registry.import_path(base, "tiny")
        rows = toy_qa_rows(60)
        for i, row in enumerate(rows):
            row["split"] = "validation" if i % 6 == 0 else "train"
        store_rows(registry, rows, "toy", operation="import", report={})
        registry.close()
    env = {"LLMOS_DATABASE_URL": url}
    assert run_cli(homes[0], "tenants", "create", "acme", env=env).returncode == 0
    made = run_cli(
        homes[0], "keys", "create", "--tenant", "acme", "--role", "developer", "--budget", str(BUDGET), env=env
    )
    assert made.returncode == 0, made.stderr
    servers = [_server(home, url) for home in homes]
    try:
        yield Deployment(url, homes, servers, made.stdout.strip())
    finally:
        for server in servers:
            server.stop()


def test_a_model_registered_by_one_front_end_is_served_by_the_other(deployment: Deployment) -> None:
    registry = Registry(deployment.settings(1), maintain=False)
    try:
        digest = registry.show("smollm2").files[0].digest
        assert not registry.blobs.exists(digest)  # B has the row (shared database) but not the bytes
    finally:
        registry.close()
    client = OpenAI(base_url=f"{deployment.servers[1].base}/v1", api_key=deployment.key, max_retries=0, timeout=120)
    answer = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content
    registry = Registry(deployment.settings(1), maintain=False)
    try:
        assert registry.blobs.exists(digest)  # fetched from A by digest, verified on the way in
        assert registry.blobs.rehash(digest) == digest
    finally:
        registry.close()


async def _spend(base: str, key: str, count: int) -> list[int]:
    async with httpx.AsyncClient(timeout=180) as client:

        async def one(i: int) -> int:
            body = {"model": "smollm2", "messages": QUESTION, "max_tokens": 24, "temperature": 0.8, "seed": i}
            response = await client.post(
                f"{base}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
            )
            if response.status_code == 429:
                assert response.json()["error"]["code"] == "insufficient_quota", response.text
            return response.status_code

        return list(await asyncio.gather(*(one(i) for i in range(count))))


def test_two_front_ends_spending_one_budget_at_once_never_overspend_it(deployment: Deployment) -> None:
    async def both() -> list[list[int]]:
        return list(await asyncio.gather(*(_spend(server.base, deployment.key, 8) for server in deployment.servers)))

    statuses = asyncio.run(both())
    for per_front_end in statuses:
        assert set(per_front_end) <= {200, 429}, per_front_end
    assert 200 in statuses[0] + statuses[1]
    assert 429 in statuses[0] + statuses[1]  # 16 requests of up to ~60 tokens: far beyond the budget
    security = SecurityService(deployment.settings(0))
    try:
        security.flush_usage()
        prefix = deployment.key.split("_")[1]
        spent = security.usage_since(period_start("month"), key_prefix=prefix)
        ledger = BudgetLedger(security.session, security.scope_usage_since)
        deadline = time.monotonic() + 30  # each server settles from a writer thread, just after its responses
        while (counted := ledger.committed(f"key:{prefix}", period_start("month"))) != spent:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        security.close()
    assert 0 < spent <= BUDGET, spent
    assert counted == spent  # every reservation was settled to what its request used, on both front ends


def _wait(jobs: JobService, job_id: str, predicate: Any, timeout: float = 240) -> JobView:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = jobs.get(job_id)
        if predicate(view):
            return view
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never got there: {jobs.get(job_id)}")


def test_a_job_runs_on_one_front_end_and_the_other_takes_it_over_when_it_dies(deployment: Deployment) -> None:
    body = {"base": "tiny", "data": "toy", "name": "shared", "max_steps": 60, "lr": 0.02, "batch_size": 4,
            "checkpoint_every": 10}  # fmt: skip
    created = httpx.post(
        f"{deployment.servers[0].base}/admin/jobs",
        json=body,
        headers={"authorization": f"Bearer {deployment.key}"},
        timeout=30,
    )
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    jobs = JobService(deployment.settings(1))
    try:
        running = _wait(jobs, job_id, lambda v: v.state == "running" and v.progress.get("step", 0) >= 5)
        runners = [runner_id(home) for home in deployment.homes]
        assert running.runner in runners and running.attempts == 1
        first = runners.index(running.runner)
        other = 1 - first
        logs = [(home / "jobs" / job_id / "job.log") for home in deployment.homes]
        assert logs[first].is_file() and not logs[other].exists()  # exactly one front end started it
        # the whole front end that runs it dies: its server and its worker, with no chance to say so
        assert running.pid is not None
        deployment.servers[first].process.kill()
        os.kill(running.pid, signal.SIGKILL)
        deployment.servers[first].process.wait(10)
        taken = _wait(jobs, job_id, lambda v: v.attempts == 2 and v.runner == runners[other])
        assert taken.runner == runners[other]
        done = _wait(jobs, job_id, lambda v: v.state in ("succeeded", "failed", "cancelled", "interrupted"))
        assert done.state == "succeeded", (done, logs[other].read_text())
        assert done.runner == runners[other] and done.attempts == 2
        assert "attempt 2 started" in logs[other].read_text()
    finally:
        jobs.close()
