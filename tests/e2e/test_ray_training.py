"""Acceptance: `llmos train --ray --workers 2` and `llmos eval --ray` on the tests' own local Ray cluster.

Two DDP workers must end where one process ends with the same global batch and seed. (A worker killed mid-training
is tested where it is harder: a whole Ray node killed, in tests/e2e/test_multinode_training.py.) The
training model is the tiny random Llama of the other training tests, so each run is a few seconds of compute; most
of the time is Ray Train starting its worker processes. Perplexity of SmolLM2 sharded over two Ray workers must
equal the one-process measurement.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmos.config import Settings
from llmos.data.shipped import heldout_text_path
from llmos.jobs.service import JobService
from llmos.registry import sources
from llmos.registry.datasets import store_rows
from llmos.registry.service import Registry
from tests.helpers import TRAIN_ARGS, TRAIN_STEPS, run_cli, seed_training_store, train_metrics
from tests.multinode import covered_by_multinode

pytest.importorskip("ray")

STEPS = TRAIN_STEPS


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray-train")
    seed_training_store(root / "home", root / "base")
    return root / "home"


def train(home: Path, *args: str) -> dict[str, Any]:
    return train_metrics(home, *args)


@pytest.fixture(scope="module")
def single(training_reference: dict[str, Any]) -> dict[str, Any]:
    """The reference: the same job in one process (shared with the multi-node training tests)."""
    return training_reference


def close(value: float, reference: float) -> bool:
    return abs(value - reference) <= 0.02 * abs(reference)


@covered_by_multinode("test_multinode_training.py::test_two_ranks_on_two_nodes_end_where_one_process_ends")
@pytest.mark.timeout(600)
def test_two_ddp_workers_end_where_one_process_ends(home: Path, single: dict[str, Any], ray_cluster: Any) -> None:
    ddp = train(home, "--name", "ddp", "--ray", ray_cluster.address, "--workers", "2")
    print(
        f"\nfinal train loss: one process {single['train_loss']:.5f}, 2 DDP workers {ddp['train_loss']:.5f};"
        f" validation {single['validation_loss']:.5f} vs {ddp['validation_loss']:.5f}"
        f" (from {single['initial_validation_loss']:.5f})"
    )
    assert ddp["steps"] == single["steps"] == STEPS and ddp["tokens"] == single["tokens"]
    assert ddp["resumed_from"] is None
    assert single["validation_loss"] < 0.9 * single["initial_validation_loss"]  # it learnt: the match means something
    assert close(ddp["train_loss"], single["train_loss"]) and close(ddp["validation_loss"], single["validation_loss"])
    registry = Registry(Settings(home=home))
    try:
        lineage = registry.show("ddp").lineage[0].params
    finally:
        registry.close()
    assert lineage["distributed"] == {"backend": "ray", "workers": 2}


def test_ray_options_are_checked_before_anything_is_queued(home: Path) -> None:
    refused = run_cli(home, "train", *TRAIN_ARGS, "--name", "x", "--workers", "2")
    assert refused.returncode == 1 and "--workers needs --ray" in refused.stderr
    no_cluster = run_cli(home, "train", *TRAIN_ARGS, "--name", "x", "--ray", "auto")
    assert no_cluster.returncode == 1 and "llmos cluster start" in no_cluster.stderr
    remote = run_cli(home, "train", *TRAIN_ARGS, "--name", "x", "--ray", "10.1.2.3:6379")
    assert remote.returncode == 1 and "not on this machine" in remote.stderr
    not_sharded = run_cli(home, "eval", "tiny", "--task", "bleu", "--data", "toy", "--ray", "auto")
    assert not_sharded.returncode == 1 and "--ray shards the perplexity task" in not_sharded.stderr
    jobs = JobService(Settings(home=home))
    try:
        assert not [job for job in jobs.list_jobs() if job.params.get("name") == "x"]
    finally:
        jobs.close()


@pytest.mark.timeout(600)
def test_perplexity_sharded_over_two_ray_workers_equals_one_process(home: Path, ray_cluster: Any) -> None:
    registry = Registry(Settings(home=home))
    try:
        sources.pull(registry, "smollm2")
        paragraphs = [p for p in heldout_text_path().read_text().split("\n\n") if p.strip()][:3]
        store_rows(registry, [{"text": p} for p in paragraphs], "prose", operation="import", report={})
    finally:
        registry.close()
    args = ("eval", "smollm2", "--data", "prose", "--window", "64", "--stride", "32", "--json")
    local = run_cli(home, *args)
    sharded = run_cli(home, *args, "--ray", ray_cluster.address, "--workers", "2", timeout=400)
    assert local.returncode == 0 and sharded.returncode == 0, local.stderr + sharded.stderr
    one, two = json.loads(local.stdout)[0], json.loads(sharded.stdout)[0]
    ppl_one, ppl_two = one["metrics"]["perplexity"], two["metrics"]["perplexity"]
    print(f"\nperplexity: one process {ppl_one:.5f}, 2 Ray workers {ppl_two:.5f}")
    assert two["metrics"]["tokens"] == one["metrics"]["tokens"] > 200
    assert two["params"]["windows"] > 5 and "2 Ray workers" in two["params"]["backend"]
    assert abs(ppl_two - ppl_one) <= 1e-3 * ppl_one
