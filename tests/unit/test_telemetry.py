from __future__ import annotations

import json

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from slomesh.telemetry import (
    JsonLinesSpanExporter,
    extract_context,
    grpc_metadata_extract,
    grpc_metadata_inject,
    inject_headers,
)


def _provider(tmp_path, name="svc"):
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    exporter = JsonLinesSpanExporter(str(tmp_path / "spans.jsonl"))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_spans_are_written_as_json_lines_with_parent_links(tmp_path):
    provider, exporter = _provider(tmp_path)
    tracer = provider.get_tracer("t")
    with (
        tracer.start_as_current_span("outer") as outer,
        tracer.start_as_current_span("inner", attributes={"tokens": 3}),
    ):
        pass
    exporter.shutdown()
    rows = [json.loads(line) for line in (tmp_path / "spans.jsonl").read_text().splitlines()]
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == {"outer", "inner"}
    assert by_name["inner"]["parent_span_id"] == by_name["outer"]["span_id"]
    assert by_name["outer"]["parent_span_id"] is None
    assert by_name["inner"]["trace_id"] == format(outer.get_span_context().trace_id, "032x")
    assert by_name["inner"]["service.name"] == "svc"
    assert by_name["inner"]["attributes"] == {"tokens": 3}
    assert by_name["inner"]["end_time_unix_nano"] >= by_name["inner"]["start_time_unix_nano"]


def test_two_writers_append_to_one_file(tmp_path):
    p1, e1 = _provider(tmp_path, "a")
    p2, e2 = _provider(tmp_path, "b")
    for _ in range(50):
        with p1.get_tracer("t").start_as_current_span("x"):
            pass
        with p2.get_tracer("t").start_as_current_span("y"):
            pass
    e1.shutdown()
    e2.shutdown()
    lines = (tmp_path / "spans.jsonl").read_text().splitlines()
    assert len(lines) == 100
    assert {json.loads(line)["service.name"] for line in lines} == {"a", "b"}


def test_context_round_trips_through_headers_and_grpc_metadata(tmp_path):
    provider, _ = _provider(tmp_path)
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("root") as root:
        headers = inject_headers()
        metadata = grpc_metadata_inject()
    want = root.get_span_context()
    assert "traceparent" in headers
    for ctx in (extract_context(headers), grpc_metadata_extract(metadata + [("bin-bin", b"x")])):
        got = trace.get_current_span(ctx).get_span_context()
        assert (got.trace_id, got.span_id) == (want.trace_id, want.span_id)
    assert not trace.get_current_span(extract_context({})).get_span_context().is_valid
