"""Model switches (issue 4, item 5): the load time M_q, which instances may switch, and
placement choosing a switch, a remote region or a refusal."""

from __future__ import annotations

import dataclasses

import pytest

from slomesh.engine.profiles import (
    MODELS,
    PROFILES,
    model_load_time_s,
    switched_max_model_len,
)
from slomesh.scheduler.model_load import is_idle, plan_model_switch, remaining_load_ms
from slomesh.scheduler.policy import make_policy
from slomesh.scheduler.validation import validate_for_view
from slomesh.scheduler.view import ClusterView
from slomesh.topology import DEFAULT_TOPOLOGY_PATH, Topology
from slomesh.v1 import scheduler_pb2, state_pb2
from tests.unit.scheduler.factories import SLO, make_instance, make_state, prompt

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
QWEN = "Qwen/Qwen2.5-7B-Instruct"
QWEN_BYTES = int(7.61e9 * 2)  # num_params x bf16
T0 = 1_700_000_000 * 10**9
H100_USD_PER_HOUR = 4.0


class TestLoadTime:
    def test_known_answers(self):
        # 15.22 GB at 2 GB/s from the local cache plus a 20 s start: 27.61 s.
        assert model_load_time_s(15_220_000_000, load_gb_per_s=2.0, overhead_s=20.0) == (
            pytest.approx(27.61)
        )
        # The same weights from the remote store at 0.5 GB/s: 50.44 s.
        assert model_load_time_s(15_220_000_000, load_gb_per_s=0.5, overhead_s=20.0) == (
            pytest.approx(50.44)
        )
        assert model_load_time_s(0, load_gb_per_s=1.0, overhead_s=3.0) == 3.0

    @pytest.mark.parametrize(
        "kw, field",
        [
            ({"weights_bytes": -1, "load_gb_per_s": 1.0, "overhead_s": 0.0}, "weights_bytes"),
            ({"weights_bytes": 1, "load_gb_per_s": 0.0, "overhead_s": 0.0}, "load_gb_per_s"),
            ({"weights_bytes": 1, "load_gb_per_s": 1.0, "overhead_s": -1.0}, "overhead_s"),
        ],
    )
    def test_bad_input_names_the_field(self, kw, field):
        weights = kw.pop("weights_bytes")
        with pytest.raises(ValueError, match=field):
            model_load_time_s(weights, **kw)

    def test_switched_context_is_capped_by_the_kv_cache(self):
        a10g, llama = PROFILES["A10G"], MODELS[LLAMA]
        capacity = a10g.num_gpu_blocks(llama, 16) * 16
        assert capacity < 131072
        assert switched_max_model_len(a10g, llama, 131072) == capacity
        assert switched_max_model_len(PROFILES["H100"], MODELS[QWEN], 32768) == 32768
        assert switched_max_model_len(None, None, 4096) == 4096  # unknown GPU or model


def _view_instance(**kw):
    """One instance as the view shows it: an idle swappable H100 serving Llama."""
    view = ClusterView(None, clock_ns=lambda: T0)
    view.apply_state(
        _state("washington-dc", [_instance("w-1", swappable=True)], cache=[QWEN]),
        received_unix_ns=T0,
    )
    (inst,) = view.instances()
    return dataclasses.replace(inst, **kw)


class TestPlanModelSwitch:
    def test_from_cache_and_from_remote(self):
        inst = _view_instance()
        assert is_idle(inst)
        plan = plan_model_switch(inst, QWEN, QWEN_BYTES, 32768)
        assert plan is not None and plan.from_cache
        assert plan.load_ms == pytest.approx((20.0 + QWEN_BYTES / 2e9) * 1000)
        assert (plan.model, plan.from_model) == (QWEN, LLAMA)
        switched = plan.instance
        assert switched.model == QWEN and switched.kv_cache_usage == 0.0
        assert switched.num_gpu_blocks == 0 and switched.max_model_len == 32768
        remote = plan_model_switch(
            dataclasses.replace(inst, weight_cache_models=frozenset()), QWEN, QWEN_BYTES, 32768
        )
        assert remote is not None and not remote.from_cache
        assert remote.load_ms == pytest.approx((20.0 + QWEN_BYTES / 0.5e9) * 1000)

    @pytest.mark.parametrize(
        "change",
        [
            {"swappable": False},
            {"num_requests_running": 1},
            {"num_requests_outstanding": 1},
            {"queued_prefill_tokens": 10},
            {"pending_placements": 1},
            {"model_load_remaining_s": 3.0},
            {"remote_weights_gb_per_s": 0.0, "weight_cache_models": frozenset()},
        ],
    )
    def test_no_switch_for_busy_or_unswappable_instances(self, change):
        assert plan_model_switch(_view_instance(**change), QWEN, QWEN_BYTES, 32768) is None

    def test_no_switch_without_a_size_or_to_the_same_model(self):
        inst = _view_instance()
        assert plan_model_switch(inst, QWEN, None, 32768) is None
        assert plan_model_switch(inst, LLAMA, QWEN_BYTES, 32768) is None

    def test_remaining_load(self):
        inst = _view_instance(model_load_remaining_s=10.0, state_age_ms=200.0)
        assert remaining_load_ms(inst, rtt_ms=100.0) == pytest.approx(10_000 - 200 - 50)
        assert remaining_load_ms(_view_instance(), rtt_ms=100.0) == 0.0
        late = _view_instance(model_load_remaining_s=0.1, state_age_ms=500.0)
        assert remaining_load_ms(late, rtt_ms=0.0) == 0.0


# -- placement ------------------------------------------------------------------------------


def _instance(instance_id: str, model: str = LLAMA, *, swappable: bool = False, **kw):
    inst = make_instance(instance_id, model=model, price_usd_per_hour=H100_USD_PER_HOUR, **kw)
    inst.swappable = swappable
    inst.model_load_overhead_s = 20.0
    return inst


def _state(region, instances, *, cache=(), seq=1):
    state = make_state(region, instances, seq=seq)
    state.weight_cache_models.extend([LLAMA, *cache])
    state.weight_cache_gb_per_s = 2.0
    state.remote_weights_gb_per_s = 0.5
    return state


def _restamped(state, seq, timestamp_unix_ns):
    copy = state_pb2.RegionState()
    copy.CopyFrom(state)
    copy.seq, copy.timestamp_unix_ns = seq, timestamp_unix_ns
    return copy


def _topology() -> Topology:
    return Topology.load(DEFAULT_TOPOLOGY_PATH.parent / "topology.multimodel.yaml")


def _mesh(*, fra_queued_prefill: int = 0, fra: bool = True, cache=(QWEN,), x0_healthy=True):
    """Washington DC: w-0 (Llama) and w-1 (Llama, swappable, idle); Frankfurt: f-0 (Qwen,
    L40S) with the given prefill queue."""
    view = ClusterView(_topology(), clock_ns=lambda: T0)
    view.apply_state(
        _state(
            "washington-dc",
            [_instance("w-0", healthy=x0_healthy), _instance("w-1", swappable=True)],
            cache=cache,
        ),
        received_unix_ns=T0,
    )
    if fra:
        view.apply_state(
            _state(
                "frankfurt",
                [
                    _instance(
                        "f-0",
                        QWEN,
                        gpu_type="L40S",
                        running=1,
                        queued_prefill_tokens=fra_queued_prefill,
                    )
                ],
            ),
            received_unix_ns=T0,
        )
    return view


def _request(view, model=QWEN, slo_class="batch", request_id="q-1", **kw):
    msg = scheduler_pb2.GenerateRequest(
        request_id=request_id,
        model=model,
        prompt_token_ids=prompt(1000),
        max_tokens=64,
        slo_class=slo_class,
        origin_region="washington-dc",
        **kw,
    )
    return validate_for_view(msg, view, SLO, None)


def _by_id(decision):
    return {c.instance_id: c for c in decision.candidates}


class TestPlacement:
    def test_a_model_no_instance_serves_is_still_known(self):
        view = _mesh(fra=False)
        assert QWEN in view.known_models()
        assert _request(view).model == QWEN

    def test_goes_to_the_remote_region_serving_the_model_when_it_meets_the_slo(self):
        view = _mesh()
        decision = make_policy("slomesh").place(_request(view, slo_class="chat"), view)
        assert decision.outcome == "placed"
        assert decision.chosen.instance_id == "f-0"  # cross-region, no load
        assert decision.chosen.model_load is None
        assert not decision.to_placement("x:1").loads_model
        cands = _by_id(decision)
        # The switch was considered: a chat TTFT target cannot wait ~28 s for it.
        assert cands["w-1"].model_load is not None and not cands["w-1"].feasible
        assert cands["w-1"].audit()["loads_model"] == QWEN
        assert cands["w-0"].rejected_by == "serves-model"  # busy-free but not swappable

    def test_loads_the_model_when_the_remote_region_is_saturated(self):
        view = _mesh(fra_queued_prefill=3_000_000)
        decision = make_policy("slomesh").place(_request(view), view)
        assert decision.outcome == "placed"
        chosen = decision.chosen
        assert chosen.instance_id == "w-1" and chosen.model_load is not None
        load_ms = (20.0 + QWEN_BYTES / 2e9) * 1000  # from the local weight cache
        p = chosen.prediction
        assert p.model_load_ms == pytest.approx(load_ms)
        assert p.ttft_ms == pytest.approx(p.rtt_ms + load_ms + p.queue_wait_ms + p.prefill_ms)
        assert p.queue_wait_ms == 0.0 and p.cached_prefix_tokens == 0
        # The GPU seconds of the load count in the cost.
        assert p.gpu_seconds > load_ms / 1000
        assert p.cost_usd == pytest.approx(p.gpu_seconds * H100_USD_PER_HOUR / 3600)
        placement = decision.to_placement("x:1")
        assert placement.loads_model
        assert placement.predicted.model_load_ms == pytest.approx(load_ms)
        assert not _by_id(decision)["f-0"].feasible

    def test_a_load_from_the_remote_store_takes_weights_over_its_bandwidth(self):
        near = _mesh(fra_queued_prefill=3_000_000)
        cached = make_policy("slomesh").place(_request(near), near)
        far = _mesh(fra_queued_prefill=3_000_000, cache=())
        remote = make_policy("slomesh").place(_request(far), far)
        c, r = _by_id(cached)["w-1"].prediction, _by_id(remote)["w-1"].prediction
        assert r.model_load_ms - c.model_load_ms == pytest.approx(
            QWEN_BYTES / 0.5e6 - QWEN_BYTES / 2e6
        )
        assert r.cost_usd > c.cost_usd

    def test_refuses_when_neither_the_remote_region_nor_a_switch_meets_the_slo(self):
        view = _mesh(fra_queued_prefill=3_000_000)
        decision = make_policy("slomesh").place(_request(view, slo_class="chat"), view)
        assert decision.outcome == "refused"
        assert _by_id(decision)["w-1"].model_load is not None

    def test_never_switches_the_last_server_of_a_model(self):
        # w-0 is down: w-1 is the only Llama server left, so it may not switch to Qwen.
        view = _mesh(fra=False, x0_healthy=False)
        decision = make_policy("slomesh").place(_request(view), view)
        assert decision.outcome == "unavailable"
        assert _by_id(decision)["w-1"].rejected_by == "serves-model"

    def test_baselines_never_switch(self):
        view = _mesh(fra=False)
        for name in ("least-load", "round-robin", "llm-d"):
            decision = make_policy(name).place(_request(view), view)
            assert decision.outcome == "unavailable", name
        decision = make_policy("slomesh").place(_request(view), view)
        assert decision.chosen.instance_id == "w-1" and decision.chosen.model_load is not None

    def test_a_placed_switch_shows_in_the_view_until_the_state_does(self):
        view = _mesh(fra=False)
        policy = make_policy("slomesh")
        first = policy.place(_request(view), view)
        first.record_in(view)
        w1 = next(i for i in view.instances() if i.instance_id == "w-1")
        load_s = 20.0 + QWEN_BYTES / 2e9
        assert w1.model == QWEN and w1.model_load_remaining_s == pytest.approx(load_s)
        # The next Qwen request joins the load under way: the rest of it, no GPU charge.
        second = policy.place(_request(view, request_id="q-2"), view)
        chosen = second.chosen
        assert chosen.instance_id == "w-1" and chosen.model_load is None
        assert chosen.prediction.model_load_ms == pytest.approx(load_s * 1000)
        assert chosen.prediction.gpu_seconds < load_s
        # A Llama request may no longer go to w-1.
        llama = policy.place(_request(view, model=LLAMA, slo_class="chat", request_id="l"), view)
        assert _by_id(llama)["w-1"].rejected_by == "serves-model"

    def test_an_instance_loading_the_model_adds_what_is_left(self):
        view = _mesh(fra=False)
        loading = _instance("w-1", QWEN, swappable=True)
        loading.model_load_remaining_s = 5.0
        view.apply_state(
            _state("washington-dc", [_instance("w-0"), loading], cache=[QWEN], seq=2),
            received_unix_ns=T0,
        )
        decision = make_policy("slomesh").place(_request(view), view)
        assert decision.chosen.instance_id == "w-1"
        assert decision.chosen.prediction.model_load_ms == pytest.approx(5000.0)
        assert not decision.to_placement("x:1").loads_model

    def test_tokens_streamed_end_the_load_before_the_state_shows_it(self):
        """A state published during the load still counts time left; the first token of the
        model from the instance ends it until a state stamped after that token comes."""
        view = _mesh(fra=False)
        loading = _instance("w-1", QWEN, swappable=True)
        loading.model_load_remaining_s = 5.0
        during = _state("washington-dc", [_instance("w-0"), loading], cache=[QWEN], seq=2)
        during.timestamp_unix_ns = T0
        view.apply_state(during, received_unix_ns=T0)

        def w1():
            return next(i for i in view.instances() if i.instance_id == "w-1")

        view.note_serving("washington-dc", "w-1", LLAMA, T0 + 1)  # another model: no effect
        assert w1().model_load_remaining_s == 5.0
        view.note_serving("washington-dc", "w-1", QWEN, T0 + 10)
        assert w1().model_load_remaining_s == 0.0
        decision = make_policy("slomesh").place(_request(view), view)
        assert decision.chosen.instance_id == "w-1"
        assert decision.chosen.prediction.model_load_ms == 0.0
        # A state stamped before the token does not bring the load back ...
        view.apply_state(_restamped(during, 3, T0 + 5), received_unix_ns=T0 + 5)
        assert w1().model_load_remaining_s == 0.0
        # ... one stamped after it is the instance's word again.
        view.apply_state(_restamped(during, 4, T0 + 20), received_unix_ns=T0 + 20)
        assert w1().model_load_remaining_s == 5.0
        view.note_serving("nowhere", "x", QWEN)  # unknown region: ignored

    def test_region_state_fields_reach_the_view(self):
        view = _mesh()
        w1 = next(i for i in view.instances() if i.instance_id == "w-1")
        assert w1.swappable and w1.model_load_overhead_s == 20.0
        assert w1.weight_cache_models == {LLAMA, QWEN}
        assert (w1.weight_cache_gb_per_s, w1.remote_weights_gb_per_s) == (2.0, 0.5)
        assert isinstance(view.region_state("washington-dc"), state_pb2.RegionState)
        assert view.model_weights_bytes(QWEN) == QWEN_BYTES
        assert view.model_weights_bytes("org/unknown") is None
