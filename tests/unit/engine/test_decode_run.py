"""`Engine.run_decode_steps` must give exactly what repeated `Engine.step` calls give."""

from __future__ import annotations

import random

import pytest

from slomesh.engine.kv_cache import BlockStored
from slomesh.engine.model import DecodeRun, Engine, EngineConfig, EngineRequest
from slomesh.engine.profiles import DEFAULT_MODEL, get_profile, step_time_s


def create_engine(gpu="H100", **config):
    return Engine(get_profile(gpu), DEFAULT_MODEL, EngineConfig(**config))


def random_workload(seed, n_requests=30, shared_prefix=64, max_prompt=360, rate_per_s=8.0):
    """(arrival_s, EngineRequest) pairs with some shared prefixes, sorted by arrival."""
    rng = random.Random(seed)
    system = [rng.randrange(3, 30000) for _ in range(shared_prefix)]
    out = []
    t = 0.0
    for i in range(n_requests):
        t += rng.expovariate(rate_per_s)
        n = rng.randrange(1, max_prompt - shared_prefix)
        prompt = (system if rng.random() < 0.5 else []) + [
            rng.randrange(3, 30000) for _ in range(n)
        ]
        out.append((t, EngineRequest(f"r{i}", prompt, rng.randrange(1, 120))))
    return out


def drive(engine, workload, use_runs, rng=None, reset_at=None):
    """Runs `workload` to completion; returns the flat list of StepResults, the number of decode
    runs, and the free KV blocks after each step.

    With `use_runs`, decode runs are tried first with random `until_s` / `max_steps` bounds
    (arrivals always bound them, as in the simulator); otherwise only `step` is used.
    """
    results = []
    free_after = []  # free KV blocks after each step
    runs = 0
    pending = list(workload)
    t = 0.0
    reset_done = False
    while pending or engine.has_work():
        if not engine.has_work():
            t = max(t, pending[0][0])
        while pending and pending[0][0] <= t:
            _, req = pending.pop(0)
            engine.add_request(req, now_s=t)
        if reset_at is not None and not reset_done and t >= reset_at and not engine.has_work():
            assert engine.reset_prefix_cache()
            reset_done = True
            continue
        next_arrival = pending[0][0] if pending else float("inf")
        run = None
        if use_runs:
            until = next_arrival
            if rng is not None and rng.random() < 0.3:
                until = min(until, t + rng.uniform(0.0, 0.2))
            max_steps = rng.randrange(1, 40) if rng is not None and rng.random() < 0.3 else None
            run = engine.run_decode_steps(t, until_s=until, max_steps=max_steps)
        if run is not None:
            runs += 1
            assert all(s < next_arrival for s in run.start_s)
            assert run.num_free_blocks[-1] == engine.kv.num_free_blocks
            results.extend(run.to_step_results())
            free_after.extend(run.num_free_blocks)
            t = run.end_s
        else:
            r = engine.step(t)
            results.append(r)
            free_after.append(engine.kv.num_free_blocks)
            t = r.end_s
    return results, runs, free_after


@pytest.mark.parametrize(
    "seed,config",
    [
        (1, {}),
        (2, {"block_size": 4}),
        (3, {"block_size": 1}),
        (4, {"num_gpu_blocks": 90, "block_size": 8, "max_model_len": 512}),
        (5, {"num_gpu_blocks": 40, "block_size": 16, "max_model_len": 400}),
        (6, {"max_num_seqs": 3, "max_num_batched_tokens": 128}),
        (7, {"enable_prefix_caching": False}),
        (8, {"max_model_len": 200}),
    ],
)
def test_runs_equal_single_steps(seed, config):
    workload = random_workload(seed, max_prompt=min(360, config.get("max_model_len", 360) - 40))
    a = create_engine("A10G", **config)
    b = create_engine("A10G", **config)
    expected, _, free_expected = drive(a, workload, use_runs=False)
    got, runs, free_got = drive(b, workload, use_runs=True, rng=random.Random(seed))
    assert runs > 0, "the fast path was never taken"
    assert free_got == free_expected
    assert len(got) == len(expected)
    for i, (x, y) in enumerate(zip(expected, got, strict=True)):
        assert x == y, f"step {i} differs"
    assert a.stats() == b.stats()
    assert sorted(a.kv.cached_block_hashes()) == sorted(b.kv.cached_block_hashes())
    assert a.kv.num_free_blocks == b.kv.num_free_blocks


def test_pending_events_go_to_the_first_step():
    workload = random_workload(11, n_requests=12)
    a = create_engine(block_size=8)
    b = create_engine(block_size=8)
    expected, _, _ = drive(a, workload, use_runs=False, reset_at=10.0)
    got, _, _ = drive(b, workload, use_runs=True, rng=random.Random(3), reset_at=10.0)
    assert expected == got


def test_hand_checked_run():
    """One request of 20 prompt tokens decoding 5 tokens with block size 8."""
    e = create_engine("H100", block_size=8)
    e.add_request(EngineRequest("a", list(range(100, 120)), 6), now_s=0.0)
    prefill = e.step(0.0)
    assert prefill.num_prefill_tokens == 20 and len(prefill.outputs) == 1
    run = e.run_decode_steps(prefill.end_s)
    assert isinstance(run, DecodeRun)
    assert run.num_steps == 5 and run.batch_size == 1
    # Context of step j is 21 + j tokens (prompt + outputs so far, the new one included).
    profile = get_profile("H100")
    t = prefill.end_s
    for j in range(5):
        d = step_time_s(profile, DEFAULT_MODEL, 0, 1, 21 + j, attention_pairs=float(21 + j))
        assert run.start_s[j] == t
        assert run.duration_s[j] == d
        t += d
    assert run.end_s == t
    # KV length goes 20 -> 25 tokens: the 24th token fills block 3 (one BlockStored, at the
    # step computing token 24, i.e. step 3: KV length 20 + 3 + 1).
    stored = [(j, ev) for j, evs in enumerate(run.kv_events) for ev in evs]
    assert [j for j, _ in stored] == [3]
    assert isinstance(stored[0][1], BlockStored) and len(stored[0][1].block_hashes) == 1
    assert [m.request_id for m in run.finished] == ["a"]
    assert run.finished[0].num_output_tokens == 6
    assert run.finished[0].finished_time_s == run.end_s
    assert not e.has_work()


def test_bounds_and_refusals():
    e = create_engine("H100")
    assert e.run_decode_steps(0.0) is None  # nothing running
    e.add_request(EngineRequest("a", list(range(100, 140)), 50), now_s=0.0)
    assert e.run_decode_steps(0.0) is None  # waiting request: a prefill step comes first
    first = e.step(0.0)
    assert e.run_decode_steps(first.end_s, until_s=first.end_s) is None  # no step starts
    run = e.run_decode_steps(first.end_s, max_steps=3)
    assert run.num_steps == 3 and not run.finished
    run = e.run_decode_steps(run.end_s, until_s=run.end_s + 1e-9)
    assert run.num_steps == 1
    e.add_request(EngineRequest("b", list(range(200, 240)), 5), now_s=run.end_s)
    assert e.run_decode_steps(run.end_s) is None  # "b" waits


def test_run_stops_before_a_step_that_would_preempt():
    """Two requests outgrow a 12-block cache: the run ends where blocks run out, then `step`
    preempts, and everything still matches stepping one by one."""
    config = {"block_size": 4, "num_gpu_blocks": 12, "max_model_len": 40}
    workload = [
        (0.0, EngineRequest("a", list(range(100, 110)), 25)),
        (0.0, EngineRequest("b", list(range(200, 210)), 25)),
    ]
    probe = create_engine("L4", **config)
    for _, req in workload:
        probe.add_request(req, now_s=0.0)
    t = probe.step(0.0).end_s  # both prefills: 3 blocks each, 6 free
    run = probe.run_decode_steps(t)
    # KV lengths 10 -> 10 + k; blocks needed per request: ceil((10 + k) / 4) - 3. With 6 free
    # blocks, k = 14 needs 3 + 3 = 6 blocks (fits), k = 15 needs 4 + 4 (does not).
    assert run.num_steps == 14 and not run.finished
    assert probe.kv.num_free_blocks == 0
    assert probe.run_decode_steps(run.end_s) is None
    assert probe.step(run.end_s).preempted == ["b"]

    a = create_engine("L4", **config)
    b = create_engine("L4", **config)
    expected, _, free_expected = drive(a, workload, use_runs=False)
    got, runs, free_got = drive(b, workload, use_runs=True)
    assert free_got == free_expected
    assert runs >= 2 and a.stats().num_preemptions_total >= 1
    assert expected == got
    assert a.stats() == b.stats()
