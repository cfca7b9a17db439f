"""The simulated agent's engine counters equal the emulator's /metrics, whatever the delivery,
and the simulated agent publishes the online latency fit the live one would."""

from __future__ import annotations

import asyncio

import pytest

from slomesh.emulator.metrics import EmulatorMetrics
from slomesh.emulator.runner import EngineRunner
from slomesh.engine.model import Engine, EngineConfig, EngineRequest
from slomesh.engine.profiles import DEFAULT_MODEL, PROFILES, decode_step_time_s, get_profile
from slomesh.online_fit import LinearStepModel, composed_step_ms
from slomesh.sim import SimConfig, Simulator
from slomesh.sim.engine_metrics import EngineMetricCounters
from slomesh.vllm_metrics import parse_vllm_metrics
from tests.unit.sim.helpers import azure_trace, one_h100

COUNTERS = (
    "inter_token_latency_sum_s",
    "inter_token_latency_count",
    "time_to_first_token_count",
    "iteration_count",
    "iteration_tokens_sum",
    "generation_tokens_total",
    "request_prefill_time_sum_s",
    "request_prefill_time_count",
    "request_prompt_tokens_sum",
    "request_prompt_tokens_count",
    "request_prefill_kv_computed_tokens_sum",
    "request_prefill_kv_computed_tokens_count",
)


def engine() -> Engine:
    return Engine(get_profile("H100"), DEFAULT_MODEL, EngineConfig())


def add_requests(e: Engine) -> None:
    for i, (n, out) in enumerate(((300, 40), (1200, 25), (64, 60))):
        prompt = list(range(1000 + 5000 * i, 1000 + 5000 * i + n))
        e.add_request(EngineRequest(f"r{i}", prompt, out), now_s=0.0)


def test_decode_runs_count_what_their_steps_one_by_one_count():
    stepwise, batched = engine(), engine()
    by_step, by_run = EngineMetricCounters(), EngineMetricCounters()
    for e, counters in ((stepwise, by_step), (batched, by_run)):
        add_requests(e)
        now = 0.0
        while e.has_work():
            run = e.run_decode_steps(now, max_steps=7) if e is batched else None
            if run is not None:
                # Delivered in two parts, as the simulator may do.
                half = max(1, run.num_steps // 2)
                counters.on_decode_run(run, 0, half)
                if half < run.num_steps:
                    counters.on_decode_run(run, half, run.num_steps)
                now = run.end_s
                continue
            res = e.step(now)
            counters.on_step(res)
            now = res.end_s
    for name in COUNTERS:
        assert getattr(by_run.counters, name) == pytest.approx(
            getattr(by_step.counters, name), rel=1e-9
        ), name
    c = by_step.counters
    assert c.time_to_first_token_count == 3 and c.request_prompt_tokens_count == 3
    assert c.generation_tokens_total == 40 + 25 + 60
    # Every token after a request's first is one ITL sample.
    assert c.inter_token_latency_count == (40 - 1) + (25 - 1) + (60 - 1)
    assert c.request_prompt_tokens_sum == 300 + 1200 + 64
    e = engine()
    add_requests(e)
    now, run = 0.0, None
    while run is None:
        run = e.run_decode_steps(now)
        now = now if run is not None else e.step(now).end_s
    with pytest.raises(ValueError, match="outside a run"):
        by_run.on_decode_run(run, 3, 3)


async def test_the_counters_equal_the_emulators_metrics():
    """The same engine steps, once through the emulator's runner (its Prometheus metrics, what
    the live agent scrapes) and once through `EngineMetricCounters`: the same values."""
    e = engine()
    metrics = EmulatorMetrics("m", e.max_model_len, {"block_size": "16"}, {"gpu_type": "H100"})
    scale = 0.01  # wall seconds per modelled second: a fast test
    runner = EngineRunner(e, metrics=metrics, time_scale=scale)
    counters = EngineMetricCounters()
    deliver = runner._deliver

    def tapped(result):
        counters.on_step(result)
        deliver(result)

    runner._deliver = tapped
    runner.start()
    try:
        shapes = ((300, 40), (1200, 25), (64, 60))
        prompts = [
            list(range(1000 + 3000 * i, 1000 + 3000 * i + n)) for i, (n, _) in enumerate(shapes)
        ]
        streams = [
            runner.submit(EngineRequest(f"r{i}", prompts[i], out))
            for i, (_, out) in enumerate(shapes)
        ]

        async def drain(stream):
            return [event async for event in stream]

        await asyncio.wait_for(asyncio.gather(*(drain(s) for s in streams)), 30)
    finally:
        await runner.stop()
    scraped = parse_vllm_metrics(metrics.render().decode())
    for name in COUNTERS:
        want = getattr(scraped, name)
        got = getattr(counters.counters, name)
        if name.endswith("_s"):
            got *= scale  # the emulator exports wall seconds
        assert got == pytest.approx(want, rel=1e-6), name
    assert scraped.inter_token_latency_count > 0 and scraped.request_prefill_time_count == 3


def test_the_simulated_agent_publishes_a_fit_of_the_engines_decode_steps(tmp_path):
    topo = one_h100(tmp_path)
    # Staggered arrivals: the decode batch grows to 6 and shrinks, over a few thousand KV
    # tokens; decode-only publication intervals in between.
    rows = [(0.25 * i, 600 + 200 * i, 250) for i in range(6)]
    trace = azure_trace(tmp_path, rows, topo)
    fits = []

    def on_decision(now, request, decision, view):
        (inst,) = view.instances()
        fits.append(inst.online_fit)

    out = Simulator(topo, "round-robin", SimConfig(), on_decision=on_decision).run(trace)
    assert all(r.ok for r in out.results)
    assert fits[0] is not None and fits[0].decode_observations == 0
    last = fits[-1]
    assert last.decode_observations > 0
    gpu = PROFILES["H100"]
    for batch, per_seq in ((1, 700.0), (4, 1000.0)):
        truth = decode_step_time_s(gpu, DEFAULT_MODEL, batch, per_seq) * 1e3
        assert last.model.decode_step_ms(batch, batch * per_seq) == pytest.approx(truth, rel=0.02)


def test_prompts_prefilled_together_do_not_bias_the_simulated_agents_prefill_fit(tmp_path):
    topo = one_h100(tmp_path)
    # Every second a burst of three prompts, prefilled in one step, and half a second later
    # one prompt alone; each decodes 60 tokens.
    rows = []
    for i in range(40):
        rows += [(1.0 * i, 1500, 60)] * 3 + [(1.0 * i + 0.5, 600 + 50 * i, 60)]
    trace = azure_trace(tmp_path, rows, topo)
    fits = []

    def on_decision(now, request, decision, view):
        (inst,) = view.instances()
        fits.append(inst.online_fit)

    out = Simulator(topo, "round-robin", SimConfig(), on_decision=on_decision).run(trace)
    assert all(r.ok for r in out.results)
    last = fits[-1]
    assert last.prefill_observations >= 10
    roofline = LinearStepModel.from_roofline("H100")
    # The fixed cost of a step stays the roofline's (1 ms), not the co-batched prompts' share.
    assert last.model.prefill[0] < 3.0
    for n in (600, 2000, 8192):
        pairs = n * (n + 1) / 2.0
        want = composed_step_ms(roofline, n, pairs, n, 4, 8000)
        assert composed_step_ms(last.model, n, pairs, n, 4, 8000) == pytest.approx(want, rel=0.05)
    # Decode steps, timed with both sides composed, are the roofline's.
    for batch, context in ((4, 8000), (16, 30_000)):
        want = composed_step_ms(roofline, 0, 0, 0, batch, context)
        assert composed_step_ms(last.model, 0, 0, 0, batch, context) == pytest.approx(
            want, rel=0.02
        )
    # The comparison with the static model (the roofline, exact here) is published.
    assert last.decode_static_rmse_ms is not None and last.prefill_static_rmse_ms is not None
