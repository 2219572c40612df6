"""Optional tracing: off and import-free by default; on, the request -> queue -> generate span chain."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from llmos.observability.context import RequestContext
from llmos.observability.tracing import Tracing, requested


@dataclass
class FakePrincipal:
    tenant: str


def test_off_by_default_and_opentelemetry_is_not_imported() -> None:
    code = (
        "import sys; from llmos.observability.tracing import Tracing;"
        "t = Tracing.from_env({}); assert not t.enabled; assert t.start_request('GET', []) is None;"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')));"
        "import llmos.api.app;"  # FastAPI itself imports the OpenTelemetry *API*; llmos never loads the SDK unasked
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "[]"]


def test_which_environment_turns_it_on() -> None:
    assert not requested({})
    assert requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert requested({"OTEL_TRACES_EXPORTER": "console"})
    assert not requested({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"})
    assert not requested({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"})
    pytest.importorskip("opentelemetry.sdk")
    assert Tracing.from_env({"OTEL_TRACES_EXPORTER": "console"}).enabled
    assert not Tracing.from_env({"OTEL_TRACES_EXPORTER": "bogus"}).enabled  # warned, never raised


def test_request_queue_generate_chain() -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracing = Tracing.with_exporter(exporter)
    parent_trace = "0af7651916cd43dd8448eb211c80319c"
    headers = [(b"traceparent", f"00-{parent_trace}-b7ad6b7169203331-01".encode()), (b"x-secret", b"no")]
    context = RequestContext("req_1", {"principal": FakePrincipal("acme")}, model="smollm2:latest")
    context.span, context.tracing = tracing.start_request("POST", headers), tracing
    submitted = time.monotonic()
    tracing.record_generation(
        context,
        choice=0,
        submitted=submitted,
        admitted=submitted + 0.01,
        finished=submitted + 0.05,
        prompt_tokens=12,
        completion_tokens=5,
        finish_reason="length",
    )
    tracing.end_request(context.span, "/v1/chat/completions", 200, context)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {"llmos.scheduler.queue", "llmos.backend.generate", "POST /v1/chat/completions"}
    request = spans["POST /v1/chat/completions"]
    assert format(request.context.trace_id, "032x") == parent_trace  # continues the caller's trace
    for name in ("llmos.scheduler.queue", "llmos.backend.generate"):
        assert spans[name].parent is not None and spans[name].parent.span_id == request.context.span_id
    queue, generate = spans["llmos.scheduler.queue"], spans["llmos.backend.generate"]
    assert queue.end_time is not None and generate.start_time is not None and queue.end_time <= generate.start_time
    assert abs((queue.end_time - queue.start_time) / 1e9 - 0.01) < 0.005
    assert generate.attributes is not None and generate.attributes["gen_ai.usage.output_tokens"] == 5
    assert generate.attributes["gen_ai.usage.input_tokens"] == 12
    assert request.attributes is not None
    assert (
        request.attributes["llmos.tenant"] == "acme" and request.attributes["gen_ai.request.model"] == "smollm2:latest"
    )
    assert request.attributes["http.response.status_code"] == 200 and request.attributes["llmos.request_id"] == "req_1"
