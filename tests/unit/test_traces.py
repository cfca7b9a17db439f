"""Tests of trace loading: formats, deterministic token ids, prefix sharing, origins."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest

from slomesh.topology import shared_data_dir
from slomesh.traces import (
    MOONCAKE_BLOCK_TOKENS,
    TOKEN_ID_HIGH,
    TOKEN_ID_LOW,
    assign_origin_region,
    default_slo_class,
    detect_format,
    load_trace,
    spread_binned,
)

REGIONS = ["washington-dc", "frankfurt", "tokyo"]


@pytest.fixture
def azure_file(tmp_path: Path) -> Path:
    path = tmp_path / "azure_small.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.5000000,100,10\n"
        "2023-11-16 18:15:47.0000000,300,0\n"
        "2023-11-16 18:15:49.2500000,50,5\n"
    )
    return path


@pytest.fixture
def mooncake_file(tmp_path: Path) -> Path:
    path = tmp_path / "mc_small.jsonl"
    rows = [
        {"timestamp": 1000, "input_length": 1200, "output_length": 7, "hash_ids": [0, 1, 2]},
        {"timestamp": 1500, "input_length": 1100, "output_length": 3, "hash_ids": [0, 1, 9]},
        {"timestamp": 4000, "input_length": 300, "output_length": 4, "hash_ids": [5]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


class TestAzure:
    def test_arrivals_lengths_and_class(self, azure_file: Path) -> None:
        trace = load_trace(azure_file, regions=REGIONS)
        assert trace.format == "azure"
        assert [r.arrival_s for r in trace] == pytest.approx([0.0, 0.5, 2.75])
        assert [r.prompt_tokens for r in trace] == [100, 300, 50]
        # An output length of 0 becomes 1: every replayed request generates a token.
        assert [r.output_tokens for r in trace] == [10, 1, 5]
        assert all(r.slo_class == "chat" for r in trace)
        assert [r.request_id for r in trace] == [f"azure_small-{i}" for i in range(3)]

    def test_token_ids_deterministic_unique_and_in_range(self, azure_file: Path) -> None:
        a = load_trace(azure_file, regions=REGIONS)
        b = load_trace(azure_file, regions=REGIONS)
        for ra, rb in zip(a, b, strict=True):
            ids = ra.prompt_token_ids
            assert ids.dtype == np.uint32
            assert ids.shape == (ra.prompt_tokens,)
            assert ids.min() >= TOKEN_ID_LOW and ids.max() < TOKEN_ID_HIGH
            np.testing.assert_array_equal(ids, rb.prompt_token_ids)
        # No shared prefix between Azure requests by default.
        assert a.requests[0].prompt_token_ids[:8].tolist() != a.requests[1].prompt_token_ids[:8].tolist()

    def test_optional_system_prompt_is_shared(self, azure_file: Path) -> None:
        trace = load_trace(azure_file, regions=REGIONS, system_prompt_tokens=64)
        r0, r1, r2 = trace.requests
        np.testing.assert_array_equal(r0.prompt_token_ids[:64], r1.prompt_token_ids[:64])
        # A prompt shorter than the system prompt is the system prompt's head; lengths stay.
        np.testing.assert_array_equal(r2.prompt_token_ids, r0.prompt_token_ids[:50])
        assert len(r1.prompt_token_ids) == 300
        assert r0.prompt_token_ids[64:70].tolist() != r1.prompt_token_ids[64:70].tolist()

    def test_limit_and_rate_scale(self, azure_file: Path) -> None:
        trace = load_trace(azure_file, regions=REGIONS, limit=2, rate_scale=4.0)
        assert len(trace) == 2
        assert [r.arrival_s for r in trace] == pytest.approx([0.0, 0.125])
        assert trace.duration_s == pytest.approx(0.125)

    def test_slo_class_override_and_code_default(self, azure_file: Path, tmp_path: Path) -> None:
        assert load_trace(azure_file, regions=REGIONS, slo_class="batch").requests[0].slo_class == "batch"
        code = tmp_path / "AzureLLMInferenceTrace_code.csv"
        code.write_text(azure_file.read_text())
        assert default_slo_class(code) == "coding"
        assert load_trace(code, regions=REGIONS).requests[0].slo_class == "coding"

    def test_bad_row_names_line(self, tmp_path: Path) -> None:
        bad = tmp_path / "bad.csv"
        bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,abc,3\n")
        with pytest.raises(ValueError, match=r"bad\.csv:2"):
            load_trace(bad, regions=REGIONS)


class TestMooncake:
    def test_arrivals_and_lengths(self, mooncake_file: Path) -> None:
        trace = load_trace(mooncake_file, regions=REGIONS)
        assert trace.format == "mooncake"
        assert [r.arrival_s for r in trace] == pytest.approx([0.0, 0.5, 3.0])
        assert [r.prompt_tokens for r in trace] == [1200, 1100, 300]
        assert [len(r.prompt_token_ids) for r in trace] == [1200, 1100, 300]

    def test_shared_hash_ids_share_token_ids(self, mooncake_file: Path) -> None:
        r0, r1, r2 = load_trace(mooncake_file, regions=REGIONS).requests
        shared = 2 * MOONCAKE_BLOCK_TOKENS  # hash ids 0 and 1 are common
        np.testing.assert_array_equal(r0.prompt_token_ids[:shared], r1.prompt_token_ids[:shared])
        # Block 2 vs block 9 differ.
        assert r0.prompt_token_ids[shared : shared + 16].tolist() != r1.prompt_token_ids[shared : shared + 16].tolist()
        assert r2.prompt_token_ids[:16].tolist() != r0.prompt_token_ids[:16].tolist()

    def test_same_hash_id_same_tokens_across_loads(self, mooncake_file: Path) -> None:
        a = load_trace(mooncake_file, regions=REGIONS).requests[2].prompt_token_ids
        b = load_trace(mooncake_file, regions=REGIONS).requests[2].prompt_token_ids
        np.testing.assert_array_equal(a, b)
        assert a.min() >= TOKEN_ID_LOW and a.max() < TOKEN_ID_HIGH

    def test_release_tokens_rebuilds_identically(self, mooncake_file: Path) -> None:
        req = load_trace(mooncake_file, regions=REGIONS).requests[0]
        first = req.prompt_token_ids.copy()
        req.release_tokens()
        np.testing.assert_array_equal(req.prompt_token_ids, first)

    def test_input_longer_than_blocks_rejected(self, tmp_path: Path) -> None:
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps({"timestamp": 0, "input_length": 600, "output_length": 1,
                                    "hash_ids": [1]}) + "\n")
        with pytest.raises(ValueError, match="exceeds"):
            load_trace(path, regions=REGIONS)

    def test_real_trace_prefix_sharing(self) -> None:
        path = shared_data_dir() / "traces" / "mooncake_conversation_part1.jsonl"
        trace = load_trace(path, limit=50, regions=REGIONS)
        by_first: dict[int, list] = collections.defaultdict(list)
        for r in trace:
            by_first[r.hash_ids[0]].append(r)
        group = max(by_first.values(), key=len)
        assert len(group) >= 2
        a, b = group[0], group[1]
        common = 0
        while common < min(len(a.hash_ids), len(b.hash_ids)) and a.hash_ids[common] == b.hash_ids[common]:
            common += 1
        n = min(common * MOONCAKE_BLOCK_TOKENS, a.prompt_tokens, b.prompt_tokens)
        np.testing.assert_array_equal(a.prompt_token_ids[:n], b.prompt_token_ids[:n])


class TestBinnedArrivals:
    def test_bins_are_spread_evenly_in_file_order(self) -> None:
        # Bins of width 3: three requests at 0, two at 3, one at 6.
        assert spread_binned([0.0, 0.0, 0.0, 3.0, 3.0, 6.0]) == pytest.approx(
            [0.0, 1.0, 2.0, 3.0, 4.5, 6.0]
        )

    def test_distinct_timestamps_are_left_alone(self) -> None:
        times = [0.0, 0.0, 0.04, 0.277, 0.471]  # Mooncake's synthetic trace: few repeats
        assert spread_binned(times) == times

    def test_real_conversation_trace_is_spread_and_burst_bins_keep_it(self) -> None:
        path = shared_data_dir() / "traces" / "mooncake_conversation_part1.jsonl"
        spread = [r.arrival_s for r in load_trace(path, limit=200, regions=REGIONS)]
        bursts = [r.arrival_s for r in load_trace(path, limit=200, regions=REGIONS,
                                                  spread_binned_arrivals=False)]
        assert len(set(bursts)) < 40  # ~10 requests to a 3 s bin
        assert len(set(spread)) == 200
        # Each request stays inside its own bin.
        assert all(b <= s < b + 3.0 for s, b in zip(sorted(spread), sorted(bursts), strict=True))


class TestFormatAndOrigins:
    def test_detect_by_extension_and_content(self, azure_file: Path, mooncake_file: Path,
                                             tmp_path: Path) -> None:
        assert detect_format(azure_file) == "azure"
        assert detect_format(mooncake_file) == "mooncake"
        noext = tmp_path / "trace_noext"
        noext.write_text(mooncake_file.read_text())
        assert detect_format(noext) == "mooncake"
        noext2 = tmp_path / "trace_noext2"
        noext2.write_text(azure_file.read_text())
        assert detect_format(noext2) == "azure"
        junk = tmp_path / "junk"
        junk.write_text("hello\n")
        with pytest.raises(ValueError, match="format"):
            detect_format(junk)

    def test_origin_assignment_deterministic_and_balanced(self) -> None:
        shares = [1.0, 1.0, 1.0]
        first = [assign_origin_region(i, REGIONS, shares) for i in range(3000)]
        again = [assign_origin_region(i, REGIONS, shares) for i in range(3000)]
        assert first == again
        counts = collections.Counter(first)
        assert set(counts) == set(REGIONS)
        assert all(800 < c < 1200 for c in counts.values())

    def test_origin_shares_weighting(self, azure_file: Path) -> None:
        only = [assign_origin_region(i, REGIONS, [0.0, 1.0, 0.0]) for i in range(200)]
        assert set(only) == {"frankfurt"}
        skew = collections.Counter(assign_origin_region(i, REGIONS, [3, 1, 0]) for i in range(4000))
        assert counts_ratio(skew["washington-dc"], skew["frankfurt"]) == pytest.approx(3.0, rel=0.2)
        assert skew["tokyo"] == 0
        trace = load_trace(azure_file, regions=REGIONS, region_shares={"tokyo": 1.0})
        assert {r.origin_region for r in trace} == {"tokyo"}
        with pytest.raises(ValueError, match="unknown regions"):
            load_trace(azure_file, regions=REGIONS, region_shares={"mars": 1.0})

    def test_limit_does_not_change_origins(self) -> None:
        path = shared_data_dir() / "traces" / "azure_llm_2023_conv.csv"
        full = load_trace(path, limit=300, regions=REGIONS)
        part = load_trace(path, limit=100, regions=REGIONS)
        assert [r.origin_region for r in part] == [r.origin_region for r in full.requests[:100]]
        assert len({r.origin_region for r in part}) == 3

    def test_default_regions_come_from_default_topology(self, azure_file: Path) -> None:
        trace = load_trace(azure_file)
        assert {r.origin_region for r in trace} <= set(REGIONS)

    def test_bad_arguments(self, azure_file: Path) -> None:
        with pytest.raises(ValueError, match="rate_scale"):
            load_trace(azure_file, rate_scale=0, regions=REGIONS)
        with pytest.raises(ValueError, match="limit"):
            load_trace(azure_file, limit=-1, regions=REGIONS)


def counts_ratio(a: int, b: int) -> float:
    return a / b
