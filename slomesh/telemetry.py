"""OpenTelemetry set-up shared by every slomesh service.

`setup_telemetry(service_name)` installs a tracer provider whose spans go to:

- an OTLP/gRPC exporter when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
  `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) variable is set;
- a JSON-lines file when `spans_out` (or env `SLOMESH_SPANS_OUT`) is given: one object per
  finished span with `name`, `trace_id`, `span_id`, `parent_span_id` (hex, or null),
  `start_time_unix_nano`, `end_time_unix_nano`, `service.name`, `kind`, `status` and
  `attributes`. Several processes may append to the same file: each span is one `write()` to
  a file opened with O_APPEND, so lines never interleave.

Trace context crosses gRPC in metadata and NATS in message headers as W3C `traceparent`.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

_lock = threading.Lock()
_provider: TracerProvider | None = None


class JsonLinesSpanExporter(SpanExporter):
    """Writes finished spans as JSON lines to a file opened in append mode."""

    def __init__(self, path: str):
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            if self._fd < 0:
                return SpanExportResult.FAILURE
            for span in spans:
                line = json.dumps(span_to_dict(span), separators=(",", ":")) + "\n"
                os.write(self._fd, line.encode())
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def span_to_dict(span: ReadableSpan) -> dict:
    """The JSON-lines record of one finished span (see the module docstring)."""
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "name": span.name,
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_span_id": format(parent.span_id, "016x") if parent is not None else None,
        "start_time_unix_nano": span.start_time,
        "end_time_unix_nano": span.end_time,
        "service.name": span.resource.attributes.get("service.name", ""),
        "kind": span.kind.name,
        "status": span.status.status_code.name,
        "attributes": {k: _jsonable(v) for k, v in (span.attributes or {}).items()},
    }


def _jsonable(value: object) -> object:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def setup_telemetry(
    service_name: str,
    spans_out: str | None = None,
    extra_exporters: Sequence[SpanExporter] = (),
) -> TracerProvider:
    """Installs the global tracer provider for this process (once; later calls return it).

    Args:
        service_name: the `service.name` resource attribute (e.g. "slomesh-scheduler").
        spans_out: path of a JSON-lines span file; None = env `SLOMESH_SPANS_OUT` if set.
        extra_exporters: more exporters (tests pass an `InMemorySpanExporter`), each behind a
            synchronous processor so spans are visible as soon as they end.

    Returns:
        The installed `TracerProvider`.
    """
    global _provider
    with _lock:
        if _provider is not None:
            for exporter in extra_exporters:
                _provider.add_span_processor(SimpleSpanProcessor(exporter))
            return _provider
        resource = Resource.create({"service.name": service_name})
        provider = TracerProvider(resource=resource)
        path = spans_out or os.environ.get("SLOMESH_SPANS_OUT")
        if path:
            provider.add_span_processor(
                BatchSpanProcessor(JsonLinesSpanExporter(path), schedule_delay_millis=500)
            )
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        ):
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        for exporter in extra_exporters:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        _provider = provider
        return provider


def shutdown_telemetry() -> None:
    """Flushes and shuts down the provider installed by `setup_telemetry` (if any)."""
    with _lock:
        if _provider is not None:
            _provider.force_flush()
            _provider.shutdown()


def get_tracer(name: str) -> trace.Tracer:
    """A tracer from the global provider (a no-op tracer before `setup_telemetry`)."""
    return trace.get_tracer(name)


def inject_headers(carrier: dict[str, str] | None = None, context: Context | None = None) -> dict:
    """Writes the W3C trace context of `context` (default: current) into `carrier`."""
    carrier = {} if carrier is None else carrier
    propagate.inject(carrier, context=context)
    return carrier


def extract_context(carrier: Mapping[str, str] | None) -> Context:
    """The trace context carried by `carrier` (HTTP or NATS headers); empty if none."""
    return propagate.extract(dict(carrier or {}))


def grpc_metadata_inject(context: Context | None = None) -> list[tuple[str, str]]:
    """gRPC metadata pairs carrying the trace context (lower-case keys)."""
    return [(k.lower(), v) for k, v in inject_headers({}, context).items()]


def grpc_metadata_extract(metadata: Sequence[tuple[str, str | bytes]] | None) -> Context:
    """The trace context carried by incoming gRPC metadata (`context.invocation_metadata()`)."""
    carrier: dict[str, str] = {}
    for item in metadata or ():
        key, value = item[0], item[1]
        if isinstance(value, bytes):
            continue
        carrier[key] = value
    return propagate.extract(carrier)
