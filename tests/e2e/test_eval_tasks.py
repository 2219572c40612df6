"""Evaluation tasks beyond perplexity with the bundled SmolLM2: generation scored by exact match, a multiple-choice
task from a YAML file, stored reports, `llmos eval compare`, bad task files, and evaluation as a background job
(CLI --detach) whose report the admin API returns."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmos.config import Settings
from llmos.jobs.service import JobService
from llmos.registry.datasets import store_rows
from llmos.registry.service import Registry
from tests.helpers import ServerProcess, run_cli

CAPITALS = [
    ("France", "Paris", ["Berlin", "Paris", "Madrid"]),
    ("Germany", "Berlin", ["Berlin", "Rome", "Lisbon"]),
    ("Italy", "Rome", ["Vienna", "Athens", "Rome"]),
    ("Spain", "Madrid", ["Madrid", "Paris", "Oslo"]),
    ("Japan", "Tokyo", ["Beijing", "Tokyo", "Seoul"]),
    ("the United Kingdom", "London", ["Dublin", "Edinburgh", "London"]),
    ("Russia", "Moscow", ["Moscow", "Warsaw", "Kyiv"]),
    ("China", "Beijing", ["Shanghai", "Beijing", "Hong Kong"]),
    ("Egypt", "Cairo", ["Cairo", "Nairobi", "Tunis"]),
]
DATASET = "evaltasks-capitals"
MC_YAML = """\
name: capitals-mc
type: multiple_choice
prompt: "Question: {prompt}\\nAnswer:"
reference: completion
choices: choices
metric: accuracy
chat: false
"""


@pytest.fixture(scope="module")
def home(pulled_settings: Settings) -> Path:
    rows = [
        {"prompt": f"What is the capital of {country}?", "completion": capital, "choices": choices}
        for country, capital, choices in CAPITALS
    ]
    registry = Registry(pulled_settings)
    store_rows(registry, rows, DATASET, operation="import", report={"rows": len(rows)})
    registry.close()
    return pulled_settings.home


def _eval(home: Path, *args: str) -> list[dict[str, Any]]:
    result = run_cli(home, "eval", "smollm2", *args, "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    reports: list[dict[str, Any]] = json.loads(result.stdout)
    return reports


@pytest.mark.timeout(600)
def test_exact_match_and_a_multiple_choice_yaml_task_store_reports(home: Path, tmp_path: Path) -> None:
    [report] = _eval(home, "--task", "exact_match", "--data", DATASET, "--limit", "8", "--max-tokens", "24")
    assert report["task"] == "exact_match" and report["dataset"] == f"{DATASET}:latest"
    assert report["dataset_digest"].startswith("sha256:") and report["model_digest"].startswith("sha256:")
    metrics, params = report["metrics"], report["params"]
    assert metrics["samples"] == 8 and params["limit"] == 8 and params["chat"] is True
    # an instruct model answers in sentences: few exact matches, but the capital is in most answers
    assert metrics["exact_match"] <= metrics["contains"] and metrics["contains"] >= 0.5, params["examples"]
    assert params["tokens"] > 0 and params["tokens_per_second"] > 0 and params["backend"] == "llama.cpp"

    task_file = tmp_path / "capitals.yaml"
    task_file.write_text(MC_YAML)
    [mc] = _eval(home, "--task", str(task_file), "--data", DATASET, "--limit", "6")
    assert mc["task"] == "capitals-mc" and mc["metrics"]["samples"] == 6
    assert mc["metrics"]["accuracy"] >= 5 / 6 and mc["metrics"]["accuracy_norm"] >= 4 / 6, mc["params"]["examples"]
    assert mc["params"]["spec"]["prompt"] == "Question: {prompt}\nAnswer:"

    compared = run_cli(home, "eval", "compare", "smollm2", "--task", "capitals-mc", "--json")
    assert compared.returncode == 0, compared.stderr
    [row] = json.loads(compared.stdout)
    assert row["accuracy"] == mc["metrics"]["accuracy"] and row["report"] == mc["id"]
    table = run_cli(home, "eval", "compare", "smollm2", "smollm2:nothing-here", "--task", "exact_match")
    assert table.returncode == 1  # an unknown model is an error, not an empty row

    # a task file with a missing field fails before anything loads or is stored, naming the field
    task_file.write_text(MC_YAML.replace("reference: completion\n", ""))
    bad = run_cli(home, "eval", "smollm2", "--task", str(task_file), "--data", DATASET)
    assert bad.returncode == 1 and "'reference'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    task_file.write_text(MC_YAML.replace("{prompt}", "{question}"))
    bad = run_cli(home, "eval", "smollm2", "--task", str(task_file), "--data", DATASET)
    assert bad.returncode == 1 and "'question'" in bad.stderr, bad.stderr
    again = json.loads(run_cli(home, "eval", "compare", "smollm2", "--task", "capitals-mc", "--json").stdout)
    assert again == [row]


@pytest.mark.timeout(600)
def test_eval_job_runs_in_the_background_and_the_api_compares_reports(home: Path) -> None:
    started = run_cli(
        home, "eval", "smollm2", "--task", "multiple_choice", "--data", DATASET, "--limit", "4", "--detach"
    )
    assert started.returncode == 0, started.stderr
    job_id = started.stdout.strip()
    jobs = JobService(Settings(home=home))
    try:
        deadline = time.monotonic() + 300
        while (view := jobs.get(job_id)).state in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.5)
            jobs.dispatch()
        assert view.state == "succeeded", (view.error, jobs.log_path(job_id).read_text())
        assert view.kind == "eval" and view.progress["step"] == view.progress["total"] == 3 * 4
        assert view.result["metrics"]["accuracy"] >= 0.75 and "step 12/12" in jobs.log_path(job_id).read_text()
    finally:
        jobs.close()
    server = ServerProcess(home)
    try:
        listed = httpx.get(f"{server.base}/admin/evaluations", params={"task": "multiple_choice"}, timeout=30)
        assert listed.status_code == 200, listed.text
        [report] = [r for r in listed.json()["data"] if r["job_id"] == job_id]
        assert report["id"] == view.result["report"] and report["metrics"] == view.result["metrics"]
        query = [("model", "smollm2"), ("model", "smollm2:latest"), ("task", "multiple_choice")]
        compared = httpx.get(f"{server.base}/admin/evaluations", params=query, timeout=30).json()
        assert compared["metrics"][:2] == ["accuracy", "accuracy_norm"]
        assert [r["report"] for r in compared["data"]] == [report["id"]] * 2
        bad = httpx.post(f"{server.base}/admin/jobs", json={"kind": "eval", "model": "smollm2", "task": "bleu"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "data"
    finally:
        server.stop()
