"""The job system with real worker subprocesses: queue, progress, cancel, kill -9 and resume, server restarts."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmos.config import Settings
from llmos.errors import ConflictError, NotFoundError
from llmos.jobs.service import JobService, JobView
from llmos.registry.datasets import store_rows
from llmos.registry.service import Registry
from llmos.store.crypto import MAGIC
from tests.helpers import ServerProcess, make_tiny_base, run_cli, toy_qa_rows
from tests.postgres import DATABASES

pytestmark = pytest.mark.parametrize("database", DATABASES, indirect=True)

TRAIN = {
    "base": "tiny", "data": "toy", "method": "lora", "lr": 0.02, "batch_size": 4, "warmup_steps": 2,
    "checkpoint_every": 10, "eval_every": 100, "seed": 5, "threads": 1, "lora_r": 8,
}  # fmt: skip


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database: str) -> Settings:
    home = tmp_path / "home"
    monkeypatch.setenv("LLMOS_HOME", str(home))
    settings = Settings(home=home)
    registry = Registry(settings)
    registry.import_path(make_tiny_base(tmp_path / "base"), "tiny")
    rows = toy_qa_rows(60)
    for i, row in enumerate(rows):
        row["split"] = "validation" if i % 6 == 0 else "train"
    store_rows(registry, rows, "toy", operation="import", report={})
    registry.close()
    return settings


STRAIGHT: dict[str, Any] = {}
"""The kill -9 test's reference: the metrics of the same training run without interruption (first database's run)."""


def wait_for(jobs: JobService, job_id: str, predicate: Any, timeout: float = 240) -> JobView:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs.reconcile()
        view = jobs.get(job_id)
        if predicate(view):
            return view
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never got there: {jobs.get(job_id)}\n{jobs.log_path(job_id).read_text()}")


def final(view: JobView) -> bool:
    return view.state in ("succeeded", "failed", "cancelled", "interrupted")


def test_a_job_runs_to_success_and_registers_a_servable_adapter_with_lineage(world: Settings) -> None:
    jobs = JobService(world)
    job = jobs.create("train", {**TRAIN, "name": "tiny-toy", "max_steps": 20}, resource="train")
    assert jobs.dispatch() == [job.id]
    done = wait_for(jobs, job.id, final)
    assert done.state == "succeeded", jobs.log_path(job.id).read_text()
    assert done.result["model"] == "tiny-toy:latest" and done.progress["step"] == 20
    curve = jobs.metrics(job.id)
    assert [r["step"] for r in curve] == list(range(1, 21)) and all("loss" in r for r in curve)
    view = Registry(world).show("tiny-toy")
    assert view.format == "lora"
    parents = {item.parent_name for item in view.lineage}
    assert {"tiny:latest", "toy:latest"} <= parents
    params = view.lineage[0].params
    assert params["job"] == job.id and params["hyperparameters"]["optimizer"]["lr"] == 0.02
    assert params["dataset_digest"].startswith("sha256:")


def test_one_training_job_at_a_time_the_next_starts_when_the_first_ends(world: Settings) -> None:
    jobs = JobService(world)
    first = jobs.create("train", {**TRAIN, "name": "one", "max_steps": 5}, resource="train")
    second = jobs.create("train", {**TRAIN, "name": "two", "max_steps": 5}, resource="train")
    assert jobs.dispatch() == [first.id]
    assert jobs.get(second.id).state == "queued"
    wait_for(jobs, second.id, final)  # the first worker dispatches the queue when it ends
    assert jobs.get(first.id).state == "succeeded" and jobs.get(second.id).state == "succeeded"
    assert jobs.get(second.id).started_at >= jobs.get(first.id).finished_at  # type: ignore[operator]


def test_kill_9_at_half_way_then_resume_continues_from_the_checkpoint(
    world: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMOS_ENCRYPTION_KEY", "b" * 64)  # the workers encrypt their checkpoints with it
    jobs = JobService(world)
    steps = 200
    if "metrics" not in STRAIGHT:  # the uninterrupted run's result does not depend on the database: run it once
        straight = jobs.create("train", {**TRAIN, "name": "straight", "max_steps": steps}, resource="train")
        jobs.dispatch()
        reference = wait_for(jobs, straight.id, final)
        assert reference.state == "succeeded"
        STRAIGHT["metrics"] = reference.result["metrics"]

    job = jobs.create("train", {**TRAIN, "name": "killed", "max_steps": steps}, resource="train")
    jobs.dispatch()
    running = wait_for(jobs, job.id, lambda v: v.progress.get("step", 0) >= steps // 2 or final(v))
    assert running.state == "running" and running.pid is not None
    os.kill(running.pid, signal.SIGKILL)
    interrupted = wait_for(jobs, job.id, lambda v: v.state != "running")
    assert interrupted.state == "interrupted" and "resume" in (interrupted.error or "")
    with pytest.raises(ConflictError):
        jobs.cancel(job.id)
    saved = list(jobs.checkpoint_dir(job.id).glob("step-*/state.pt"))
    assert saved and all(path.read_bytes().startswith(MAGIC) for path in saved)  # resume reads them decrypted

    jobs.resume(job.id)
    resumed = wait_for(jobs, job.id, final)
    assert resumed.state == "succeeded", jobs.log_path(job.id).read_text()
    deadline = time.monotonic() + 10  # the worker removes them right after recording success
    while jobs.checkpoint_dir(job.id).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not jobs.checkpoint_dir(job.id).exists()
    metrics, expected = resumed.result["metrics"], STRAIGHT["metrics"]
    assert metrics["resumed_from"] >= steps // 2 - 10 and metrics["resumed_from"] > 0  # not from step 0
    assert resumed.attempts == 2
    assert abs(metrics["validation_loss"] - expected["validation_loss"]) <= 0.02 * expected["validation_loss"]


def test_cancel_stops_a_running_job_and_a_queued_one(world: Settings) -> None:
    jobs = JobService(world)
    job = jobs.create("train", {**TRAIN, "name": "long", "max_steps": 100_000}, resource="train")
    queued = jobs.create("train", {**TRAIN, "name": "later", "max_steps": 5}, resource="train")
    jobs.dispatch()
    wait_for(jobs, job.id, lambda v: v.progress.get("step", 0) >= 3)
    assert jobs.cancel(queued.id).state == "cancelled"
    jobs.cancel(job.id)
    assert wait_for(jobs, job.id, final).state == "cancelled"
    assert jobs.get(queued.id).state == "cancelled"


def test_tenants_see_only_their_jobs(world: Settings) -> None:
    jobs = JobService(world)
    from llmos.security.service import SecurityService

    security = SecurityService(world)
    acme = security.create_tenant("acme").id
    globex = security.create_tenant("globex").id
    job = jobs.create("train", {**TRAIN, "name": "x"}, tenant_id=acme)
    assert [v.id for v in jobs.list_jobs(tenant_id=acme)] == [job.id]
    assert jobs.list_jobs(tenant_id=globex) == []
    with pytest.raises(NotFoundError):
        jobs.get(job.id, tenant_id=globex)
    with pytest.raises(NotFoundError):
        jobs.cancel(job.id, tenant_id=globex)


def test_cli_train_validates_before_queueing(world: Settings) -> None:
    home = world.home
    bad = [
        (["--base", "nope", "--data", "toy", "--name", "o"], "not found"),
        (["--base", "tiny", "--data", "missing", "--name", "o"], "not found"),
        (["--base", "tiny", "--data", "toy", "--name", "o", "--lr", "-1"], "lr"),
        (["--base", "tiny", "--data", "toy", "--name", "o", "--batch-size", "0"], "batch_size"),
        (["--base", "tiny", "--data", "toy", "--name", "o", "--optimizer", "lion"], "optimizer"),
        (["--base", "toy", "--data", "toy", "--name", "o"], "dataset"),
    ]
    for args, message in bad:
        result = run_cli(home, "train", *args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
    assert run_cli(home, "jobs", "list", "--json").stdout.strip() == "[]"


def test_cli_train_wait_and_jobs_commands(world: Settings) -> None:
    home = world.home
    result = run_cli(home, "train", "--base", "tiny", "--data", "toy", "--name", "cli-toy", "--max-steps", "6",
                     "--lr", "0.02", "--batch-size", "4", "--wait")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "cli-toy:latest" in result.stdout and "step 6/6" in result.stdout
    listed = run_cli(home, "jobs", "list")
    assert "succeeded" in listed.stdout and "cli-toy" in listed.stdout
    job_id = listed.stdout.splitlines()[1].split()[0]
    shown = run_cli(home, "jobs", "show", job_id, "--json")
    assert '"loss_curve"' in shown.stdout
    assert "step 6/6" in run_cli(home, "jobs", "logs", job_id).stdout
    assert run_cli(home, "jobs", "cancel", job_id).returncode == 1  # already finished
    assert run_cli(home, "jobs", "show", "jdoesnotexist").returncode == 1


def test_server_kill_9_while_a_job_runs_never_leaves_it_stuck_running(world: Settings) -> None:
    env = {"LLMOS_JOB_DISPATCH_SECONDS": "0.3"}
    server = ServerProcess(world.home, env=env)
    body = {"base": "tiny", "data": "toy", "name": "srv", "max_steps": 400, "lr": 0.02, "batch_size": 4,
            "checkpoint_every": 10, "auto_resume": True}  # fmt: skip
    created = httpx.post(f"{server.base}/admin/jobs", json=body, timeout=30)
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    jobs = JobService(world)
    running = wait_for(jobs, job_id, lambda v: v.progress.get("step", 0) > 20)  # past 20: step 20 is saved
    server.process.kill()  # kill -9 of the server: the worker lives in its own session and keeps going
    server.process.wait(10)
    assert running.pid is not None
    os.kill(running.pid, signal.SIGKILL)  # ... and now the worker dies too, while no server runs
    restarted = ServerProcess(world.home, env=env)
    try:
        # the restarted server notices the dead worker and, as the job auto-resumes, runs it again from its checkpoint
        done = wait_for(jobs, job_id, lambda v: v.state == "succeeded" or v.state in ("failed", "cancelled"))
        assert done.state == "succeeded" and done.attempts == 2
        assert done.result["metrics"]["resumed_from"] >= 20
        listed = httpx.get(f"{restarted.base}/admin/jobs", timeout=10).json()["data"]
        assert [j["state"] for j in listed if j["id"] == job_id] == ["succeeded"]
        curve = httpx.get(f"{restarted.base}/admin/jobs/{job_id}/metrics", timeout=10).json()["data"]
        assert curve[-1]["step"] == 400
    finally:
        restarted.stop()
