from __future__ import annotations

import random
import time

import pytest

from slomesh.engine.kv_cache import BlockRemoved, BlockStored, compute_block_hashes
from slomesh.engine.model import Engine, EngineConfig, EngineRequest
from slomesh.engine.profiles import DEFAULT_MODEL, get_profile


def create_engine(gpu="H100", **config):
    return Engine(get_profile(gpu), DEFAULT_MODEL, EngineConfig(**config))


def create_request(request_id, num_prompt_tokens=64, max_tokens=4, start=1000, prompt=None):
    if prompt is None:
        prompt = list(range(start, start + num_prompt_tokens))
    return EngineRequest(request_id, prompt, max_tokens)


def run_to_completion(engine, now_s=0.0, max_steps=100_000):
    """Steps until idle; returns (results, tokens per request, end time)."""
    results, tokens = [], {}
    t = now_s
    for _ in range(max_steps):
        if not engine.has_work():
            break
        r = engine.step(t)
        results.append(r)
        for out in r.outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        t = r.end_s
    assert not engine.has_work()
    return results, tokens, t


class TestConfig:
    @pytest.mark.parametrize(
        "field,value",
        [
            ("max_num_batched_tokens", 0),
            ("max_num_seqs", 0),
            ("block_size", 0),
            ("num_gpu_blocks", 0),
            ("max_model_len", 1),
            ("output_vocab_size", 3),
        ],
    )
    def test_bad_values_name_the_field(self, field, value):
        with pytest.raises(ValueError, match=field):
            EngineConfig(**{field: value})

    def test_cache_must_hold_max_model_len(self):
        with pytest.raises(ValueError, match="max_model_len"):
            create_engine(num_gpu_blocks=10, max_model_len=1000)

    def test_no_chunked_prefill_needs_budget_of_max_model_len(self):
        with pytest.raises(ValueError, match="max_num_batched_tokens"):
            create_engine(enable_chunked_prefill=False, max_num_batched_tokens=1024)

    def test_blocks_sized_from_profile(self):
        e = create_engine("L4")
        assert e.num_gpu_blocks == get_profile("L4").num_gpu_blocks(DEFAULT_MODEL, 16)

    def test_request_validation(self):
        e = create_engine(max_model_len=128)
        e.add_request(create_request("a"))
        with pytest.raises(ValueError, match="already"):
            e.add_request(create_request("a"))
        with pytest.raises(ValueError, match="max_model_len"):
            e.add_request(create_request("b", num_prompt_tokens=128))
        with pytest.raises(ValueError, match="max_tokens"):
            e.add_request(create_request("c", max_tokens=0))
        with pytest.raises(ValueError, match="prompt_token_ids"):
            e.add_request(create_request("d", prompt=[]))
        with pytest.raises(ValueError, match="prompt_token_ids"):
            e.add_request(create_request("e", prompt=[1, -5]))
        with pytest.raises(ValueError, match="prompt_token_ids"):
            e.add_request(create_request("f", prompt=[1, DEFAULT_MODEL.vocab_size]))


class TestBatching:
    def test_two_requests_share_one_step(self):
        e = create_engine()
        e.add_request(create_request("a", 100), now_s=0.0)
        e.add_request(create_request("b", 50, start=5000), now_s=0.0)
        r = e.step(0.0)
        assert [f.request_id for f in r.first_scheduled] == ["a", "b"]
        assert r.num_prefill_tokens == 150
        assert {o.request_id for o in r.outputs} == {"a", "b"}  # both first tokens at once
        r2 = e.step(r.end_s)
        assert r2.num_decode_seqs == 2 and r2.num_prefill_tokens == 0
        assert r2.duration_s < r.duration_s

    def test_token_budget_is_respected(self):
        e = create_engine(max_num_batched_tokens=100)
        e.add_request(create_request("a", 80))
        e.add_request(create_request("b", 80, start=5000))
        r = e.step(0.0)
        assert r.num_scheduled_tokens == 100
        assert [o.request_id for o in r.outputs] == ["a"]  # b got a 20-token chunk only
        r2 = e.step(r.end_s)
        # a decodes (1 token), b continues its prefill with the remaining 60.
        assert r2.num_decode_seqs == 1 and r2.num_prefill_tokens == 60
        assert {o.request_id for o in r2.outputs} == {"a", "b"}

    def test_chunked_prefill_of_a_long_prompt(self):
        e = create_engine(max_num_batched_tokens=256)
        e.add_request(create_request("long", 1000, max_tokens=3))
        chunks, t = [], 0.0
        while True:
            r = e.step(t)
            t = r.end_s
            chunks.append(r.num_prefill_tokens)
            if r.outputs:
                break
        assert chunks == [256, 256, 256, 232]
        assert len(e.step(t).outputs) == 1

    def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget(self):
        e = create_engine(
            enable_chunked_prefill=False, max_num_batched_tokens=2048, max_model_len=2048
        )
        e.add_request(create_request("a", 1500))
        e.add_request(create_request("b", 1000, start=9000))
        r = e.step(0.0)
        assert [f.request_id for f in r.first_scheduled] == ["a"]
        assert r.num_prefill_tokens == 1500
        r2 = e.step(r.end_s)
        assert [f.request_id for f in r2.first_scheduled] == ["b"]

    def test_decode_one_token_per_step_until_max_tokens(self):
        e = create_engine()
        e.add_request(create_request("a", 40, max_tokens=7))
        results, tokens, _ = run_to_completion(e)
        assert len(results) == 7
        assert all(len(r.outputs) == 1 and len(r.outputs[0].new_token_ids) == 1 for r in results)
        assert [r.outputs[0].finished for r in results] == [False] * 6 + [True]
        assert results[-1].outputs[0].finish_reason == "length"
        assert len(tokens["a"]) == 7
        m = results[-1].finished[0]
        assert m.num_output_tokens == 7 and m.num_prompt_tokens == 40
        assert m.ttft_s == pytest.approx(results[0].duration_s)
        assert m.e2e_time_s == pytest.approx(sum(r.duration_s for r in results))
        assert m.queue_time_s == 0.0

    def test_max_num_seqs_limits_running(self):
        e = create_engine(max_num_seqs=2)
        for i in range(3):
            e.add_request(create_request(f"r{i}", 20, start=100 * i))
        r = e.step(0.0)
        assert len(r.first_scheduled) == 2
        assert e.num_running == 2 and e.num_waiting == 1

    def test_queue_time_counts_waiting(self):
        e = create_engine(max_num_seqs=1)
        e.add_request(create_request("a", 20, max_tokens=3), now_s=0.0)
        e.add_request(create_request("b", 20, max_tokens=3, start=500), now_s=0.0)
        results, _, _ = run_to_completion(e)
        finished = {m.request_id: m for r in results for m in r.finished}
        assert finished["a"].queue_time_s == 0.0
        assert finished["b"].queue_time_s == pytest.approx(finished["a"].e2e_time_s)

    def test_outputs_are_deterministic_and_never_eos(self):
        toks = []
        for _ in range(2):
            e = create_engine(seed=7)
            e.add_request(create_request("same-id", 30, max_tokens=50))
            _, tokens, _ = run_to_completion(e)
            toks.append(tokens["same-id"])
        assert toks[0] == toks[1]
        assert all(3 <= t < 32000 for t in toks[0]) and 2 not in toks[0]
        e = create_engine(seed=8)
        e.add_request(create_request("same-id", 30, max_tokens=50))
        assert run_to_completion(e)[1]["same-id"] != toks[0]

    def test_generation_stops_at_max_model_len(self):
        e = create_engine(max_model_len=64)
        e.add_request(create_request("a", 60, max_tokens=100))
        results, tokens, _ = run_to_completion(e)
        assert len(tokens["a"]) == 4
        assert results[-1].outputs[0].finish_reason == "length"


class TestPrefixCaching:
    def test_second_request_with_shared_prefix_hits(self):
        e = create_engine()
        shared = list(range(1000, 1000 + 200))
        e.add_request(create_request("a", prompt=shared + [1, 2, 3], max_tokens=2))
        results_a, _, t = run_to_completion(e)
        e.add_request(create_request("b", prompt=shared + [7, 8, 9, 10], max_tokens=2), now_s=t)
        r = e.step(t)
        assert r.first_scheduled[0].num_cached_tokens == 192  # 12 full shared blocks of 16
        assert r.num_prefill_tokens == 204 - 192
        assert r.duration_s < results_a[0].duration_s
        stats = e.stats()
        assert stats.prefix_cache_hits_tokens == 192
        assert stats.prefix_cache_queries_tokens == 203 + 204
        run_to_completion(e, t)
        stats = e.stats()
        assert stats.prompt_tokens_local_cache_hit == 192
        assert stats.prompt_tokens_local_compute == 203 + 204 - 192
        assert stats.prompt_tokens_total == 407

    def test_identical_prompt_recomputes_its_last_block(self):
        e = create_engine()
        prompt = list(range(96))  # 6 full blocks
        e.add_request(create_request("a", prompt=prompt, max_tokens=1))
        _, _, t = run_to_completion(e)
        e.add_request(create_request("b", prompt=prompt, max_tokens=1))
        r = e.step(t)
        assert r.first_scheduled[0].num_cached_tokens == 80

    def test_eviction_makes_a_later_hit_miss(self):
        e = create_engine(num_gpu_blocks=20, max_model_len=320)
        prefix = list(range(5000, 5000 + 160))  # 10 blocks
        e.add_request(create_request("a", prompt=prefix + [1], max_tokens=1))
        results, _, t = run_to_completion(e)
        stored = [
            h
            for r in results
            for ev in r.kv_events
            if isinstance(ev, BlockStored)
            for h in ev.block_hashes
        ]
        assert stored[:10] == compute_block_hashes(prefix, 16)
        # Other traffic needs all 20 blocks: a's cached blocks get evicted.
        e.add_request(create_request("b", 310, max_tokens=1, start=20000), now_s=t)
        results, _, t = run_to_completion(e, t)
        removed = [
            h
            for r in results
            for ev in r.kv_events
            if isinstance(ev, BlockRemoved)
            for h in ev.block_hashes
        ]
        assert set(compute_block_hashes(prefix, 16)) <= set(removed)
        e.add_request(create_request("c", prompt=prefix + [2], max_tokens=1), now_s=t)
        r = e.step(t)
        assert r.first_scheduled[0].num_cached_tokens == 0

    def test_kv_event_hashes_chain(self):
        e = create_engine(max_num_batched_tokens=64)
        prompt = list(range(300, 300 + 150))
        e.add_request(create_request("a", prompt=prompt, max_tokens=40))
        results, tokens, _ = run_to_completion(e)
        events = [ev for r in results for ev in r.kv_events]
        assert events and all(isinstance(ev, BlockStored) for ev in events)
        seen: list[int] = []
        all_tokens: list[int] = []
        for ev in events:
            assert ev.parent_block_hash == (seen[-1] if seen else None)
            assert len(ev.token_ids) == 16 * len(ev.block_hashes)
            seen.extend(ev.block_hashes)
            all_tokens.extend(ev.token_ids)
        sequence = prompt + tokens["a"]
        # Output tokens fill blocks too; the last token's KV is never computed.
        assert len(seen) == (len(sequence) - 1) // 16
        assert all_tokens == sequence[: len(all_tokens)]
        assert seen == compute_block_hashes(sequence, 16)[: len(seen)]

    def test_disabled_prefix_caching_never_hits(self):
        e = create_engine(enable_prefix_caching=False)
        prompt = list(range(100))
        e.add_request(create_request("a", prompt=prompt, max_tokens=1))
        results, _, t = run_to_completion(e)
        assert all(not r.kv_events for r in results)
        e.add_request(create_request("b", prompt=prompt, max_tokens=1))
        assert e.step(t).first_scheduled[0].num_cached_tokens == 0


class TestPreemptionAndAbort:
    def test_newest_request_is_preempted_when_blocks_run_out(self):
        # 10 blocks = 160 tokens; two requests of 60 + 60 tokens cannot both finish in place.
        e = create_engine(num_gpu_blocks=10, max_model_len=160)
        e.add_request(create_request("old", 60, max_tokens=60, start=1000))
        e.add_request(create_request("new", 60, max_tokens=60, start=3000))
        results, tokens, _ = run_to_completion(e)
        preempted = [rid for r in results for rid in r.preempted]
        assert preempted and preempted[0] == "new"
        assert len(tokens["old"]) == 60 and len(tokens["new"]) == 60
        finished = {m.request_id: m for r in results for m in r.finished}
        assert finished["new"].num_preemptions >= 1
        assert finished["old"].num_preemptions == 0
        assert e.stats().num_preemptions_total == len(preempted)
        assert e.kv.usage == 0.0

    def test_preempted_request_resumes_with_same_tokens(self):
        reference = create_engine()
        reference.add_request(create_request("new", 60, max_tokens=60, start=3000))
        expected = run_to_completion(reference)[1]["new"]
        e = create_engine(num_gpu_blocks=10, max_model_len=160)
        e.add_request(create_request("old", 60, max_tokens=60, start=1000))
        e.add_request(create_request("new", 60, max_tokens=60, start=3000))
        assert run_to_completion(e)[1]["new"] == expected

    def test_abort_frees_blocks(self):
        e = create_engine(num_gpu_blocks=64, max_model_len=1024)
        e.add_request(create_request("a", 200, max_tokens=50))
        e.add_request(create_request("w", 20, max_tokens=5, start=9000))
        e.step(0.0)
        assert e.kv.usage > 0
        m = e.abort("a", now_s=1.0)
        assert m is not None and m.finish_reason == "abort" and m.finished_time_s == 1.0
        assert e.has_request("w") and not e.has_request("a")
        assert e.abort("a") is None
        assert e.abort("w").first_token_time_s is not None
        assert e.kv.usage == 0.0
        assert not e.has_work()
        assert e.stats().num_requests_aborted == 2

    def test_abort_of_waiting_request(self):
        e = create_engine(max_num_seqs=1)
        e.add_request(create_request("a", 20))
        e.add_request(create_request("b", 20, start=500))
        e.step(0.0)
        m = e.abort("b")
        assert m.first_scheduled_time_s is None and m.queue_time_s is None
        assert e.num_waiting == 0


def test_hundreds_of_concurrent_requests_with_long_prompts():
    rng = random.Random(0)
    e = create_engine()
    n = 300
    for i in range(n):
        length = 8192 if i % 30 == 0 else rng.randrange(200, 2000)
        prompt = [rng.randrange(32000) for _ in range(length)]
        e.add_request(EngineRequest(f"r{i}", prompt, max_tokens=rng.randrange(8, 64)), now_s=0.0)
    started = time.perf_counter()
    results, tokens, t = run_to_completion(e)
    wall_s = time.perf_counter() - started
    assert len(tokens) == n
    assert any(r.num_prefill_tokens and r.num_decode_seqs for r in results)  # mixed batches
    assert max(r.num_scheduled_tokens for r in results) <= 8192
    assert e.stats().num_requests_finished == n
    assert e.kv.usage == 0.0
    assert 5.0 < t < 120.0  # modelled seconds of H100 time for this load
    assert wall_s < 30.0  # generous: the model must stay cheap per step


def test_stats_report_queued_prefill_and_decode_work():
    e = create_engine(max_num_batched_tokens=100, max_num_seqs=1)
    e.add_request(create_request("a", 250, max_tokens=10))
    e.add_request(create_request("b", 40, max_tokens=5, start=9000))
    s = e.stats()
    assert (s.num_requests_waiting, s.num_requests_running) == (2, 0)
    assert (s.waiting_prefill_tokens, s.running_prefill_tokens) == (290, 0)
    assert s.remaining_decode_tokens == 15
    e.step(0.0)
    s = e.stats()
    assert (s.waiting_prefill_tokens, s.running_prefill_tokens) == (40, 150)
    assert s.kv_cache_usage > 0 and s.num_steps == 1 and s.busy_time_s > 0


class TestGpuSeconds:
    def test_step_time_is_split_by_tokens(self):
        e = create_engine(max_num_batched_tokens=100)
        e.add_request(create_request("a", 80, max_tokens=3))
        e.add_request(create_request("b", 80, max_tokens=2, start=5000))
        s1 = e.step(0.0)  # a: 80 prefill tokens, b: a 20-token chunk
        s2 = e.step(s1.end_s)  # a: 1 decode, b: the remaining 60
        s3 = e.step(s2.end_s)  # both decode; both finish
        assert (s1.num_prefill_tokens, s2.num_prefill_tokens, s2.num_decode_seqs) == (100, 60, 1)
        assert not e.has_work()
        got = {m.request_id: m.gpu_seconds for m in s3.finished}
        d1, d2, d3 = s1.duration_s, s2.duration_s, s3.duration_s
        assert got["a"] == pytest.approx(d1 * 80 / 100 + d2 * 1 / 61 + d3 / 2)
        assert got["b"] == pytest.approx(d1 * 20 / 100 + d2 * 60 / 61 + d3 / 2)
        assert sum(got.values()) == pytest.approx(d1 + d2 + d3)

    def test_sum_over_requests_is_busy_time_with_preemption_and_idle_steps(self):
        e = create_engine(num_gpu_blocks=10, max_model_len=160)
        e.add_request(create_request("old", 60, max_tokens=60, start=1000))
        e.add_request(create_request("new", 60, max_tokens=60, start=3000))
        results, _, t = run_to_completion(e)
        idle = e.step(t)  # no work: no duration, nothing attributed
        assert idle.duration_s == 0.0
        assert any(r.preempted for r in results)
        finished = [m for r in results for m in r.finished]
        busy = sum(r.duration_s for r in results if r.num_scheduled_tokens)
        assert {m.request_id for m in finished} == {"old", "new"}
        assert all(m.gpu_seconds > 0 for m in finished)
        assert sum(m.gpu_seconds for m in finished) == pytest.approx(busy)
        assert busy == pytest.approx(e.stats().busy_time_s)

    def test_aborted_request_keeps_its_share(self):
        e = create_engine()
        e.add_request(create_request("a", 64, max_tokens=10))
        s1 = e.step(0.0)
        m = e.abort("a", now_s=s1.end_s)
        assert m is not None and m.gpu_seconds == pytest.approx(s1.duration_s)
