"""Acceptance: `llmos train --ray ADDRESS --workers 2` over two Ray nodes that share nothing but the front end.

The cluster is ``tests/multinode.py``'s: a head (no CPUs) and two worker nodes of one CPU each, in three network
namespaces, each node with its own llmos home. The job runs from the head's namespace against the head's home (the
front end); Ray Train must put one rank on each worker node. The ranks get the base model from the front end's
blob server into their own node's home, and the checkpoints, rank records, progress and the trained model reach
the head's job directory through the run's hub actor only. Two DDP ranks on two machines must end where one process
ends; when a whole worker node dies mid-run (every process of its namespace SIGKILLed) and comes back, the run must
resume from the newest checkpoint the front end holds and end there too. The model is the tiny random Llama of
``test_ray_training.py``, with the same steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from llmos.config import Settings
from llmos.jobs.service import JobService
from llmos.registry.service import Registry
from tests.helpers import TRAIN_ARGS, TRAIN_STEPS, seed_training_store

pytest.importorskip("ray")

STEPS = TRAIN_STEPS
ARGS = TRAIN_ARGS


@pytest.fixture(scope="module")
def front(multinode_cluster: Any) -> Path:
    """The head's llmos home (the front end's store) with the tiny base and the toy dataset."""
    home = Path(multinode_cluster.head.home)
    seed_training_store(home, home.parent / "base")
    registry = Registry(Settings(home=home))
    try:
        assert registry.show("tiny").files
    finally:
        registry.close()
    return home


@pytest.fixture(scope="module")
def single(training_reference: dict[str, Any]) -> dict[str, Any]:
    """The reference: the same job in one process on this machine (shared with the single-node Ray tests)."""
    return training_reference


def close(value: float, reference: float) -> bool:
    return abs(value - reference) <= 0.02 * abs(reference)


def on_head(cluster: Any, *args: str) -> subprocess.Popen[str]:
    """`llmos train ...` started in the head's namespace, on the head's home."""
    argv = [sys.executable, "-m", "llmos", "train", *ARGS, "--ray", cluster.ray_address, "--workers", "2", *args]
    return cluster.head.popen(argv, env={"COLUMNS": "200"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rank_records(work: Path) -> dict[int, dict[str, Any]]:
    return {rank: json.loads((work / "workers" / f"rank-{rank}.json").read_text()) for rank in (0, 1)}


def check_placement(cluster: Any, records: dict[int, dict[str, Any]]) -> None:
    """One rank on each worker node: different node addresses, both workers', never the head's."""
    addresses = {record["address"] for record in records.values()}
    assert addresses == {worker.address for worker in cluster.workers}, records
    assert len({record["node_id"] for record in records.values()}) == 2, records


def check_fetched(cluster: Any, front: Path) -> None:
    """Each worker node holds the base's blobs in its own home (fetched from the front end), the head's store too."""
    registry = Registry(Settings(home=front))
    try:
        digests = [file.digest.split(":", 1)[1] for file in registry.show("tiny").files]
    finally:
        registry.close()
    for worker in cluster.workers:
        held = {path.name for path in Path(worker.home).rglob("*") if path.is_file()}
        assert set(digests) <= held, (worker.name, sorted(held)[:20])


def check_detached(cluster: Any, records: dict[int, dict[str, Any]], front: Path) -> None:
    """The live rank processes run with their own node's home and hold nothing of the front end's home open (a
    snapshot: the namespaces share this machine's file system, so a rank could reach the front end's files by path;
    this catches one that keeps any of them open, runs in that home or is told about it)."""
    homes = {worker.address: str(worker.home) for worker in cluster.workers}
    for record in records.values():
        proc = Path(f"/proc/{record['pid']}")
        environ = dict(
            item.split("=", 1) for item in proc.joinpath("environ").read_bytes().decode().split("\0") if "=" in item
        )
        assert environ.get("LLMOS_HOME") == homes[record["address"]], record
        assert str(front) not in "\0".join(environ.values()), record
        assert not proc.joinpath("cwd").resolve().is_relative_to(front), record
        for fd in proc.joinpath("fd").iterdir():
            try:
                target = Path(fd.readlink())
            except OSError:  # closed meanwhile
                continue
            assert not target.is_relative_to(front), (record, target)


def job_of(front: Path, name: str) -> str:
    jobs = JobService(Settings(home=front))
    try:
        return next(job.id for job in jobs.list_jobs() if job.params.get("name") == name)
    finally:
        jobs.close()


@pytest.mark.timeout(400)
def test_two_ranks_on_two_nodes_end_where_one_process_ends(
    multinode_cluster: Any, front: Path, single: dict[str, Any]
) -> None:
    started = time.monotonic()
    process = on_head(multinode_cluster, "--name", "ddp2", "--wait")
    out, err = process.communicate(timeout=300)
    seconds = time.monotonic() - started
    assert process.returncode == 0, out[-3000:] + err[-3000:]
    ddp = dict(json.loads(out.strip().splitlines()[-1])["metrics"])
    print(
        f"\n2 ranks on 2 nodes in {seconds:.1f} s: final train loss {ddp['train_loss']:.5f}"
        f" (one process {single['train_loss']:.5f}), validation {ddp['validation_loss']:.5f}"
        f" ({single['validation_loss']:.5f}, from {single['initial_validation_loss']:.5f})"
    )
    assert ddp["steps"] == single["steps"] == STEPS and ddp["tokens"] == single["tokens"]
    assert ddp["resumed_from"] is None
    assert single["validation_loss"] < 0.9 * single["initial_validation_loss"]  # it learnt: the match means something
    assert close(ddp["train_loss"], single["train_loss"]) and close(ddp["validation_loss"], single["validation_loss"])
    jobs = JobService(Settings(home=front))
    try:
        work = jobs.job_dir(job_of(front, "ddp2")) / "ray"
    finally:
        jobs.close()
    check_placement(multinode_cluster, rank_records(work))
    check_fetched(multinode_cluster, front)
    registry = Registry(Settings(home=front))
    try:
        assert registry.show("ddp2").lineage[0].params["distributed"] == {"backend": "ray", "workers": 2}
    finally:
        registry.close()


@pytest.mark.timeout(400)
def test_a_run_whose_worker_node_dies_resumes_from_the_front_ends_checkpoint(
    multinode_cluster: Any, front: Path, single: dict[str, Any]
) -> None:
    started = time.monotonic()
    process = on_head(multinode_cluster, "--name", "node-death")
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, out[-3000:] + err[-3000:]
    job_id = out.strip().splitlines()[-1]
    jobs = JobService(Settings(home=front))
    work = jobs.job_dir(job_id) / "ray"
    deadline = time.monotonic() + 300
    step = 0
    while step < 25:  # past two checkpoints (every 10 steps), well before the end
        assert time.monotonic() < deadline, jobs.log_path(job_id).read_text()
        assert jobs.get(job_id).state in ("queued", "running"), jobs.log_path(job_id).read_text()
        lines = jobs.metrics_path(job_id).read_text().splitlines() if jobs.metrics_path(job_id).exists() else []
        step = json.loads(lines[-1])["step"] if lines else 0
        time.sleep(0.02)
    before = rank_records(work)
    check_placement(multinode_cluster, before)
    check_detached(multinode_cluster, before, front)
    victim = next(w for w in multinode_cluster.workers if w.address == before[1]["address"])
    victim.kill_all()  # the machine of rank 1 dies: its raylet, object store and rank, all at once
    killed_at = time.monotonic()
    multinode_cluster.wait_alive(2)
    victim.start_ray()  # and comes back, empty of Ray state but with its own llmos home
    rejoined = time.monotonic() - killed_at
    while jobs.get(job_id).state in ("queued", "running"):
        assert time.monotonic() < deadline, jobs.log_path(job_id).read_text()
        time.sleep(0.5)
    view = jobs.get(job_id)
    log = jobs.log_path(job_id).read_text()
    jobs.close()
    seconds = time.monotonic() - started
    assert view.state == "succeeded", log
    metrics = view.result["metrics"]
    print(
        f"\nkilled {victim.name} (rank 1) at step >= {step}; it rejoined after {rejoined:.1f} s; resumed from step"
        f" {metrics['resumed_from']}; final train loss {metrics['train_loss']:.5f} (one process"
        f" {single['train_loss']:.5f}), validation {metrics['validation_loss']:.5f} ({single['validation_loss']:.5f});"
        f" {seconds:.1f} s in all"
    )
    assert metrics["resumed_from"] is not None and 20 <= metrics["resumed_from"] < STEPS, log
    assert metrics["resumed_from"] % 10 == 0, log
    assert f"resumed from the checkpoint of step {metrics['resumed_from']} (worker group start 2)" in log
    after = rank_records(work)
    check_placement(multinode_cluster, after)
    assert {r["pid"] for r in after.values()}.isdisjoint({r["pid"] for r in before.values()}), (before, after)
    assert metrics["steps"] == STEPS
    assert close(metrics["train_loss"], single["train_loss"])
    assert close(metrics["validation_loss"], single["validation_loss"])
