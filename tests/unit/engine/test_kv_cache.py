from __future__ import annotations

import numpy as np
import pytest
import xxhash

from slomesh.engine.kv_cache import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVCacheManager,
    compute_block_hashes,
    extend_block_hashes,
    hash_block,
)


def create_manager(num_blocks=8, block_size=4, enable_prefix_caching=True):
    events = []
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching, on_event=events.append)
    return kv, events


def toks(start, n):
    return list(range(start, start + n))


class TestHashes:
    def test_chained_hash_definition(self):
        tokens = toks(100, 10)
        hashes = compute_block_hashes(tokens, 4)
        assert len(hashes) == 2  # the partial third block is not hashed
        first = xxhash.xxh3_64_intdigest(np.array(tokens[:4], dtype="<u4").tobytes())
        assert hashes[0] == first
        second = xxhash.xxh3_64_intdigest(
            first.to_bytes(8, "little") + np.array(tokens[4:8], dtype="<u4").tobytes()
        )
        assert hashes[1] == second == hash_block(first, tokens[4:8])

    def test_continuation_with_parent_equals_whole(self):
        tokens = toks(7, 32)
        whole = compute_block_hashes(tokens, 8)
        tail = compute_block_hashes(tokens[16:], 8, parent=whole[1])
        assert whole[2:] == tail

    def test_shared_prefix_shares_hashes_then_diverges(self):
        a = toks(0, 16)
        b = toks(0, 8) + toks(500, 8)
        ha, hb = compute_block_hashes(a, 4), compute_block_hashes(b, 4)
        assert ha[:2] == hb[:2]
        assert ha[2] != hb[2] and ha[3] != hb[3]

    def test_same_block_content_at_another_position_hashes_differently(self):
        block = toks(1, 4)
        hashes = compute_block_hashes(block + block, 4)
        assert hashes[0] != hashes[1]

    def test_extend_block_hashes_appends_only_new_full_blocks(self):
        tokens = toks(0, 9)
        hashes = compute_block_hashes(tokens, 4)
        tokens += toks(100, 3)
        extend_block_hashes(hashes, tokens, 4)
        assert hashes == compute_block_hashes(tokens, 4)
        assert len(hashes) == 3

    def test_bad_block_size(self):
        with pytest.raises(ValueError, match="block_size"):
            compute_block_hashes([1, 2], 0)


class TestAllocation:
    def test_allocate_and_free_track_usage(self):
        kv, _ = create_manager(num_blocks=8, block_size=4)
        assert kv.allocate("a", 5, toks(0, 5))  # 2 blocks
        assert kv.usage == pytest.approx(2 / 8)
        assert kv.allocate("a", 3, toks(0, 8))  # fills block 2, no new block
        assert kv.usage == pytest.approx(2 / 8)
        assert kv.allocate("a", 1, toks(0, 9))
        assert kv.usage == pytest.approx(3 / 8)
        kv.free("a")
        assert kv.usage == 0.0
        assert kv.num_free_blocks == 8

    def test_allocation_failure_changes_nothing(self):
        kv, events = create_manager(num_blocks=4, block_size=4)
        assert kv.allocate("a", 12, toks(0, 12))
        before = (kv.num_free_blocks, kv.num_cached_blocks, len(events))
        assert not kv.allocate("b", 8, toks(100, 8))
        assert (kv.num_free_blocks, kv.num_cached_blocks, len(events)) == before
        assert not kv.has_seq("b")

    def test_full_blocks_are_stored_with_chained_parent(self):
        kv, events = create_manager(num_blocks=8, block_size=4)
        tokens = toks(10, 14)
        assert kv.allocate("a", 6, tokens)
        assert kv.allocate("a", 8, tokens)
        stored = [e for e in events if isinstance(e, BlockStored)]
        hashes = compute_block_hashes(tokens, 4)
        assert stored[0] == BlockStored(hashes[:1], None, tokens[:4], 4)
        assert stored[1] == BlockStored(hashes[1:3], hashes[0], tokens[4:12], 4)
        assert kv.num_cached_blocks == 3  # the 2-token tail block is not cached

    def test_token_ids_are_required_with_prefix_caching(self):
        kv, _ = create_manager()
        with pytest.raises(ValueError, match="token_ids"):
            kv.allocate("a", 8)
        kv2, events = create_manager(enable_prefix_caching=False)
        assert kv2.allocate("a", 8)
        assert events == [] and kv2.num_cached_blocks == 0


class TestPrefixCaching:
    def test_hit_is_capped_below_the_whole_prompt(self):
        kv, _ = create_manager(num_blocks=8, block_size=4)
        prompt = toks(0, 8)
        kv.allocate("a", 8, prompt)
        kv.free("a")
        # 2 full blocks cached, but a query of exactly those 8 tokens may reuse only 1 block.
        assert kv.get_computed_prefix(prompt) == 4
        assert kv.get_computed_prefix(prompt + [99]) == 8
        assert kv.get_computed_prefix(toks(0, 4) + [7, 7, 7, 7, 7]) == 4
        assert kv.get_computed_prefix([5] + prompt) == 0

    def test_hit_claims_free_cached_blocks(self):
        kv, events = create_manager(num_blocks=4, block_size=4)
        prompt = toks(0, 9)
        kv.allocate("a", 9, prompt)
        a_blocks = kv.seq_blocks("a")
        kv.free("a")
        n_events = len(events)
        cached = kv.get_computed_prefix(prompt)
        assert cached == 8
        assert kv.allocate("b", 1, prompt, num_cached_tokens=cached)
        assert kv.num_seq_tokens("b") == 9
        assert kv.seq_blocks("b")[:2] == a_blocks[:2]
        assert len(kv.seq_blocks("b")) == 3
        assert kv.usage == pytest.approx(3 / 4)
        assert len(events) == n_events  # reusing blocks publishes nothing new

    def test_shared_live_block_stays_in_use_until_both_free(self):
        kv, _ = create_manager(num_blocks=8, block_size=4)
        prompt = toks(0, 9)
        kv.allocate("a", 9, prompt)
        cached = kv.get_computed_prefix(prompt)
        assert kv.allocate("b", 1, prompt, num_cached_tokens=cached)
        assert kv.seq_blocks("a")[:2] == kv.seq_blocks("b")[:2]
        kv.free("a")
        assert kv.usage == pytest.approx(3 / 8)  # b's 2 shared blocks + b's own tail block
        kv.free("b")
        assert kv.usage == 0.0

    def test_claiming_more_than_is_cached_raises(self):
        kv, _ = create_manager()
        with pytest.raises(ValueError, match="cached prefix"):
            kv.allocate("a", 1, toks(0, 9), num_cached_tokens=8)
        with pytest.raises(ValueError, match="multiple"):
            kv.allocate("a", 1, toks(0, 9), num_cached_tokens=3)

    def test_lru_eviction_order_and_removed_events(self):
        kv, events = create_manager(num_blocks=4, block_size=4)
        a, b, c = toks(0, 8), toks(100, 8), toks(200, 8)
        ha, hb = compute_block_hashes(a, 4), compute_block_hashes(b, 4)
        kv.allocate("a", 8, a)
        kv.free("a")  # a's blocks freed first (least recently)
        kv.allocate("b", 8, b)  # takes the two never-used blocks: nothing evicted
        kv.free("b")
        assert not any(isinstance(e, BlockRemoved) for e in events)
        kv.allocate("c", 8, c)
        removed = [e for e in events if isinstance(e, BlockRemoved)]
        # a's blocks go first, its tail block before its head block.
        assert removed == [BlockRemoved([ha[1], ha[0]])]
        assert kv.get_computed_prefix(a + [1]) == 0  # a hit after eviction misses
        assert kv.get_computed_prefix(b + [1]) == 8
        assert set(kv.cached_block_hashes()) == set(hb) | set(compute_block_hashes(c, 4))

    def test_a_hit_refreshes_recency(self):
        kv, events = create_manager(num_blocks=4, block_size=4)
        a, b = toks(0, 4), toks(100, 4)
        kv.allocate("a", 4, a)
        kv.allocate("b", 4, b)
        kv.free("a")
        kv.free("b")
        # Reuse a: claim and free it again, so b becomes the least recently freed.
        assert kv.get_computed_prefix(a + [1]) == 4
        kv.allocate("a2", 1, a + [1], num_cached_tokens=4)
        kv.free("a2")
        kv.allocate("x", 12, toks(300, 12))  # 2 empty blocks + 1 eviction
        removed = [h for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes]
        assert removed == compute_block_hashes(b, 4)

    def test_duplicate_content_is_not_published_twice(self):
        kv, events = create_manager(num_blocks=8, block_size=4)
        prompt = toks(0, 8)
        kv.allocate("a", 8, prompt)
        kv.allocate("b", 8, prompt)  # computed concurrently, no lookup
        stored = [e for e in events if isinstance(e, BlockStored)]
        assert len(stored) == 1
        kv.free("b")
        kv.allocate("c", 16, toks(50, 16))  # evicts b's private copies only
        assert not any(isinstance(e, BlockRemoved) for e in events)
        assert kv.get_computed_prefix(prompt + [1]) == 8

    def test_reset(self):
        kv, events = create_manager(num_blocks=4, block_size=4)
        kv.allocate("a", 8, toks(0, 8))
        assert not kv.reset()
        kv.free("a")
        assert kv.reset()
        assert events[-1] == AllBlocksCleared()
        assert kv.num_cached_blocks == 0
        assert kv.get_computed_prefix(toks(0, 9)) == 0

    def test_disabled_prefix_caching_never_hits(self):
        kv, events = create_manager(enable_prefix_caching=False)
        kv.allocate("a", 8, toks(0, 8))
        kv.free("a")
        assert kv.get_computed_prefix(toks(0, 9)) == 0
        assert events == []
