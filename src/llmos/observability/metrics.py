"""Prometheus metrics of one server process.

Contract: :class:`Metrics` owns a private ``CollectorRegistry`` (so several apps in one process, as in tests, never
share counters) and follows Prometheus conventions: the ``llmos_`` prefix, base units (seconds, tokens), ``_total``
counters. Engine gauges (queue depth, running sequences, KV cache use) are read at scrape time through the
``engine_stats`` callable, so the engine itself stays free of metrics code. :meth:`Metrics.render` returns the
text exposition format.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from llmos.engine.core import EngineStats, StepStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineCollector(Collector):
    def __init__(
        self,
        engine_stats: Callable[[], Iterable[tuple[str, EngineStats]]],
        memory: Callable[[], tuple[int, int, list[tuple[str, str, int]]]],
    ) -> None:
        self._engine_stats = engine_stats
        self._memory = memory

    def collect(self) -> Iterator[Any]:
        budget, rss, residents = self._memory()
        yield GaugeMetricFamily("llmos_memory_budget_bytes", "Memory budget for resident models", value=budget)
        yield GaugeMetricFamily("llmos_process_resident_memory_bytes", "RSS of the server process", value=rss)
        models = GaugeMetricFamily("llmos_resident_models", "Models loaded in memory", value=len(residents))
        yield models
        memory = GaugeMetricFamily(
            "llmos_resident_model_memory_bytes", "Measured memory of each resident model", labels=["model", "backend"]
        )
        for model, backend, size in residents:
            memory.add_metric([model, backend], size)
        yield memory
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


class Metrics:
    def __init__(
        self,
        engine_stats: Callable[[], Iterable[tuple[str, EngineStats]]] = lambda: (),
        memory: Callable[[], tuple[int, int, list[tuple[str, str, int]]]] = lambda: (0, 0, []),
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "llmos_http_requests_total", "HTTP requests by route and status", ["method", "route", "status"], registry=r
        )
        self.request_duration = Histogram(
            "llmos_request_duration_seconds",
            "End-to-end request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("llmos_prompt_tokens_total", "Prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter(
            "llmos_completion_tokens_total", "Completion tokens generated", ["model"], registry=r
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
            "Time between consecutive tokens of one request",
            ["model"],
            buckets=TOKEN_LATENCY_BUCKETS,
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
        r.register(_EngineCollector(engine_stats, memory))

    # residency listener
    def loaded(self, model: str, backend: str, seconds: float, bytes_used: int) -> None:
        self.loads.labels(model, backend).inc()
        self.load_seconds.labels(backend).observe(seconds)

    def unloaded(self, model: str, backend: str, reason: str) -> None:
        self.unloads.labels(model, backend, reason).inc()

    def observe_step(self, model: str, stats: StepStats) -> None:
        self.batch_size.labels(model).observe(stats.sequences)
        self.step_duration.labels(model).observe(stats.seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
