from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from slomesh.emulator.metrics import EmulatorMetrics, build_1_2_5_buckets
from slomesh.emulator.runner import EngineRunner, RequestStream, TokenEvent
from slomesh.engine.model import Engine, EngineConfig, EngineRequest
from slomesh.engine.profiles import DEFAULT_MODEL, get_profile


def create_runner(time_scale=1.0, **config):
    engine = Engine(get_profile("H100"), DEFAULT_MODEL, EngineConfig(**config))
    metrics = EmulatorMetrics("m", engine.max_model_len, {"block_size": "16"}, {"gpu_type": "H100"})
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    runner = EngineRunner(
        engine,
        metrics=metrics,
        tracer=provider.get_tracer("test"),
        time_scale=time_scale,
        span_attributes={"slomesh.gpu_type": "H100"},
    )
    return runner, metrics, exporter


def sample(metrics, name, **labels):
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


async def collect(stream):
    return [event async for event in stream]


async def test_tokens_arrive_in_wall_clock_time():
    runner, metrics, _exporter = create_runner()
    runner.start()
    try:
        prompt = list(range(1000, 1000 + 4000))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        stream = runner.submit(EngineRequest("a", prompt, max_tokens=5))
        events = await asyncio.wait_for(collect(stream), 10)
        elapsed = loop.time() - t0
    finally:
        await runner.stop()
    # Five tokens, one per step; a reader that lags a step gets two merged into one event
    # (vLLM's RequestOutputCollector), which a loaded machine can cause.
    assert sum(len(e.token_ids) for e in events) == 5
    assert all(len(e.token_ids) >= 1 for e in events)
    assert [e.finished for e in events] == [False] * (len(events) - 1) + [True]
    assert events[-1].finish_reason == "length"
    times = [e.time_unix_s for e in events]
    assert times == sorted(times)
    # The modelled time: one 4000-token prefill plus four decode steps on an H100.
    probe = Engine(get_profile("H100"))
    probe.add_request(EngineRequest("p", prompt, 5))
    modelled = 0.0
    while probe.has_work():
        modelled += probe.step(modelled).duration_s
    assert modelled * 0.9 <= elapsed <= modelled + 2.0
    assert sample(metrics, "vllm:request_success_total", finished_reason="length") == 1
    assert sample(metrics, "vllm:time_to_first_token_seconds_count") == 1
    assert sample(metrics, "vllm:inter_token_latency_seconds_count") == 4
    assert sample(metrics, "vllm:generation_tokens_total") == 5
    assert sample(metrics, "vllm:prompt_tokens_total") == 4000
    assert sample(metrics, "vllm:num_requests_running") == 0
    assert sample(metrics, "slomesh_emulator_steps_total") == 5


async def test_time_scale_speeds_up_delivery():
    runner, _, _ = create_runner(time_scale=0.05)
    runner.start()
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        stream = runner.submit(EngineRequest("a", list(range(8000)), max_tokens=3))
        await asyncio.wait_for(collect(stream), 10)
        elapsed = loop.time() - t0
    finally:
        await runner.stop()
    # 8k prefill is ~0.34 s on an H100; at 1/20 time it takes ~17 ms of wall time.
    assert elapsed < 0.3


async def test_spans_cover_queue_prefill_decode():
    runner, _, exporter = create_runner()
    runner.start()
    try:
        prompt = list(range(200))
        await collect(runner.submit(EngineRequest("a", prompt, max_tokens=3)))
        await collect(runner.submit(EngineRequest("b", prompt + [1], max_tokens=3)))
    finally:
        await runner.stop()
    spans = exporter.get_finished_spans()
    requests = {s.attributes["slomesh.request_id"]: s for s in spans if s.name == "engine.request"}
    assert set(requests) == {"a", "b"}
    b = requests["b"]
    assert b.attributes["slomesh.cached_tokens"] == 192
    assert b.attributes["slomesh.prompt_tokens"] == 201
    assert b.attributes["slomesh.output_tokens"] == 3
    assert b.attributes["slomesh.gpu_type"] == "H100"
    children = sorted(
        (s for s in spans if s.parent is not None and s.parent.span_id == b.context.span_id),
        key=lambda s: s.start_time,
    )
    assert [c.name for c in children] == ["engine.queue", "engine.prefill", "engine.decode"]
    assert children[0].start_time == b.start_time
    assert children[0].end_time == children[1].start_time
    assert children[1].end_time == children[2].start_time
    assert children[2].end_time == b.end_time
    assert children[1].end_time > children[1].start_time


async def test_abort_ends_the_stream_and_frees_the_engine():
    runner, metrics, exporter = create_runner(max_model_len=20000)
    runner.start()
    try:
        stream = runner.submit(EngineRequest("long", list(range(100)), max_tokens=10000))
        it = stream.__aiter__()
        first = await asyncio.wait_for(it.__anext__(), 5)
        assert first.token_ids
        assert runner.abort("long")
        rest = [e async for e in it]
        assert rest[-1].finished and rest[-1].finish_reason == "abort"
        assert not runner.abort("long")
        assert not runner.engine.has_work()
        assert runner.engine.kv.usage == 0.0
    finally:
        await runner.stop()
    assert sample(metrics, "vllm:request_success_total", finished_reason="abort") == 1
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "engine.request"]
    assert span.attributes["slomesh.finish_reason"] == "abort"
    assert not span.status.is_ok


async def test_stop_aborts_live_requests():
    runner, _, _ = create_runner(max_model_len=20000)
    runner.start()
    stream = runner.submit(EngineRequest("x", list(range(10)), max_tokens=10000))
    await asyncio.sleep(0.05)
    await runner.stop()
    events = await asyncio.wait_for(collect(stream), 2)
    assert events[-1].finish_reason == "abort"
    assert runner.num_live_requests == 0


def test_bad_time_scale():
    engine = Engine(get_profile("H100"))
    with pytest.raises(ValueError, match="time_scale"):
        EngineRunner(engine, time_scale=0)


def test_1_2_5_buckets():
    assert build_1_2_5_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
    assert build_1_2_5_buckets(1) == [1]


async def test_engine_failure_aborts_live_requests_and_keeps_serving(monkeypatch):
    runner, _, _ = create_runner()
    real_step = runner.engine.step
    calls = []

    def step_failing_once(now_s):
        calls.append(now_s)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real_step(now_s)

    monkeypatch.setattr(runner.engine, "step", step_failing_once)
    runner.start()
    try:
        events = await asyncio.wait_for(collect(runner.submit(EngineRequest("a", [1, 2], 2))), 5)
        assert events[-1].finish_reason == "abort"
        events = await asyncio.wait_for(collect(runner.submit(EngineRequest("b", [1, 2], 2))), 5)
        assert events[-1].finish_reason == "length"
    finally:
        await runner.stop()


def _event(tokens, finished=False):
    return TokenEvent(list(tokens), finished, "length" if finished else None, 0.0)


async def test_stream_interval_sends_first_token_then_every_n_then_the_rest():
    stream = RequestStream("r", 10, 8, 0.0, None, stream_interval=3)
    received = []
    for i in range(8):
        stream._put(_event([i], finished=i == 7))
        # A consumer that keeps up takes each event as soon as it is delivered.
        while stream._ready.is_set():
            received.append(await anext(stream.__aiter__()))
    assert [e.token_ids for e in received] == [[0], [1, 2, 3], [4, 5, 6], [7]]
    assert [e.finished for e in received] == [False, False, False, True]
    assert stream.num_output_tokens == 8


async def test_a_lagging_consumer_gets_merged_events_in_order():
    stream = RequestStream("r", 10, 6, 0.0, None)
    for i in range(6):
        stream._put(TokenEvent([i], i == 5, "length" if i == 5 else None, float(i)))
    events = await collect(stream)
    # vLLM's RequestOutputCollector: an event not yet taken absorbs the later ones.
    assert [e.token_ids for e in events] == [[0, 1, 2, 3, 4, 5]]
    assert events[0].finished and events[0].finish_reason == "length"
    assert events[0].time_unix_s == 5.0


async def test_runner_streams_with_an_interval_end_to_end():
    runner, _metrics, _exporter = create_runner()
    runner.start()
    try:
        stream = runner.submit(EngineRequest("a", list(range(64)), max_tokens=7),
                               stream_interval=4)
        events = await asyncio.wait_for(collect(stream), 10)
    finally:
        await runner.stop()
    assert [len(e.token_ids) for e in events] == [1, 4, 2]
    assert events[-1].finished


def test_bad_stream_interval():
    with pytest.raises(ValueError, match="stream_interval"):
        RequestStream("r", 1, 1, 0.0, None, stream_interval=0)
