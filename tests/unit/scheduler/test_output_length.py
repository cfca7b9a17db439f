"""The online output-length predictor on synthetic data with known answers: quantiles, the
sliding window under drift, the prediction rule (hint, learned quantile, class default, cap,
ignore_eos honesty, oracle), per-(model, class) separation and configuration errors."""

from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from slomesh.scheduler.output_length import DEFAULT_OUTPUT_LENGTH_WINDOW, OutputLengthPredictor
from slomesh.scheduler.policy import PolicyConfigError, make_policy
from slomesh.scheduler.predictor import PredictorConfig
from slomesh.scheduler.view import ClusterView
from tests.unit.scheduler.factories import MODEL, make_instance, make_request, make_state
from tests.unit.scheduler.test_policy import view_with

CHAT_DEFAULT = 256  # the built-in chat class's default_output_tokens


def shuffled(values, seed: int = 0) -> list[int]:
    out = list(values)
    random.Random(seed).shuffle(out)
    return out


def learned(values, window: int = DEFAULT_OUTPUT_LENGTH_WINDOW, slo_class: str = "chat"):
    predictor = OutputLengthPredictor(window)
    predictor.observe_many(MODEL, slo_class, values)
    return predictor


class TestQuantiles:
    def test_uniform_1_to_1000_has_the_order_statistics_as_quantiles(self):
        p = learned(shuffled(range(1, 1001)))
        assert p.count(MODEL, "chat") == 1000
        # Inverted empirical CDF: the ceil(q * n)-th smallest of n = 1000.
        assert p.quantile(MODEL, "chat", 0.5) == 500
        assert p.quantile(MODEL, "chat", 0.9) == 900
        assert p.quantile(MODEL, "chat", 0.999) == 999
        assert p.quantile(MODEL, "chat", 1.0) == 1000
        assert p.quantile(MODEL, "chat", 0.0001) == 1

    def test_a_sample_of_a_uniform_distribution_finds_its_median(self):
        rng = np.random.default_rng(7)
        sample = rng.integers(1, 1001, size=1000).tolist()
        p = learned(sample)
        median = p.quantile(MODEL, "chat", 0.5)
        assert median == sorted(sample)[499]
        # Population median 500.5; 4 binomial standard errors of the rank (4 x 1.6 %) span
        # about +-63 tokens of this distribution.
        assert abs(median - 500.5) < 63

    def test_float_rounding_does_not_move_the_rank(self):
        # 0.28 * 25 = 7.000000000000001 in binary floating point: still the 7th smallest.
        p = learned(range(1, 26))
        assert p.quantile(MODEL, "chat", 0.28) == 7
        assert p.quantile(MODEL, "chat", 0.56) == 14

    @given(
        st.lists(st.integers(1, 100_000), min_size=1, max_size=300),
        st.floats(0.001, 1.0),
    )
    def test_quantile_meets_the_inverted_cdf_definition(self, values, q):
        p = learned(values)
        r = p.quantile(MODEL, "chat", q)
        n = len(values)
        assert r in values
        # At least a fraction q of the window is <= r, and less than q is < r.
        assert sum(v <= r for v in values) >= q * n - 1e-6
        assert sum(v < r for v in values) < q * n + 1e-6

    def test_lookup_is_microseconds(self):
        p = learned(shuffled(range(1, 1001)))
        n = 20_000
        t0 = time.perf_counter()
        for _ in range(n):
            p.quantile(MODEL, "chat", 0.5, 20)
        per_call_us = (time.perf_counter() - t0) / n * 1e6
        assert per_call_us < 20  # about 0.3 us on an idle core; generous for a loaded one


class TestWindow:
    def test_keeps_the_last_window_observations(self):
        p = learned(range(1, 1501), window=1000)
        assert p.count(MODEL, "chat") == 1000
        assert p.samples(MODEL, "chat") == list(range(501, 1501))
        assert p.quantile(MODEL, "chat", 0.5) == 1000  # the 500th smallest of 501..1500

    def test_an_upward_shift_moves_the_median_after_half_a_window(self):
        window = 1000
        p = learned(shuffled(range(1, 1001)), window=window)
        new = shuffled(range(2001, 3001), seed=1)
        p.observe_many(MODEL, "chat", new[:500])
        # (1 - q) * window = 500 new lengths above all old ones: rank 500 is still old.
        assert p.quantile(MODEL, "chat", 0.5) <= 1000
        p.observe(MODEL, "chat", new[500])
        assert p.quantile(MODEL, "chat", 0.5) >= 2001
        p.observe_many(MODEL, "chat", new[501:])
        # A whole window later only the new distribution is left: its median exactly.
        assert p.samples(MODEL, "chat") == new
        assert p.quantile(MODEL, "chat", 0.5) == 2500

    def test_a_high_quantile_follows_an_upward_shift_sooner(self):
        p = learned(shuffled(range(1, 1001)), window=1000)
        p.observe_many(MODEL, "chat", [5000] * 100)
        assert p.quantile(MODEL, "chat", 0.9) <= 1000  # (1 - 0.9) * 1000 = 100 not enough
        p.observe(MODEL, "chat", 5000)
        assert p.quantile(MODEL, "chat", 0.9) == 5000

    def test_a_downward_shift_moves_the_median_after_q_times_the_window(self):
        p = learned(shuffled(range(1001, 2001)), window=1000)
        p.observe_many(MODEL, "chat", [7] * 499)
        assert p.quantile(MODEL, "chat", 0.5) >= 1001
        p.observe(MODEL, "chat", 7)  # ceil(0.5 * 1000) = 500 short ones: rank 500 is short
        assert p.quantile(MODEL, "chat", 0.5) == 7

    def test_min_samples(self):
        p = OutputLengthPredictor(window=5)
        assert p.quantile(MODEL, "chat", 0.5, min_samples=3) is None  # never observed
        p.observe_many(MODEL, "chat", [10, 20])
        assert p.quantile(MODEL, "chat", 0.5, min_samples=3) is None
        p.observe(MODEL, "chat", 30)
        assert p.quantile(MODEL, "chat", 0.5, min_samples=3) == 20
        # A full window always answers, even when min_samples exceeds it.
        assert p.quantile(MODEL, "chat", 0.5, min_samples=20) is None
        p.observe_many(MODEL, "chat", [40, 50])
        assert p.quantile(MODEL, "chat", 0.5, min_samples=20) == 30

    def test_models_and_classes_are_kept_apart(self):
        p = OutputLengthPredictor()
        p.observe_many(MODEL, "chat", [100] * 3)
        p.observe_many(MODEL, "coding", [900] * 3)
        p.observe_many("other-model", "chat", [40] * 3)
        assert p.quantile(MODEL, "chat", 0.5) == 100
        assert p.quantile(MODEL, "coding", 0.5) == 900
        assert p.quantile("other-model", "chat", 0.5) == 40
        assert p.quantile("other-model", "coding", 0.5) is None
        assert sorted(p.keys()) == [(MODEL, "chat"), (MODEL, "coding"), ("other-model", "chat")]

    def test_bad_arguments_are_rejected(self):
        p = OutputLengthPredictor()
        with pytest.raises(ValueError, match="output_tokens"):
            p.observe(MODEL, "chat", 0)
        assert p.count(MODEL, "chat") == 0
        for q in (0.0, 1.5, math.nan):
            with pytest.raises(ValueError, match="q: must be in"):
                p.quantile(MODEL, "chat", q)
        for window in (0, -3, 2.5, True):
            with pytest.raises(ValueError, match="window"):
                OutputLengthPredictor(window)


class TestPredict:
    config = PredictorConfig(output_length_min_samples=20)

    def test_class_default_until_min_samples_then_the_learned_median(self):
        p = OutputLengthPredictor()
        request = make_request(max_tokens=2000)
        p.observe_many(MODEL, "chat", [40, 60] * 9 + [50])  # 19 observations
        assert p.predict(request, self.config) == CHAT_DEFAULT
        p.observe(MODEL, "chat", 50)
        assert p.predict(request, self.config) == 50

    def test_the_configured_quantile_is_used(self):
        p = learned(shuffled(range(1, 1001)))
        request = make_request(max_tokens=5000)
        assert p.predict(request, PredictorConfig(output_length_quantile=0.9)) == 900
        assert p.predict(request, PredictorConfig(output_length_quantile=0.25)) == 250

    def test_the_hint_wins(self):
        p = learned([700] * 50)
        assert (
            p.predict(make_request(max_tokens=2000, expected_output_tokens=33), self.config) == 33
        )

    def test_capped_at_max_tokens(self):
        p = learned([700] * 50)
        assert p.predict(make_request(max_tokens=64), self.config) == 64
        assert p.predict(make_request(max_tokens=64, expected_output_tokens=300), self.config) == 64
        empty = OutputLengthPredictor()
        assert empty.predict(make_request(max_tokens=100), self.config) == 100  # class default

    def test_ignore_eos_never_reads_max_tokens(self):
        # max_tokens of an ignore_eos request is its true length: not even a cap.
        p = learned([700] * 50)
        assert p.predict(make_request(max_tokens=3, ignore_eos=True), self.config) == 700
        hinted = make_request(max_tokens=3, ignore_eos=True, expected_output_tokens=40)
        assert p.predict(hinted, self.config) == 40
        empty = OutputLengthPredictor()
        assert empty.predict(make_request(max_tokens=3, ignore_eos=True), self.config) == 256

    def test_the_oracle_reads_the_true_length(self):
        oracle = PredictorConfig(use_true_output_length=True)
        p = learned([700] * 50)
        true = make_request(max_tokens=900, ignore_eos=True, expected_output_tokens=40)
        assert p.predict(true, oracle) == 900
        # Without ignore_eos max_tokens is only a bound: the oracle knows nothing more.
        assert p.predict(make_request(max_tokens=900), oracle) == 700

    def test_the_class_of_the_request_is_used(self):
        p = learned([30] * 50, slo_class="coding")
        assert p.predict(make_request(max_tokens=2000, slo_class="coding"), self.config) == 30
        assert p.predict(make_request(max_tokens=2000), self.config) == CHAT_DEFAULT


class TestConfig:
    @pytest.mark.parametrize(
        ("field", "value", "error"),
        [
            ("output_length_quantile", 0.0, ValueError),
            ("output_length_quantile", 1.01, ValueError),
            ("output_length_quantile", math.nan, ValueError),
            ("output_length_quantile", "0.5", TypeError),
            ("output_length_quantile", True, TypeError),
            ("output_length_min_samples", 0, ValueError),
            ("output_length_min_samples", 2.5, TypeError),
            ("output_length_min_samples", True, TypeError),
        ],
    )
    def test_out_of_range_values_name_the_field(self, field, value, error):
        with pytest.raises(error, match=field):
            PredictorConfig(**{field: value})
        with pytest.raises(PolicyConfigError, match=field):
            make_policy({"name": "x", "predictor": {field: value}})

    def test_defaults_and_yaml_values(self):
        default = PredictorConfig()
        assert (default.output_length_quantile, default.output_length_min_samples) == (0.5, 20)
        policy = make_policy(
            {
                "name": "x",
                "predictor": {"output_length_quantile": 1, "output_length_min_samples": 5},
            }
        )
        assert policy.predictor_config.output_length_quantile == 1
        assert policy.predictor_config.output_length_min_samples == 5


class TestPolicies:
    def test_view_holds_one_shared_predictor(self):
        assert isinstance(ClusterView().output_lengths, OutputLengthPredictor)
        shared = OutputLengthPredictor(10)
        assert ClusterView(output_lengths=shared).output_lengths is shared

    def test_slomesh_places_with_the_learned_length_and_the_oracle_with_the_true_one(self):
        view = view_with([make_state("tokyo", [make_instance("t")])])
        view.output_lengths.observe_many(MODEL, "chat", shuffled(range(1, 101)))
        request = make_request(origin="tokyo", max_tokens=900, ignore_eos=True)
        honest = make_policy("slomesh").place(request, view).chosen.prediction
        assert honest.output_tokens == 50  # the learned median, not the class default
        oracle = make_policy("oracle").place(request, view).chosen.prediction
        assert oracle.output_tokens == 900
        p90 = make_policy({**_slomesh(), "predictor": {"output_length_quantile": 0.9}})
        assert p90.place(request, view).chosen.prediction.output_tokens == 90

    def test_queue_wait_baseline_uses_the_same_prediction(self):
        # qlm: the request adds prompt + N_out KV tokens. On "a" (16000-token KV cache, 12000
        # used or queued ahead) the short class default fits and waits nothing, a learned
        # 8000-token output must wait for 4100 / 12000 of its 4 s of decode work ahead; "b"
        # always waits 0.1 s of queued prefill.
        a = make_instance(
            "a", kv_cache_usage=0.5, queued_decode_tokens=4000, decode_tokens_per_s=1000.0
        )
        a.num_gpu_blocks = 1000
        b = make_instance("b", queued_prefill_tokens=1000, prefill_tokens_per_s=10_000.0)
        b.num_gpu_blocks = 1000
        view = view_with([make_state("washington-dc", [a, b])])
        request = make_request(max_tokens=10_000)
        assert make_policy("qlm").place(request, view).chosen.instance_id == "a"
        view.output_lengths.observe_many(MODEL, "chat", [8000] * 20)
        assert make_policy("qlm").place(request, view).chosen.instance_id == "b"


def _slomesh() -> dict:
    from slomesh.scheduler.policy import BUILTIN_PROFILES

    return dict(BUILTIN_PROFILES["slomesh"])
