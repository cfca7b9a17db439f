"""Tests of slomesh.kv.index.PrefixIndex."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slomesh.kv.hashing import compute_block_keys
from slomesh.kv.index import PrefixIndex
from slomesh.v1 import state_pb2


def delta(iid, stored=(), removed=(), cleared=False, block_size=16):
    return state_pb2.InstanceBlockDelta(
        instance_id=iid,
        stored_keys=list(stored),
        removed_keys=list(removed),
        cleared=cleared,
        block_size=block_size,
    )


def prompt(n, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(32000) for _ in range(n)]


def test_match_per_instance_longest_leading_run():
    p = prompt(100)
    keys = compute_block_keys(p, 16)  # 6 blocks
    idx = PrefixIndex()
    idx.apply_delta(delta("a", keys[:3]))
    idx.apply_delta(delta("b", keys))
    idx.apply_delta(delta("c", keys[1:]))  # lacks the first block: no leading run
    idx.apply_delta(delta("d", keys[:2] + keys[3:]))  # hole at block 2
    assert idx.match(p) == {"a": 48, "b": 96, "c": 0, "d": 32}
    assert idx.match(p, ["a", "zzz"]) == {"a": 48, "zzz": 0}
    assert idx.match(p, "b") == {"b": 96}
    assert idx.match(p[:40]) == {"a": 32, "b": 32, "c": 0, "d": 32}


def test_multiple_block_sizes_are_keyed_separately():
    p = prompt(300, seed=1)
    idx = PrefixIndex()
    idx.apply_delta(delta("gpu", compute_block_keys(p, 16), block_size=16))
    idx.apply_delta(delta("cpu", compute_block_keys(p[:256], 128), block_size=128))
    idx.apply_delta(delta("wrong", compute_block_keys(p, 16), block_size=128))
    assert idx.match(p) == {"gpu": 288, "cpu": 256, "wrong": 0}


def test_deltas_remove_and_clear():
    p = prompt(64, seed=2)
    keys = compute_block_keys(p, 16)
    idx = PrefixIndex()
    idx.apply_delta(delta("a", keys))
    idx.apply_delta(delta("a", removed=[keys[2]]))
    assert idx.match(p)["a"] == 32
    assert idx.num_blocks("a") == 3
    idx.apply_delta(delta("a", cleared=True, stored=[keys[0]]))
    assert idx.match(p)["a"] == 16
    assert idx.num_blocks("a") == 1


def test_replace_and_remove_instance():
    p = prompt(64, seed=3)
    keys = compute_block_keys(p, 16)
    idx = PrefixIndex()
    idx.apply_delta(delta("a", [123]))
    idx.replace_instance("a", keys, 16)
    assert idx.match(p) == {"a": 64}
    idx.remove_instance("a")
    assert idx.match(p) == {}
    assert "a" not in idx
    idx.remove_instance("a")
    with pytest.raises(ValueError, match="block_size"):
        idx.replace_instance("a", keys, 0)


def test_block_size_change_drops_old_keys():
    p = prompt(64, seed=4)
    idx = PrefixIndex()
    idx.apply_delta(delta("a", compute_block_keys(p, 16), block_size=16))
    idx.apply_delta(delta("a", compute_block_keys(p, 32), block_size=32))
    assert idx.block_size("a") == 32
    assert idx.num_blocks("a") == 2
    assert idx.match(p) == {"a": 64}


def test_empty_and_short_prompts_match_nothing():
    idx = PrefixIndex()
    idx.apply_delta(delta("a", [1, 2, 3]))
    assert idx.match([]) == {"a": 0}
    assert idx.match([1] * 15) == {"a": 0}


def test_long_prompts_cross_hashing_chunks():
    p = prompt(8192, seed=5)
    keys = compute_block_keys(p, 16)
    idx = PrefixIndex()
    for cut in (0, 1, 15, 16, 17, 100, 511, 512):
        idx.replace_instance(f"i{cut}", keys[:cut], 16)
    got = idx.match(np.array(p))
    assert got == {f"i{cut}": 16 * cut for cut in (0, 1, 15, 16, 17, 100, 511, 512)}


def test_match_rejects_swapped_arguments():
    idx = PrefixIndex()
    idx.apply_delta(delta("a", [1]))
    with pytest.raises(TypeError, match="token_ids"):
        idx.match(None, [1, 2])
    with pytest.raises(TypeError, match="token_ids"):
        idx.match(["a"] * 16)


def test_snapshot_deltas_round_trip():
    idx = PrefixIndex()
    idx.apply_delta(delta("a", [1, 2, 3], block_size=16))
    idx.apply_delta(delta("b", [9], block_size=128))
    copy = PrefixIndex()
    copy.apply_delta(delta("a", [77]))
    for d in idx.to_deltas():
        copy.apply_delta(d)
    assert copy.keys("a") == {1, 2, 3}
    assert copy.keys("b") == {9}
    assert copy.block_size("b") == 128


def test_match_accepts_protobuf_repeated_field():
    from slomesh.v1 import region_agent_pb2

    p = prompt(200, seed=6)
    idx = PrefixIndex()
    idx.replace_instance("a", compute_block_keys(p, 16)[:5], 16)
    req = region_agent_pb2.AgentGenerateRequest(prompt_token_ids=p)
    assert idx.match(req.prompt_token_ids) == {"a": 80}


def reference_match(tokens, instances):
    """Straightforward lookup: every key of the prompt, then each instance's leading run."""
    out = {}
    for iid, (block_size, held) in instances.items():
        run = 0
        for key in compute_block_keys(tokens, block_size):
            if key not in held:
                break
            run += 1
        out[iid] = run * block_size
    return out


@st.composite
def indexes(draw):
    """A prompt of up to ~1100 blocks of 16 and instances holding prefixes of it (some with
    holes or stray keys), of other prompts, or of nothing, in block sizes 16 and 32."""
    n = draw(st.integers(0, 18_000))
    seed = draw(st.integers(0, 2**16))
    tokens = np.random.default_rng(seed).integers(0, 50_000, size=n).astype(np.uint32)
    instances = {}
    for i in range(draw(st.integers(1, 6))):
        block_size = draw(st.sampled_from([16, 16, 32]))
        keys = compute_block_keys(tokens, block_size)
        cut = draw(st.integers(0, len(keys)))
        held = set(keys[:cut])
        if cut and draw(st.booleans()):  # a hole (a lost block)
            held.discard(keys[draw(st.integers(0, cut - 1))])
        if draw(st.booleans()):  # keys of another prompt
            held.update(compute_block_keys(list(range(1, 1 + 16 * 40)), block_size))
        if held or draw(st.booleans()):
            instances[f"i{i}"] = (block_size, held)
    return tokens, instances


@settings(max_examples=150, deadline=None)
@given(case=indexes(), as_list=st.booleans())
def test_match_equals_the_straightforward_lookup(case, as_list):
    tokens, instances = case
    idx = PrefixIndex()
    for iid, (block_size, held) in instances.items():
        idx.replace_instance(iid, held, block_size)
    before = idx.blocks_hashed
    got = idx.match(tokens.tolist() if as_list else tokens)
    want = reference_match(tokens, instances)
    assert got.keys() == want.keys()
    for iid, (block_size, held) in instances.items():
        keys = compute_block_keys(tokens, block_size)
        present = [key in held for key in keys]
        if present == sorted(present, reverse=True):
            # Prefix-closed over the prompt (the engine's normal state): exact.
            assert got[iid] == want[iid]
        else:
            # A hole: a run end at or past the first missing key, whose last block is held
            # and next block is not.
            run = got[iid] // block_size
            assert got[iid] % block_size == 0
            assert want[iid] <= got[iid] and run <= len(keys)
            assert run == 0 or present[run - 1]
            assert run == len(keys) or not present[run]
    # Per block size held by some instance, hashing stops after the first 16 blocks when no
    # instance holds them all, and covers the whole prompt otherwise.
    longest: dict[int, int] = {}
    for iid, (block_size, held) in instances.items():
        if held:
            longest[block_size] = max(longest.get(block_size, 0), want[iid] // block_size)
    want_hashed = 0
    for block_size, run in longest.items():
        blocks = len(tokens) // block_size
        want_hashed += blocks if run >= min(16, blocks) else min(16, blocks)
    assert idx.blocks_hashed - before == want_hashed


def test_a_prompt_cached_nowhere_hashes_one_small_chunk():
    p = prompt(32_768, seed=7)
    idx = PrefixIndex()
    idx.replace_instance("a", compute_block_keys(prompt(320, seed=8), 16), 16)
    assert idx.match(np.array(p, dtype=np.uint32)) == {"a": 0}
    assert idx.blocks_hashed == 16
    # A hit past the first chunk hashes the rest of the prompt in one vectorized call.
    idx.replace_instance("b", compute_block_keys(p[: 1536 * 16], 16), 16)
    assert idx.match(np.array(p, dtype=np.uint32))["b"] == 1536 * 16
    assert idx.blocks_hashed - 16 == 2048
