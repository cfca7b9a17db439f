"""Prefix KV arriving from elsewhere (a KV move or prefetch) enters an engine's prefix cache."""

from __future__ import annotations

from slomesh.engine.kv_cache import BlockRemoved, BlockStored, KVCacheManager


def test_inserted_prefix_is_cached_unheld_with_chained_events():
    events: list = []
    kv = KVCacheManager(8, 4, on_event=events.append)
    tokens = list(range(100, 120))  # 5 blocks
    kv.allocate("a", 8, tokens[:8])  # the first 2 blocks, cached by a request
    kv.free("a")
    events.clear()
    assert kv.insert_cached_prefix(tokens) == 20
    assert kv.num_free_blocks == 8  # cached, held by nobody
    assert kv.get_computed_prefix([*tokens, 1]) == 20
    (stored,) = events
    assert isinstance(stored, BlockStored) and len(stored.block_hashes) == 3
    assert stored.parent_block_hash is not None  # chained to the cached second block
    assert stored.token_ids == tokens[8:20]


def test_insertion_evicts_lru_blocks_and_never_held_ones():
    events: list = []
    kv = KVCacheManager(6, 4, on_event=events.append)
    kv.allocate("held", 8, list(range(8)))  # 2 blocks held
    old = list(range(500, 508))
    kv.allocate("old", 8, old)
    kv.free("old")
    events.clear()
    new = list(range(900, 924))  # 6 blocks; only 4 are free
    assert kv.insert_cached_prefix(new) == 16
    assert kv.get_computed_prefix([*range(8), 1]) == 8  # the held blocks survive
    assert kv.get_computed_prefix([*old, 1]) == 0
    assert isinstance(events[0], BlockRemoved) and len(events[0].block_hashes) == 2
    assert sum(len(e.block_hashes) for e in events if isinstance(e, BlockStored)) == 4
