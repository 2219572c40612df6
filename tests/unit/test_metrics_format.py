"""The /metrics exposition: valid Prometheus text, conventions, and a Grafana dashboard that only uses real names."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmos.engine.core import EngineStats, StepStats
from llmos.observability.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "llmos-dashboard.json"
NAME = re.compile(r"\bllmos_[a-z0-9_]+\b")


def busy_metrics(tmp_path: Path) -> Metrics:
    """A Metrics object with one observation in every family, as a server has after some traffic."""
    metrics = Metrics(
        engine_stats=lambda: [
            ("smollm2:latest", EngineStats(running=2, waiting=1, kv_cells_used=10, kv_cells_total=40))
        ],
        memory=lambda: (1000, 2000, [("smollm2:latest", "llama.cpp", 500)]),
        jobs=lambda: ([("train", "running", 1), ("eval", "succeeded", 3)], [("j0123456789ab", "train", 1.25)]),
        home=tmp_path,
    )
    metrics.observe_http("POST", "/v1/chat/completions", 200, 0.5)
    metrics.observe_request("chat", "smollm2:latest", "acme", 200, 0.5)
    metrics.count_tokens("smollm2:latest", "acme", prompt=10, completion=5)
    metrics.count_prefix_cache("smollm2:latest", prompt_tokens=10, cached_tokens=7)
    metrics.time_to_first_token.labels("smollm2:latest").observe(0.1)
    metrics.inter_token_latency.labels("smollm2:latest").observe(0.02)
    metrics.queue_wait.labels("smollm2:latest").observe(0.001)
    metrics.finished.labels("smollm2:latest", "stop").inc()
    metrics.rejected.labels("smollm2:latest").inc()
    metrics.observe_step("smollm2:latest", StepStats(sequences=2, tokens=2, seconds=0.03))
    metrics.observe_step("smollm2:latest", StepStats(1, 9, 0.03, draft_tokens=8, accepted_draft_tokens=5))
    metrics.loaded("smollm2:latest", "llama.cpp", 1.5, 500)
    metrics.unloaded("smollm2:latest", "llama.cpp", "budget")
    metrics.embedding_inputs.labels("minilm:latest").inc()
    return metrics


def samples(text: str) -> dict[str, set[str]]:
    """Sample name -> label names seen on it."""
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return found


def test_exposition_parses_and_follows_conventions(tmp_path: Path) -> None:
    text = busy_metrics(tmp_path).render().decode()
    families = list(text_string_to_metric_families(text))  # raises on any malformed line
    assert families
    for family in families:
        assert family.name.startswith("llmos_"), family.name
        assert family.documentation, family.name
        if family.type == "counter":
            assert all(s.name == family.name + "_total" for s in family.samples), family.name
        if family.type == "histogram":
            assert {s.name for s in family.samples} == {f"{family.name}_{x}" for x in ("bucket", "sum", "count")}
    names = samples(text)
    assert not [n for n in names if n.endswith("_created")]  # no twin series per counter
    for expected in (
        "llmos_requests_total", "llmos_prompt_tokens_total", "llmos_completion_tokens_total",
        "llmos_time_to_first_token_seconds_bucket", "llmos_inter_token_latency_seconds_bucket",
        "llmos_e2e_request_latency_seconds_bucket", "llmos_queue_wait_seconds_bucket", "llmos_queue_depth",
        "llmos_running_sequences", "llmos_batch_size_bucket", "llmos_kv_cache_usage_ratio",
        "llmos_resident_models", "llmos_resident_model_memory_bytes", "llmos_model_loads_total",
        "llmos_model_unloads_total", "llmos_model_load_seconds_bucket", "llmos_jobs", "llmos_training_loss",
        "llmos_process_cpu_seconds_total", "llmos_process_resident_memory_bytes", "llmos_home_free_bytes",
        "llmos_prefix_cache_hit_tokens_total", "llmos_prefix_cache_miss_tokens_total",
        "llmos_speculative_draft_tokens_total", "llmos_speculative_accepted_tokens_total",
    ):  # fmt: skip
        assert expected in names, expected
    assert names["llmos_requests_total"] == {"endpoint", "model", "tenant", "status"}
    assert names["llmos_completion_tokens_total"] == {"model", "tenant"}
    assert names["llmos_training_loss"] == {"job_id", "kind"}  # ``job`` is Prometheus's own target label
    assert names["llmos_prefix_cache_hit_tokens_total"] == names["llmos_prefix_cache_miss_tokens_total"] == {"model"}


def test_promtool_check_metrics_when_available(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        assert not os.environ.get("CI"), "CI installs promtool (`make test-tools`); it is missing"
        pytest.skip("promtool is not installed (the prometheus_client parser check above still ran)")
    text = busy_metrics(tmp_path).render()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unusual_methods_are_one_label_value(tmp_path: Path) -> None:
    metrics = Metrics(home=tmp_path)
    for method in ("GET", "BREW", "PROPFIND", "X" * 50):
        metrics.observe_http(method, "unmatched", 405, 0.001)
    methods = {s.labels["method"] for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples
               if s.name == "llmos_http_requests_total"}  # fmt: skip
    assert methods == {"GET", "other"}


def test_jobs_query_failure_does_not_break_the_scrape(tmp_path: Path) -> None:
    def broken() -> tuple[list[tuple[str, str, int]], list[tuple[str, str, float]]]:
        raise OSError("database is locked")

    text = Metrics(jobs=broken, home=tmp_path).render().decode()
    assert "llmos_process_cpu_seconds_total" in text and "llmos_jobs{" not in text


def test_grafana_dashboard_uses_only_exported_names_and_labels(tmp_path: Path) -> None:
    exported = samples(busy_metrics(tmp_path).render().decode())
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    used: set[str] = set()
    for expr in exprs:
        names = set(NAME.findall(expr))
        assert names, expr
        unknown = names - exported.keys()
        assert not unknown, (unknown, expr)
        used |= names
        labels = set(re.findall(r"(\w+)=~?\"", expr))
        for group in re.findall(r"by \(([^)]*)\)", expr):
            labels |= {label.strip() for label in group.split(",")}
        allowed = set().union(*(exported[n] for n in names)) | {"instance", "job"}
        assert labels <= allowed, (labels - allowed, expr)
    for topic in (
        "llmos_requests_total", "llmos_completion_tokens_total", "llmos_time_to_first_token_seconds_bucket",
        "llmos_inter_token_latency_seconds_bucket", "llmos_e2e_request_latency_seconds_bucket",
        "llmos_queue_depth", "llmos_queue_wait_seconds_bucket", "llmos_running_sequences", "llmos_batch_size_bucket",
        "llmos_kv_cache_usage_ratio", "llmos_resident_model_memory_bytes", "llmos_memory_budget_bytes",
        "llmos_model_loads_total", "llmos_model_unloads_total", "llmos_jobs", "llmos_training_loss",
        "llmos_process_cpu_seconds_total", "llmos_process_resident_memory_bytes",
        "llmos_prefix_cache_hit_tokens_total", "llmos_prefix_cache_miss_tokens_total",
    ):  # fmt: skip
        assert topic in used, topic
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "model", "tenant"} <= variables


def test_job_states_and_training_loss_come_from_the_jobs_table(tmp_path: Path) -> None:
    from llmos.config import Settings
    from llmos.jobs.service import JobService
    from llmos.store.schema import Job

    jobs = JobService(Settings(home=tmp_path / "home"))
    try:
        training = jobs.create("train", {})
        jobs.create("eval", {})
        jobs.create("eval", {})
        with jobs.session() as session, session.begin():
            row = session.get(Job, training.id)
            assert row is not None
            row.state = "running"
        jobs.report(training.id, {"step": 3, "total": 10, "metrics": {"loss": 1.5, "lr": 0.001}})
        counts, losses = jobs.gauges()
        assert sorted(counts) == [("eval", "queued", 2), ("train", "running", 1)]
        assert losses == [(training.id, "train", 1.5)]
        found = samples(Metrics(jobs=jobs.gauges, home=tmp_path).render().decode())
        assert found["llmos_training_loss"] == {"job_id", "kind"} and found["llmos_jobs"] == {"kind", "state"}
        jobs.finish(training.id, "succeeded")
        assert jobs.gauges()[1] == []  # only running jobs have a loss series
    finally:
        jobs.close()
