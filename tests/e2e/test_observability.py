"""Observability end to end: a real server with a key, the official openai client, /metrics, JSON logs, traces.

One server (its own store, since it needs a tenant and a key; the shared stores stay keyless) with console tracing
on, so its log file holds both the JSON log lines and one JSON object per finished span.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine

from llmos.config import Settings
from llmos.registry import sources
from llmos.registry.service import Registry
from llmos.security.service import SecurityService
from tests.helpers import ServerProcess, run_cli

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MODEL = "smollm2:latest"
CANARY = f"canary{uuid.uuid4().hex}"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    home = tmp_path_factory.mktemp("observed") / "home"
    registry = Registry(Settings(home=home))
    sources.pull(registry, "smollm2")
    registry.close()
    assert run_cli(home, "tenants", "create", "acme").returncode == 0
    made = run_cli(home, "keys", "create", "--tenant", "acme", "--role", "developer")
    assert made.returncode == 0, made.stderr
    return home, made.stdout.strip()


@pytest.fixture(scope="module")
def server(store: tuple[Path, str]) -> Iterator[ServerProcess]:
    pytest.importorskip("opentelemetry.sdk")
    process = ServerProcess(store[0], "--model", "smollm2", env={"OTEL_TRACES_EXPORTER": "console"})
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess, store: tuple[Path, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=store[1], max_retries=0, timeout=120)


def metrics_text(server: ServerProcess, key: str) -> str:
    response = httpx.get(f"{server.base}/metrics", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200
    return response.text


def scrape(server: ServerProcess, key: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(metrics_text(server, key)):  # raises on a malformed line
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, got), v in samples.items() if n == name and wanted <= set(got))


def records(server: ServerProcess) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(log records, spans) from the server's output: every line is one JSON object."""
    logs, spans = [], []
    for line in server.read_log().splitlines():
        if line.startswith("{"):
            item = json.loads(line)
            (spans if "context" in item and "span_id" in item["context"] else logs).append(item)
    return logs, spans


def test_traffic_moves_counters_and_histograms_by_exactly_what_was_served(
    server: ServerProcess, client: openai.OpenAI, store: tuple[Path, str]
) -> None:
    key = store[1]
    before = scrape(server, key)
    usages, reasons = [], []
    for _ in range(3):
        answer = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=5, temperature=0)
        assert answer.usage is not None
        usages.append((answer.usage.prompt_tokens, answer.usage.completion_tokens))
        reasons.append(answer.choices[0].finish_reason)
    stream = client.chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].usage is not None
    usages.append((chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens))
    reasons += [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=5)
    after = scrape(server, key)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    served = {"model": MODEL, "tenant": "acme"}
    assert delta("llmos_requests_total", endpoint="chat", status="200", **served) == 4
    assert delta("llmos_requests_total", endpoint="chat", model="unknown", tenant="acme", status="404") == 1
    assert delta("llmos_http_requests_total", route="/v1/chat/completions", status="200") == 4
    assert delta("llmos_http_requests_total", route="/v1/chat/completions", status="404") == 1
    assert delta("llmos_prompt_tokens_total", **served) == sum(p for p, _ in usages)
    assert delta("llmos_completion_tokens_total", **served) == sum(c for _, c in usages)
    assert all(c >= 1 for _, c in usages)  # so each request observed one time to first token
    assert delta("llmos_time_to_first_token_seconds_count", model=MODEL) == 4
    assert delta("llmos_inter_token_latency_seconds_count", model=MODEL) == sum(c - 1 for _, c in usages)
    assert delta("llmos_queue_wait_seconds_count", model=MODEL) == 4
    assert delta("llmos_e2e_request_latency_seconds_count", model=MODEL) == 4
    assert delta("llmos_e2e_request_latency_seconds_bucket", model=MODEL, le="+Inf") == 4
    assert delta("llmos_e2e_request_latency_seconds_sum", model=MODEL) > delta(
        "llmos_time_to_first_token_seconds_sum", model=MODEL
    )
    for reason in set(reasons):
        assert delta("llmos_requests_finished_total", model=MODEL, reason=str(reason)) == reasons.count(reason)
    assert delta("llmos_batch_size_count", model=MODEL) >= 4  # every request took engine steps
    assert value(after, "llmos_resident_models") == 1
    assert value(after, "llmos_resident_model_memory_bytes", model=MODEL) > 0
    assert value(after, "llmos_process_cpu_seconds_total") > value(before, "llmos_process_cpu_seconds_total") > 0
    assert value(after, "llmos_home_free_bytes") > 0
    promtool = shutil.which("promtool")
    if promtool is not None:  # the parser check above always runs; promtool's lint too where it is installed
        text = metrics_text(server, key).encode()
        checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_logs_and_spans_carry_ids_tenant_and_model(server: ServerProcess, client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=4, temperature=0, extra_headers={"x-request-id": "obs-trace-1"}
    )
    assert answer.usage is not None
    deadline = time.monotonic() + 10  # the access line and the request's span are written just after the answer
    while True:
        logs, spans = records(server)
        if any(r.get("request_id") == "obs-trace-1" for r in logs) or time.monotonic() > deadline:  # written last
            break
        time.sleep(0.05)
    (access,) = [r for r in logs if r.get("logger") == "llmos.access" and r.get("request_id") == "obs-trace-1"]
    assert access["tenant"] == "acme" and access["model"] == MODEL and access["status"] == 200
    assert access["method"] == "POST" and access["route"] == "/v1/chat/completions" and access["duration_ms"] > 0
    assert all(r["level"] in {"debug", "info", "warning", "error", "critical"} for r in logs)
    mine = [s for s in spans if s["attributes"].get("llmos.request_id") == "obs-trace-1"]
    (request,) = [s for s in mine if s["kind"] == "SpanKind.SERVER"]
    assert request["name"] == "POST /v1/chat/completions" and len(mine) == 3
    assert request["attributes"]["llmos.tenant"] == "acme" and request["attributes"]["gen_ai.request.model"] == MODEL
    children = {s["name"]: s for s in spans if s.get("parent_id") == request["context"]["span_id"]}
    assert set(children) == {"llmos.scheduler.queue", "llmos.backend.generate"}
    generate = children["llmos.backend.generate"]
    assert generate["attributes"]["gen_ai.usage.output_tokens"] == answer.usage.completion_tokens
    assert generate["attributes"]["gen_ai.usage.input_tokens"] == answer.usage.prompt_tokens


def test_a_canary_secret_never_reaches_logs_traces_or_metrics(
    server: ServerProcess, client: openai.OpenAI, store: tuple[Path, str]
) -> None:
    key = store[1]
    messages = [{"role": "user", "content": f"Remember {CANARY} and say hi."}]
    headers = {"x-request-id": f"{CANARY} not-an-id", "x-client-note": CANARY, "traceparent": CANARY}
    answer = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=3, user=CANARY, extra_headers=headers
    )
    assert answer.choices
    streamed = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=3, user=CANARY, stream=True
    )
    assert list(streamed)
    for bad_key in (CANARY, f"llmos_0123456789ab_{CANARY}"):
        intruder = openai.OpenAI(base_url=f"{server.base}/v1", api_key=bad_key, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            intruder.chat.completions.create(model="smollm2", messages=QUESTION)
    with pytest.raises(openai.BadRequestError):  # an invalid body echoing the canary
        client.chat.completions.create(model="smollm2", messages=messages, max_tokens=-1)
    for index in range(20):  # distinct unknown model names: the first may add series, the other 19 add none
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=f"ghost-{index}-{CANARY}", messages=QUESTION, max_tokens=2)
        if index == 0:
            series_before = len(scrape(server, key))
    assert len(scrape(server, key)) == series_before
    odd = httpx.request("PROPFIND", f"{server.base}/{CANARY}", headers={"Authorization": f"Bearer {key}"})
    assert odd.status_code in (404, 405)
    text = metrics_text(server, key)
    deadline = time.monotonic() + 10
    while True:  # the capture covers every request above: the last one's access line is there
        logs, spans = records(server)
        if any(r.get("method") == "OTHER" for r in logs) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    statuses = {r["status"] for r in logs if r.get("logger") == "llmos.access"}
    assert {200, 400, 401, 404} <= statuses and any(r.get("route") == "unmatched" for r in logs)
    assert any(s["name"] == "llmos.backend.generate" for s in spans)  # and the traces of the served ones
    assert CANARY not in text
    assert CANARY not in server.read_log()
    after = scrape(server, key)
    unknown = [labels for (name, labels), _ in after.items() if name == "llmos_requests_total"]
    assert len({dict(labels)["model"] for labels in unknown}) <= 2  # the real model and "unknown"
    methods = {dict(labels)["method"] for (name, labels), _ in after.items() if name == "llmos_http_requests_total"}
    assert methods == {"GET", "POST", "other"}


def test_health_is_alive_and_ready_reports_each_check(server: ServerProcess) -> None:
    assert httpx.get(f"{server.base}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{server.base}/ready")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {
            "preload": {"ok": True},
            "database": {"ok": True},
            "disk": {"ok": True},
            "models": {"ok": True, "crashed": [], "recent_crashes": []},
            "audit": {"ok": True},
            "usage": {"ok": True},
        },
    }


def test_ready_fails_with_the_reason_while_preloading_without_disk_or_database(tmp_path: Path) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from llmos.api.health import router

    settings = Settings(home=tmp_path / "home", ready_min_free_bytes=2**62)
    registry = Registry(settings)
    security = SecurityService(settings)
    state = SimpleNamespace(
        settings=settings,
        registry=registry,
        security=security,
        ready=threading.Event(),
        preload=["smollm2"],
        preload_error=None,
        residency=SimpleNamespace(failures=None, snapshot=list),
    )
    app = FastAPI()
    app.include_router(router)
    app.state.llmos = state
    http = TestClient(app)
    try:
        assert http.get("/health").status_code == 200  # alive while loading: no restart loop
        loading = http.get("/ready")
        assert loading.status_code == 503 and loading.json()["status"] == "not_ready"
        checks = loading.json()["checks"]
        assert checks["preload"] == {"ok": False, "reason": "loading", "models": ["smollm2"]}
        assert checks["database"] == {"ok": True}
        assert checks["disk"]["ok"] is False and "ready_min_free_bytes" in checks["disk"]["reason"]
        state.ready.set()
        state.preload_error = "model 'smollm2' not found"
        state.settings = Settings(home=settings.home, ready_min_free_bytes=0)
        state.registry = SimpleNamespace(engine=create_engine(f"sqlite:///{tmp_path}/missing/dir/x.db"))
        broken = http.get("/ready").json()["checks"]
        assert broken["preload"] == {"ok": False, "reason": "model 'smollm2' not found"}
        assert broken["database"]["ok"] is False and broken["disk"] == {"ok": True}
        state.preload_error = None
        state.registry = registry
        assert http.get("/ready").status_code == 200
    finally:
        security.close()
        registry.close()
