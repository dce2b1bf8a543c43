"""Spans through the OpenTelemetry SDK, when the config has `tracing` (the `otel` extra must be installed).

One SERVER span per request, `pep.request`, child of the caller's span when it sent a valid `traceparent`
(ParentBased sampling: the caller's sampled flag is followed; traces the PEP starts are sampled at
`sample_ratio`). Its id becomes the parent id of the PDP and upstream requests, so their spans hang under the
PEP's. Attributes: the route, the decision and reason, the HTTP method and status, the PDP attempts and time.
Imported only when tracing is on: without it no OpenTelemetry code runs on the request path.
"""

from __future__ import annotations

import sys
from typing import Any

from pep.config import TracingConfig
from pep.trace import Trace

try:
    from opentelemetry import trace as otel_trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags, TraceState
except ImportError as exc:  # pragma: no cover - the extra is part of the dev install
    raise ImportError("tracing needs the OpenTelemetry SDK: pip install 'failclosed-pep[otel]'") from exc


def _trace_state(header: str | None) -> TraceState:
    if not header:
        return TraceState()
    pairs = []
    for member in header.split(","):
        key, sep, value = member.strip().partition("=")
        if sep and key and value:
            pairs.append((key, value))
    try:
        return TraceState(pairs)
    except ValueError:
        return TraceState()


class Tracing:
    """The PEP's tracer, with its own provider (the process-wide one is left alone)."""

    def __init__(self, cfg: TracingConfig, exporter: SpanExporter | None = None) -> None:
        if exporter is None:
            if cfg.exporter == "console":
                exporter = ConsoleSpanExporter(out=sys.stderr)
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                exporter = OTLPSpanExporter(endpoint=cfg.endpoint)
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": cfg.service_name}),
            sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)),
        )
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("failclosed-pep")

    def start(self, trace: Trace, method: str) -> None:
        """Open the request's span under the caller's (if any) and make it the parent of what is sent on."""
        context = None
        if trace.remote:
            parent = SpanContext(
                trace_id=int(trace.trace_id, 16),
                span_id=int(trace.parent_id, 16),
                is_remote=True,
                trace_flags=TraceFlags(int(trace.flags, 16) & 0x01),
                trace_state=_trace_state(trace.state),
            )
            context = otel_trace.set_span_in_context(NonRecordingSpan(parent))
        span = self._tracer.start_span(
            "pep.request", context=context, kind=SpanKind.SERVER, attributes={"http.request.method": method}
        )
        own = span.get_span_context()
        trace.trace_id = format(own.trace_id, "032x")
        trace.parent_id = format(own.span_id, "016x")
        trace.flags = format(int(own.trace_flags), "02x")
        trace.span = span

    @staticmethod
    def finish(trace: Trace, attributes: dict[str, Any], status: int | None) -> None:
        span = trace.span
        if span is None:
            return
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        if status is not None:
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(StatusCode.ERROR)
        span.end()

    def flush(self) -> None:
        self._provider.force_flush()

    def shutdown(self) -> None:
        self._provider.shutdown()
