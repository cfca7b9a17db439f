"""`predict` and its parts equal a straightforward implementation of their formulas.

The predictor resolves an instance's step-time model (GPU profile, model shape, fitted or online
profile, KV capacity) once per prediction instead of once per part (issue 4: the in-process
decision in under 1 ms). The reference below re-derives everything per call from the formulas
of `slomesh.scheduler.predictor`'s docstrings, and hypothesis checks the two agree on random
instances, requests and knobs -- the roofline, a fitted latency profile, an online fit, and the
measured throughputs of a GPU type without a profile.
"""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slomesh.engine.profiles import DEFAULT_MODEL, MODELS, PROFILES, step_time_s
from slomesh.online_fit import LinearStepModel, PublishedStepTimeFit
from slomesh.scheduler.predictor import (
    PredictorConfig,
    decode_throughput_tokens_per_s,
    fitted_step_ms,
    load_latency_profile,
    predict,
    prefill_ms,
    queue_wait_ms,
    tpot_ms,
)
from slomesh.scheduler.view import InstanceView
from tests.unit.scheduler.test_predictor import fitted_profile, inst

REL = 1e-9


# -- the reference: every quantity from its formula, every time ----------------------------------


def ref_step_model(i: InstanceView, config: PredictorConfig):
    """(GPU profile, model, fitted step model or None, KV capacity in tokens)."""
    profile = PROFILES.get(i.gpu_type) or PROFILES[config.fallback_gpu_type]
    model = MODELS.get(i.model, DEFAULT_MODEL)
    fitted = None
    paths = dict(config.latency_profiles)
    if i.gpu_type in paths:
        fitted = load_latency_profile(paths[i.gpu_type])
        if fitted.model != i.model:
            fitted = None
    if i.online_fit is not None and config.online_fit_min_observations:
        online = i.online_fit.step_model(config.online_fit_min_observations, fitted)
        if online is not None:
            fitted = online
    block_size = i.block_size or config.default_block_size
    blocks = i.num_gpu_blocks or profile.num_gpu_blocks(model, block_size)
    return profile, model, fitted, blocks * block_size


def ref_chunk_ms(i, config, n, prior, decode_seqs, decode_context):
    """One step: a chunk of ``n`` prompt tokens after ``prior`` beside ``decode_seqs`` decodes
    over ``decode_context`` KV tokens (fitted profile, else the roofline), ms."""
    profile, model, fitted, _ = ref_step_model(i, config)
    pairs = n * prior + n * (n + 1) / 2.0
    if fitted is not None:
        return fitted_step_ms(fitted, n, pairs, prior + n, decode_seqs, decode_context)
    return 1000.0 * step_time_s(
        profile, model, n, decode_seqs, decode_context + prior + n,
        attention_pairs=decode_context + pairs,
    )  # fmt: skip


def measured_only(i, config, throughput):
    return ref_step_model(i, config)[2] is None and i.gpu_type not in PROFILES and throughput > 0


def ref_decode_throughput(i, config):
    if i.decode_tokens_per_s > 0:
        return i.decode_tokens_per_s
    profile, model, fitted, capacity = ref_step_model(i, config)
    batch = max(1, min(i.num_requests_running, config.max_num_seqs))
    context = int(i.kv_cache_usage * capacity)
    if fitted is not None:
        step = fitted_step_ms(fitted, 0, 0.0, 0, batch, context)
        return batch / step * 1000.0 if step > 0 else math.inf
    return batch / step_time_s(profile, model, 0, batch, context, attention_pairs=float(context))


def ref_pieces_ms(i, config, pieces, decode_seqs, decode_context):
    """One step of the chunks ``pieces`` [(tokens, tokens of their prompt before them)] beside
    ``decode_seqs`` decodes over ``decode_context`` KV tokens, ms."""
    profile, model, fitted, _ = ref_step_model(i, config)
    n = sum(k for k, _ in pieces)
    pairs = sum(k * prior + k * (k + 1) / 2.0 for k, prior in pieces)
    prefill_context = sum(prior + k for k, prior in pieces)
    if fitted is not None:
        return fitted_step_ms(fitted, n, pairs, prefill_context, decode_seqs, decode_context)
    if n + decode_seqs == 0:
        return 0.0
    return 1000.0 * step_time_s(
        profile, model, n, decode_seqs, decode_context + prefill_context,
        attention_pairs=decode_context + pairs,
    )  # fmt: skip


class RefPlacement:
    def __init__(self, t, tokens, cached):
        self.t, self.total, self.left, self.prior, self.end = t, tokens, tokens, cached, math.inf


def ref_step(i, config, placements, start, running, context, budget):
    """The step starting at ``start`` over the placements' tokens left, first come first
    served, up to ``budget``: its end (each placement it finishes ends then)."""
    pieces, finished, room = [], [], budget
    for p in placements:
        if room == 0:
            break
        if p.left == 0:
            continue
        k = min(p.left, room)
        pieces.append((k, p.prior))
        p.left -= k
        p.prior += k
        room -= k
        if p.left == 0:
            finished.append(p)
    end = start + ref_pieces_ms(i, config, pieces, running, context)
    for p in finished:
        p.end = end
    return end


def ref_prefill_steps(i, config, arrival_ms, running, context, budget):
    """The scheduler's placements reaching ``i`` by ``arrival_ms`` run through the prefill
    steps: a step of its own starts at a placement's arrival when none is in flight (its
    prompt runs after half a decode step), the next one at the previous one's end while
    tokens wait, up to the steps started by ``arrival_ms``. Returns
    (placements, [(start, end)] of the steps, half a decode step)."""
    half = ref_pieces_ms(i, config, [], running, context) / 2.0 if running else 0.0
    arrivals = [a for a in i.prefill_arrivals_ms if a[0] <= arrival_ms]
    placements, steps, k = [], [], 0
    while True:
        last_end = steps[-1][1] if steps else -math.inf
        left = any(p.left for p in placements)
        if left and last_end <= (arrivals[k][0] if k < len(arrivals) else arrival_ms):
            steps.append((last_end, ref_step(i, config, placements, last_end, running, context, budget)))
            continue
        if k == len(arrivals):
            break
        placements.append(RefPlacement(*arrivals[k]))
        t = arrivals[k][0]
        k += 1
        if last_end <= t:  # in flight from its arrival: the decode step, then its own
            steps.append((t, ref_step(i, config, placements, t + half, running, context, budget)))
    return placements, steps, half


def ref_queue_wait_and_shared(i, new_kv_tokens, config, arrival_ms=0.0, uncached=0):
    capacity = ref_step_model(i, config)[3]
    queued = i.queued_prefill_tokens
    used = i.kv_cache_usage * capacity
    wait = shared = 0.0
    if measured_only(i, config, i.prefill_tokens_per_s):
        if queued > 0:
            wait += queued / i.prefill_tokens_per_s * 1000.0
    else:
        running = min(i.num_requests_running, config.max_num_seqs)
        budget = max(1, config.prefill_chunk_tokens - running)
        context = int(used)
        full = ref_chunk_ms(i, config, budget, 0, running, context)
        half = ref_chunk_ms(i, config, 0, 0, running, context) / 2.0 if running else 0.0
        known_wait, ahead, unknown = half, 0, queued
        if i.prefill_arrivals_ms:
            placements, steps, _ = ref_prefill_steps(
                i, config, arrival_ms, running, context, budget
            )
            stamp = min(-i.state_stamp_age_ms, arrival_ms)
            # An agent counts a prompt whole until its first token.
            known = sum(p.total for p in placements if p.t <= stamp and p.end > stamp)
            unknown = max(0, i.state_prefill_tokens - known)
            in_flight = [st for st in steps if st[0] <= arrival_ms < st[1]]
            if in_flight:
                clock = in_flight[0][1]
                known_wait = clock - arrival_ms
                # Steps of the placements after it, before the step the request joins.
                while (ahead := sum(p.left for p in placements)) >= budget:
                    end = ref_step(i, config, placements, clock, running, context, budget)
                    known_wait += end - clock
                    clock = end
        unknown_wait = 0.0
        if unknown > 0:
            first = ref_chunk_ms(i, config, min(unknown, budget), 0, running, context)
            unknown_wait = first / 2.0 + (unknown // budget) * full
        wait += max(known_wait, unknown_wait)
        if uncached > 0 and known_wait > 0:
            own = min(uncached, max(1, budget - ahead))
            behind = int(i.prefill_arrival_tokens_per_s * known_wait / 1000.0)
            n = min(budget - own, ahead + behind)
            if n > 0:
                shared = ref_chunk_ms(i, config, n + own, 0, running, context) - ref_chunk_ms(
                    i, config, own, 0, running, context
                )
    if i.queued_decode_tokens > 0:
        ahead = used + queued + i.queued_decode_tokens
        deficit = ahead + new_kv_tokens - capacity
        if deficit > 0 and ahead > 0:
            drain_s = i.queued_decode_tokens / ref_decode_throughput(i, config)
            wait += min(1.0, deficit / ahead) * drain_s * 1000.0
    return wait, shared


def ref_queue_wait(i, new_kv_tokens, config, arrival_ms=0.0):
    return ref_queue_wait_and_shared(i, new_kv_tokens, config, arrival_ms)[0]


def ref_prefill(i, uncached, cached, config):
    if uncached <= 0:
        return 0.0
    if measured_only(i, config, i.prefill_tokens_per_s):
        return uncached / i.prefill_tokens_per_s * 1000.0
    capacity = ref_step_model(i, config)[3]
    running = min(i.num_requests_running, config.max_num_seqs)
    decode_context = int(i.kv_cache_usage * capacity)
    chunk = config.prefill_chunk_tokens
    return math.fsum(
        ref_chunk_ms(i, config, min(chunk, uncached - done), cached + done, running, decode_context)
        for done in range(0, uncached, chunk)
    )


def ref_tpot(i, prompt_tokens, output_tokens, config, uncached=0):
    """(TPOT, batch, TPOT of the decodes running there with `uncached` prompt tokens added,
    the decode step without the prefills' stretch)."""
    batch = min(i.num_requests_running + i.num_requests_waiting + 1, config.max_num_seqs)
    if measured_only(i, config, i.decode_tokens_per_s):
        measured = batch / i.decode_tokens_per_s * 1000.0
        return measured, batch, measured, measured
    profile, model, fitted, capacity = ref_step_model(i, config)
    context = int(
        i.kv_cache_usage * capacity + i.queued_prefill_tokens + prompt_tokens + output_tokens / 2
    )
    if fitted is not None:
        step = fitted_step_ms(fitted, 0, 0.0, 0, batch, context)
    else:
        step = 1000.0 * step_time_s(profile, model, 0, batch, context, attention_pairs=context)
    chunk = config.prefill_chunk_tokens
    per_token_s = ref_chunk_ms(i, config, chunk, 0, 0, 0) / 1000.0 / chunk
    rate = i.prefill_arrival_tokens_per_s
    rho = min(config.prefill_interference_max, rate * per_token_s)
    rate_inflight = rate + uncached / i.prefill_rate_window_s
    rho_inflight = min(config.prefill_interference_max, rate_inflight * per_token_s)
    return step / (1.0 - rho), batch, step / (1.0 - rho_inflight), step


def ref_predict(i, rtt_ms, prompt_tokens, cached_prefix_tokens, output_tokens, config,
                model_load_ms, charge_model_load):  # fmt: skip
    cached = max(0, min(cached_prefix_tokens, prompt_tokens - 1))
    uncached = prompt_tokens - cached
    n_out = max(1, output_tokens)
    wait, shared = ref_queue_wait_and_shared(i, uncached + n_out, config, rtt_ms / 2.0, uncached)
    prefill = ref_prefill(i, uncached, cached, config) + shared
    tpot, batch, inflight_tpot, step = ref_tpot(i, prompt_tokens, n_out, config, uncached)
    ttft = rtt_ms + model_load_ms + wait + prefill
    gpu_s = prefill / 1000.0 + (n_out - 1) * step / 1000.0 / batch
    if charge_model_load:
        gpu_s += model_load_ms / 1000.0
    return {
        "rtt_ms": rtt_ms, "queue_wait_ms": wait, "prefill_ms": prefill, "transfer_ms": 0.0,
        "tpot_ms": tpot, "inflight_tpot_ms": inflight_tpot, "decode_ms": (n_out - 1) * tpot, "ttft_ms": ttft,
        "e2e_ms": ttft + (n_out - 1) * tpot, "cached_prefix_tokens": cached,
        "uncached_prompt_tokens": uncached, "output_tokens": n_out, "batch_size": batch,
        "gpu_seconds": gpu_s, "cost_usd": gpu_s * i.price_usd_per_hour / 3600.0,
        "bytes_moved": 0, "model_load_ms": model_load_ms, "transfer_source_region": "",
        "transfer_source_instance": "", "transfer_prefix_tokens": 0, "egress_cost_usd": 0.0,
    }  # fmt: skip


# -- strategies ------------------------------------------------------------------------------------

coefficients = st.tuples(*[st.floats(0.0, 10.0)] * 3)
online_fits = st.none() | st.builds(
    PublishedStepTimeFit,
    model=st.builds(LinearStepModel, prefill=coefficients, decode=coefficients),
    decode_observations=st.integers(0, 60),
    prefill_observations=st.integers(0, 60),
)
throughputs = st.just(0.0) | st.floats(1.0, 1e5)
instances = st.builds(
    inst,
    gpu_type=st.sampled_from([*sorted(PROFILES), "CPU"]),
    model=st.sampled_from([*sorted(MODELS), "unknown/model"]),
    num_requests_running=st.integers(0, 400),
    num_requests_waiting=st.integers(0, 64),
    kv_cache_usage=st.floats(0.0, 1.0),
    queued_prefill_tokens=st.integers(0, 200_000),
    queued_decode_tokens=st.integers(0, 200_000),
    prefill_tokens_per_s=throughputs,
    decode_tokens_per_s=throughputs,
    block_size=st.sampled_from([0, 16, 32, 128]),
    num_gpu_blocks=st.just(0) | st.integers(1, 200_000),
    price_usd_per_hour=st.floats(0.0, 12.0),
    prefill_arrival_tokens_per_s=st.just(0.0) | st.floats(1.0, 1e6),
    prefill_rate_window_s=st.floats(0.5, 60.0),
    online_fit=online_fits,
    prefill_arrivals_ms=st.lists(
        st.tuples(st.floats(-1000.0, 500.0), st.integers(1, 20_000), st.integers(0, 40_000)),
        max_size=8,
    ).map(lambda a: tuple(sorted(a))),
    state_prefill_tokens=st.integers(0, 50_000),
    state_stamp_age_ms=st.floats(0.0, 300.0),
)


@pytest.fixture(scope="module")
def h100_profile(tmp_path_factory) -> str:
    return str(fitted_profile().save(tmp_path_factory.mktemp("profiles") / "h100.yaml"))


def configs(h100_profile: str):
    return st.builds(
        PredictorConfig,
        prefill_chunk_tokens=st.integers(256, 16_384),
        max_num_seqs=st.integers(1, 512),
        default_block_size=st.sampled_from([16, 32]),
        prefill_interference_max=st.floats(0.0, 0.95),
        online_fit_min_observations=st.integers(0, 50),
        latency_profiles=st.just(()) | st.just({"H100": h100_profile}),
    )


def close(a: float, b: float) -> bool:
    return a == b or math.isclose(a, b, rel_tol=REL, abs_tol=1e-12)


# -- the checks ------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_predict_equals_the_reference(h100_profile, data):
    config = data.draw(configs(h100_profile))
    i = data.draw(instances)
    prompt_tokens = data.draw(st.integers(1, 65_536))
    kw = {
        "rtt_ms": data.draw(st.floats(0.0, 400.0)),
        "prompt_tokens": prompt_tokens,
        "cached_prefix_tokens": data.draw(st.integers(0, prompt_tokens + 64)),
        "output_tokens": data.draw(st.integers(0, 8192)),
        "config": config,
        "model_load_ms": data.draw(st.just(0.0) | st.floats(0.0, 60_000.0)),
        "charge_model_load": data.draw(st.booleans()),
    }
    got = predict(i, **kw)
    want = ref_predict(i, **kw)
    for f in fields(got):
        assert close(getattr(got, f.name), want[f.name]), (f.name, getattr(got, f.name), want)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_parts_equal_the_reference(h100_profile, data):
    config = data.draw(configs(h100_profile))
    i = data.draw(instances)
    prompt_tokens = data.draw(st.integers(1, 65_536))
    cached = data.draw(st.integers(0, 65_536))
    output_tokens = data.draw(st.integers(1, 8192))
    new_kv = data.draw(st.integers(0, 100_000))
    arrival = data.draw(st.just(0.0) | st.floats(0.0, 300.0))
    assert close(
        queue_wait_ms(i, new_kv, config, arrival), ref_queue_wait(i, new_kv, config, arrival)
    )
    assert close(
        prefill_ms(i, prompt_tokens, cached, config), ref_prefill(i, prompt_tokens, cached, config)
    )
    uncached = max(0, prompt_tokens - cached)
    got_tpot, got_batch, got_inflight = tpot_ms(i, prompt_tokens, output_tokens, config, uncached)
    want_tpot, want_batch, want_inflight, _ = ref_tpot(
        i, prompt_tokens, output_tokens, config, uncached
    )
    assert got_batch == want_batch and close(got_tpot, want_tpot)
    assert close(got_inflight, want_inflight) and got_inflight >= got_tpot * (1 - 1e-12)
    assert close(decode_throughput_tokens_per_s(i, config), ref_decode_throughput(i, config))


def test_the_reference_covers_every_step_model(h100_profile):
    """The strategies reach the four ways a step is timed (else the checks above prove less)."""
    config = PredictorConfig(latency_profiles={"H100": h100_profile})
    online = PublishedStepTimeFit(
        model=LinearStepModel(prefill=(1.0, 0.1, 1e-5), decode=(9.0, 0.2, 1e-3)),
        decode_observations=40,
        prefill_observations=40,
    )
    cases = {
        "roofline": inst("A100"),
        "fitted profile": inst("H100"),
        "online fit": inst("L4", online_fit=online),
        "measured": inst("CPU", prefill_tokens_per_s=500.0, decode_tokens_per_s=50.0),
    }
    times = {
        name: prefill_ms(i, 4096, 0, config) for name, i in cases.items()
    }  # one figure per way, all different
    assert len(set(times.values())) == 4
    for i in cases.values():
        assert close(prefill_ms(i, 4096, 0, config), ref_prefill(i, 4096, 0, config))
    assert times["measured"] == pytest.approx(4096 / 500.0 * 1000.0)
