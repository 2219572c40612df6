"""Prometheus metrics of one server process.

Contract: :class:`Metrics` owns a private ``CollectorRegistry`` (so several apps in one process, as in tests, never
share counters) and follows Prometheus conventions: the ``llmos_`` prefix, base units (seconds, bytes, tokens),
``_total`` counters, histograms with buckets that fit CPU and GPU serving. State that already lives elsewhere is
read at scrape time through callables, so the code that owns it stays free of metrics code: engine gauges (queue
depth, running sequences, KV cache use) through ``engine_stats``, memory through ``memory``, job states and the
last training loss of running jobs through ``jobs`` (one cheap query of the jobs table), free disk of the store
through ``home``, audit and usage write failures through :meth:`Metrics.watch_records`. :meth:`Metrics.render`
returns the text exposition format.

Label cardinality is bounded by construction; callers must keep it so:

* ``model``: the registry name of a version that exists (set only after the requested name resolved), or
  ``unknown`` for requests that never got that far. A name from a request is never a label as such.
* ``tenant``: the authenticated principal's tenant (tenants are created by admins), ``none`` without one.
* ``route``: the route template (``/v1/models/{model:path}``), ``unmatched`` when no route matched; ``method``: one
  of the standard HTTP methods or ``other``; ``status``: the numeric status code.
* ``job_id``: ids of *running* jobs only (bounded by the job slots). Not ``job``: Prometheus sets that label on
  every scraped series itself (and would rename ours to ``exported_job``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from llmos.engine.core import EngineStats, StepStats

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNKNOWN_MODEL = "unknown"
NO_TENANT = "none"

JobGauges = tuple[list[tuple[str, str, int]], list[tuple[str, str, float]]]
"""``([(kind, state, count)], [(job_id, kind, last_loss)])`` of the jobs table."""


def _no_jobs() -> JobGauges:
    return [], []


def process_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class _StateCollector(Collector):
    def __init__(
        self,
        engine_stats: Callable[[], Iterable[tuple[str, EngineStats]]],
        memory: Callable[[], tuple[int, int, list[tuple[str, str, int]]]],
        jobs: Callable[[], JobGauges],
        home: Path | None,
    ) -> None:
        self._engine_stats = engine_stats
        self._memory = memory
        self._jobs = jobs
        self._home = home

    def collect(self) -> Iterator[Any]:
        yield from self._memory_families()
        yield from self._engine_families()
        yield from self._job_families()
        yield CounterMetricFamily(
            "llmos_process_cpu_seconds", "User and system CPU time of the server process", value=process_cpu_seconds()
        )
        if self._home is not None:
            try:
                stat = os.statvfs(self._home)
            except OSError:
                return
            yield GaugeMetricFamily(
                "llmos_home_free_bytes", "Free disk space where LLMOS_HOME lives", value=stat.f_bavail * stat.f_frsize
            )

    def _memory_families(self) -> Iterator[Any]:
        budget, rss, residents = self._memory()
        yield GaugeMetricFamily("llmos_memory_budget_bytes", "Memory budget for resident models", value=budget)
        yield GaugeMetricFamily("llmos_process_resident_memory_bytes", "RSS of the server process", value=rss)
        yield GaugeMetricFamily("llmos_resident_models", "Models loaded in memory", value=len(residents))
        memory = GaugeMetricFamily(
            "llmos_resident_model_memory_bytes", "Measured memory of each resident model", labels=["model", "backend"]
        )
        for model, backend, size in residents:
            memory.add_metric([model, backend], size)
        yield memory

    def _engine_families(self) -> Iterator[Any]:
        waiting = GaugeMetricFamily("llmos_queue_depth", "Requests waiting for a slot", labels=["model"])
        running = GaugeMetricFamily("llmos_running_sequences", "Sequences in the running batch", labels=["model"])
        kv = GaugeMetricFamily("llmos_kv_cache_usage_ratio", "Used share of KV cache cells", labels=["model"])
        cells = GaugeMetricFamily("llmos_kv_cache_cells", "KV cache cells", labels=["model", "state"])
        for model, stats in self._engine_stats():
            waiting.add_metric([model], stats.waiting)
            running.add_metric([model], stats.running)
            kv.add_metric([model], stats.kv_cells_used / stats.kv_cells_total if stats.kv_cells_total else 0.0)
            cells.add_metric([model, "used"], stats.kv_cells_used)
            cells.add_metric([model, "total"], stats.kv_cells_total)
        yield from (waiting, running, kv, cells)

    def _job_families(self) -> Iterator[Any]:
        states = GaugeMetricFamily("llmos_jobs", "Jobs by kind and state", labels=["kind", "state"])
        loss = GaugeMetricFamily(
            "llmos_training_loss", "Last reported training loss of each running job", labels=["job_id", "kind"]
        )
        try:
            counts, losses = self._jobs()
        except Exception as exc:  # a locked or unreachable database must not break the scrape
            log.warning("job metrics unavailable: %s", type(exc).__name__)
            counts, losses = [], []
        for kind, state, count in counts:
            states.add_metric([kind, state], count)
        for job_id, kind, value in losses:
            loss.add_metric([job_id, kind], value)
        yield from (states, loss)


class Metrics:
    def __init__(
        self,
        engine_stats: Callable[[], Iterable[tuple[str, EngineStats]]] = lambda: (),
        memory: Callable[[], tuple[int, int, list[tuple[str, str, int]]]] = lambda: (0, 0, []),
        jobs: Callable[[], JobGauges] = _no_jobs,
        home: Path | None = None,
    ) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no ``*_created`` twin series: half the scrape
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "llmos_http_requests_total", "HTTP requests by route and status", ["method", "route", "status"], registry=r
        )
        self.request_duration = Histogram(
            "llmos_request_duration_seconds",
            "HTTP request latency by route (until the last byte of the answer)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "llmos_requests_total",
            "Generation and embedding requests by endpoint, model, tenant and final status",
            ["endpoint", "model", "tenant", "status"],
            registry=r,
        )
        self.e2e_latency = Histogram(
            "llmos_e2e_request_latency_seconds",
            "Time from arrival to the last byte of a generation or embedding request",
            ["model"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "llmos_prompt_tokens_total", "Prompt (input) tokens processed", ["model", "tenant"], registry=r
        )
        self.completion_tokens = Counter(
            "llmos_completion_tokens_total", "Completion tokens generated", ["model", "tenant"], registry=r
        )
        self.prefix_cache_hit_tokens = Counter(
            "llmos_prefix_cache_hit_tokens_total",
            "Prompt tokens of finished generation requests whose KV came from the prefix cache",
            ["model"],
            registry=r,
        )
        self.prefix_cache_miss_tokens = Counter(
            "llmos_prefix_cache_miss_tokens_total",
            "Prompt tokens of finished generation requests that were computed (not found in the prefix cache)",
            ["model"],
            registry=r,
        )
        self.draft_tokens = Counter(
            "llmos_speculative_draft_tokens_total",
            "Prompt-lookup draft tokens verified by speculative decoding",
            ["model"],
            registry=r,
        )
        self.accepted_draft_tokens = Counter(
            "llmos_speculative_accepted_tokens_total",
            "Draft tokens the model confirmed (each one a token decoded without a forward pass of its own)",
            ["model"],
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "llmos_time_to_first_token_seconds",
            "Time from request arrival to its first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "llmos_inter_token_latency_seconds",
            "Time between consecutive tokens of one request (a step that yields several, as speculative decoding"
            " does, spreads its time over them)",
            ["model"],
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "llmos_queue_wait_seconds",
            "Time from submission to admission into the running batch",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.finished = Counter(
            "llmos_requests_finished_total", "Generation requests by finish reason", ["model", "reason"], registry=r
        )
        self.rejected = Counter(
            "llmos_requests_rejected_total", "Requests refused by admission control", ["model"], registry=r
        )
        self.batch_size = Histogram(
            "llmos_batch_size", "Sequences per engine step", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.step_duration = Histogram(
            "llmos_step_duration_seconds", "Duration of one engine step", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.loads = Counter("llmos_model_loads_total", "Model loads", ["model", "backend"], registry=r)
        self.unloads = Counter(
            "llmos_model_unloads_total",
            "Model unloads by reason (budget, expired, ...)",
            ["model", "backend", "reason"],
            registry=r,
        )
        self.load_seconds = Histogram(
            "llmos_model_load_seconds", "Time to load a model", ["backend"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.embedding_inputs = Counter("llmos_embedding_inputs_total", "Texts embedded", ["model"], registry=r)
        self.model_crashes = Counter(
            "llmos_model_crashes_total",
            "Model processes that died (cause: the signal, exit_N, or hang) or were restarted on the safe CPU path",
            ["model", "cause"],
            registry=r,
        )
        self.model_restarts = Counter(
            "llmos_model_restarts_total", "Crashed models (or replicas) started again", ["model"], registry=r
        )
        r.register(_StateCollector(engine_stats, memory, jobs, home))

    # residency listener
    def loaded(self, model: str, backend: str, seconds: float, bytes_used: int) -> None:
        self.loads.labels(model, backend).inc()
        self.load_seconds.labels(backend).observe(seconds)

    def unloaded(self, model: str, backend: str, reason: str) -> None:
        self.unloads.labels(model, backend, reason).inc()

    # model process supervision
    def model_crashed(self, model: str, cause: str) -> None:
        self.model_crashes.labels(model, cause).inc()

    def model_restarted(self, model: str) -> None:
        self.model_restarts.labels(model).inc()

    def observe_step(self, model: str, stats: StepStats) -> None:
        self.batch_size.labels(model).observe(stats.sequences)
        self.step_duration.labels(model).observe(stats.seconds)
        if stats.draft_tokens:
            self.draft_tokens.labels(model).inc(stats.draft_tokens)
            self.accepted_draft_tokens.labels(model).inc(stats.accepted_draft_tokens)

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_requests.labels(method if method in METHODS else "other", route, str(status)).inc()
        self.request_duration.labels(route).observe(seconds)

    def observe_request(
        self, endpoint: str, model: str | None, tenant: str | None, status: int, seconds: float
    ) -> None:
        """One generation or embedding request ended (``model`` None: it never resolved to a registry version)."""
        self.requests.labels(endpoint, model or UNKNOWN_MODEL, tenant or NO_TENANT, str(status)).inc()
        if model is not None:
            self.e2e_latency.labels(model).observe(seconds)

    def count_tokens(self, model: str, tenant: str | None, prompt: int = 0, completion: int = 0) -> None:
        if prompt:
            self.prompt_tokens.labels(model, tenant or NO_TENANT).inc(prompt)
        if completion:
            self.completion_tokens.labels(model, tenant or NO_TENANT).inc(completion)

    def count_prefix_cache(self, model: str, prompt_tokens: int, cached_tokens: int) -> None:
        """One generation request finished: ``cached_tokens`` of its ``prompt_tokens`` came from the prefix cache."""
        self.prefix_cache_hit_tokens.labels(model).inc(cached_tokens)
        self.prefix_cache_miss_tokens.labels(model).inc(max(0, prompt_tokens - cached_tokens))

    def watch_records(self, counts: Callable[[], tuple[int, int, int]]) -> None:
        """Report ``counts() = (audit write failures, usage write failures, usage records pending)`` when scraped."""
        self.registry.register(_RecordsCollector(counts))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RecordsCollector(Collector):
    def __init__(self, counts: Callable[[], tuple[int, int, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Any]:
        audit, usage, pending = self._counts()
        yield CounterMetricFamily(
            "llmos_audit_write_failures", "Audit events that could not be written (the actions were refused)",
            value=audit,
        )  # fmt: skip
        yield CounterMetricFamily(
            "llmos_usage_write_failures", "Failed commits of usage records (retries included)", value=usage
        )
        yield GaugeMetricFamily(
            "llmos_usage_records_pending", "Usage records not written yet (their keys are refused)", value=pending
        )
