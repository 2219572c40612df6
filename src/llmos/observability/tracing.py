"""Optional OpenTelemetry tracing of a request: HTTP (api) -> scheduler queue -> backend generation.

Contract:

* Off by default and free when off: nothing here imports ``opentelemetry`` at module import time, and a disabled
  :class:`Tracing` makes no spans (every method returns at once).
* :meth:`Tracing.from_env` turns it on when the standard OpenTelemetry environment asks for traces
  (``OTEL_TRACES_EXPORTER`` other than ``none``, or ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) and ``opentelemetry-sdk`` is installed (``pip install 'llmos[otel]'``);
  ``OTEL_SDK_DISABLED=true`` keeps it off. Exporters: ``otlp`` (HTTP/protobuf, or gRPC with
  ``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``; endpoint, headers and timeouts from the exporter's own OTEL variables) and
  ``console`` (one JSON object per line on stdout). The sampler follows ``OTEL_TRACES_SAMPLER``; resource attributes
  ``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_SERVICE_NAME`` (default ``llmos``). A missing package or a bad setting logs
  one warning and leaves tracing off; it never stops the server.
* Spans: a SERVER span per HTTP request (``METHOD /route/template``; parent taken from a W3C ``traceparent`` header),
  and for each generated choice two children recorded when it ends, ``llmos.scheduler.queue`` (submitted ->
  admitted into the running batch) and ``llmos.backend.generate`` (admitted -> finished). Attributes: request id,
  tenant, model, route, status, token counts, finish reason. Never prompt or completion text, headers or keys.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from llmos.observability.context import RequestContext

log = logging.getLogger("llmos.tracing")
_PROPAGATED = (b"traceparent", b"tracestate")


def requested(environ: Mapping[str, str]) -> bool:
    """Whether the standard OTEL environment asks for traces."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _epoch_ns(monotonic: float, offset_ns: int | None = None) -> int:
    """A ``time.monotonic()`` instant as wall-clock nanoseconds (what span timestamps are). Pass one
    :func:`_clock_offset_ns` for instants that must keep their order (two separate readings can differ by ~100 ns)."""
    return (offset_ns if offset_ns is not None else _clock_offset_ns()) + int(monotonic * 1e9)


def _clock_offset_ns() -> int:
    """Wall-clock nanoseconds minus monotonic nanoseconds, read once."""
    return time.time_ns() - int(time.monotonic() * 1e9)


def _exporters(environ: Mapping[str, str]) -> list[tuple[Any, bool]]:
    """(exporter, batched) pairs named by the environment; unknown or unavailable ones are skipped with a warning."""
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()]
    found: list[tuple[Any, bool]] = []
    for name in names:
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            found.append((ConsoleSpanExporter(formatter=lambda span: span.to_json(indent=None) + "\n"), False))
        elif name == "otlp":
            protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
                "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
            )
            flavour = "grpc" if protocol.strip().lower() == "grpc" else "http"
            try:
                module = importlib.import_module(f"opentelemetry.exporter.otlp.proto.{flavour}.trace_exporter")
            except ImportError:
                log.warning("tracing: the OTLP exporter is not installed (pip install 'llmos[otel]'); traces are off")
                continue
            found.append((module.OTLPSpanExporter(), True))
        elif name != "none":
            log.warning("tracing: unknown OTEL_TRACES_EXPORTER %r ignored (llmos knows otlp, console)", name)
    return found


class Tracing:
    """Makes the spans of one server; a disabled instance (the default) does nothing."""

    def __init__(self, provider: Any = None) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("llmos") if provider is not None else None

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Tracing:
        env = os.environ if environ is None else environ
        if not requested(env):
            return cls()
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        except ImportError:
            log.warning("tracing: OTEL variables are set but opentelemetry-sdk is missing (pip install 'llmos[otel]')")
            return cls()
        try:
            exporters = _exporters(env)
            if not exporters:
                return cls()
            attributes = {} if "OTEL_SERVICE_NAME" in env else {"service.name": "llmos"}
            provider = TracerProvider(resource=Resource.create(attributes))
            for exporter, batched in exporters:
                provider.add_span_processor(BatchSpanProcessor(exporter) if batched else SimpleSpanProcessor(exporter))
        except Exception as exc:  # a bad OTEL setting must not stop the server
            log.warning("tracing is off: %s: %s", type(exc).__name__, exc)
            return cls()
        log.info("tracing on (%s)", ", ".join(type(e).__name__ for e, _ in exporters))
        return cls(provider)

    @classmethod
    def with_exporter(cls, exporter: Any) -> Tracing:
        """Tracing into one exporter, spans exported as they end (tests: the SDK's ``InMemorySpanExporter``)."""
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        return cls(provider)

    # --- spans ------------------------------------------------------------------------------------------------------

    def start_request(self, method: str, headers: Iterable[tuple[bytes, bytes]]) -> Any:
        """The SERVER span of one HTTP request (renamed to its route template when it ends), or None when off."""
        if self._tracer is None:
            return None
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k in _PROPAGATED}
        parent = TraceContextTextMapPropagator().extract(carrier) if carrier else None
        return self._tracer.start_span(
            f"{method} request", context=parent, kind=SpanKind.SERVER, attributes={"http.request.method": method}
        )

    def end_request(self, span: Any, route: str, status: int, context: RequestContext) -> None:
        if span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        span.update_name(f"{span.attributes.get('http.request.method', 'HTTP')} {route}")
        span.set_attribute("http.route", route)
        span.set_attribute("http.response.status_code", status)
        span.set_attributes(self._identity(context))
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    def record_generation(
        self,
        context: RequestContext | None,
        *,
        choice: int,
        submitted: float,
        admitted: float | None,
        finished: float,
        prompt_tokens: int,
        completion_tokens: int,
        finish_reason: str | None,
    ) -> None:
        """The queue and generation spans of one choice, as children of the request's span (times: monotonic)."""
        if self._tracer is None or context is None or context.span is None:
            return
        from opentelemetry.trace import set_span_in_context

        parent = set_span_in_context(context.span)
        attributes: dict[str, Any] = {**self._identity(context), "llmos.choice": choice}
        queued_until = admitted if admitted is not None else finished
        offset = _clock_offset_ns()
        queue = self._tracer.start_span(
            "llmos.scheduler.queue", context=parent, start_time=_epoch_ns(submitted, offset), attributes=attributes
        )
        queue.set_attribute("llmos.admitted", admitted is not None)
        queue.end(end_time=_epoch_ns(queued_until, offset))
        if admitted is None:
            return
        generate = self._tracer.start_span(
            "llmos.backend.generate", context=parent, start_time=_epoch_ns(admitted, offset), attributes=attributes
        )
        generate.set_attribute("gen_ai.usage.input_tokens", prompt_tokens)
        generate.set_attribute("gen_ai.usage.output_tokens", completion_tokens)
        if finish_reason:
            generate.set_attribute("gen_ai.response.finish_reasons", [finish_reason])
        generate.end(end_time=_epoch_ns(finished, offset))

    @staticmethod
    def _identity(context: RequestContext) -> dict[str, Any]:
        attributes: dict[str, Any] = {"llmos.request_id": context.request_id}
        if context.tenant is not None:
            attributes["llmos.tenant"] = context.tenant
        if context.model is not None:
            attributes["gen_ai.request.model"] = context.model
        return attributes

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()
