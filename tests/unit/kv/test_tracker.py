"""Tests of slomesh.kv.index.InstanceKvTracker and DeltaAccumulator."""

from __future__ import annotations

from slomesh.kv.events import AllBlocksCleared, BlockRemoved, BlockStored
from slomesh.kv.hashing import compute_block_keys
from slomesh.kv.index import DeltaAccumulator, InstanceKvTracker, PrefixIndex
from slomesh.v1 import state_pb2

BS = 4
PROMPT = list(range(100, 124))  # 6 blocks of 4
KEYS = compute_block_keys(PROMPT, BS)


def stored(hashes, parent, tokens, block_size=BS, **kw):
    return BlockStored(
        block_hashes=tuple(hashes),
        parent_block_hash=parent,
        token_ids=tuple(tokens),
        block_size=block_size,
        **kw,
    )


def test_stored_chain_across_events_gets_request_side_keys():
    tr = InstanceKvTracker("i0")
    d1 = tr.apply_batch(0, [stored([1, 2], None, PROMPT[:8])])
    d2 = tr.apply_batch(1, [stored([3, 4, 5], 2, PROMPT[8:20])])
    assert list(d1.stored_keys) == KEYS[:2]
    assert list(d2.stored_keys) == KEYS[2:5]
    assert d1.block_size == BS and d1.instance_id == "i0"
    assert tr.num_blocks == 5
    assert tr.key_of(4) == KEYS[3]
    assert not tr.possibly_incomplete
    assert tr.stats.blocks_stored == 5


def test_bytes_hashes_chain_too():
    tr = InstanceKvTracker("i0")
    tr.apply_batch(0, [stored([b"a" * 32], None, PROMPT[:4])])
    delta = tr.apply_batch(1, [stored([b"b" * 32], b"a" * 32, PROMPT[4:8])])
    assert list(delta.stored_keys) == [KEYS[1]]


def test_removed_drops_keys_and_unknown_removals_are_counted():
    tr = InstanceKvTracker("i0")
    tr.apply_batch(0, [stored([1, 2, 3], None, PROMPT[:12])])
    delta = tr.apply_batch(1, [BlockRemoved(block_hashes=(3, 99))])
    assert list(delta.removed_keys) == [KEYS[2]]
    assert not delta.stored_keys
    assert tr.num_blocks == 2
    assert tr.stats.unknown_removed == 1
    assert tr.key_of(3) is None


def test_all_blocks_cleared_resets_and_clears_incomplete_flag():
    tr = InstanceKvTracker("i0")
    tr.apply_batch(0, [stored([1], None, PROMPT[:4])])
    tr.apply_batch(5, [])
    assert tr.possibly_incomplete
    delta = tr.apply_batch(6, [AllBlocksCleared(), stored([7], None, PROMPT[:4])])
    assert delta.cleared
    assert list(delta.stored_keys) == [KEYS[0]]
    assert tr.num_blocks == 1
    assert not tr.possibly_incomplete


def test_sequence_gap_is_counted_and_entries_are_kept():
    tr = InstanceKvTracker("i0")
    tr.apply_batch(0, [stored([1, 2], None, PROMPT[:8])])
    delta = tr.apply_batch(4, [stored([3], 2, PROMPT[8:12])])
    assert tr.stats.gaps == 1
    assert tr.stats.missed_batches == 3
    assert tr.possibly_incomplete
    assert not delta.cleared
    assert tr.num_blocks == 3


def test_unknown_parent_is_skipped_and_counted():
    tr = InstanceKvTracker("i0")
    delta = tr.apply_batch(0, [stored([3, 4], 2, PROMPT[8:16])])
    assert not delta.stored_keys
    assert tr.stats.skipped_blocks["unknown_parent"] == 2
    assert tr.num_blocks == 0


def test_publisher_restart_clears_index():
    tr = InstanceKvTracker("i0")
    tr.apply_batch(7, [stored([1], None, PROMPT[:4])])
    assert tr.possibly_incomplete  # joined a running publisher at seq 7
    delta = tr.apply_batch(0, [])
    assert not tr.possibly_incomplete
    assert delta.cleared
    assert tr.num_blocks == 0
    assert tr.stats.publisher_restarts == 1


def test_lora_block_size_mismatch_and_short_tokens_are_skipped():
    tr = InstanceKvTracker("i0", block_size=BS)
    tr.apply_batch(0, [stored([1], None, PROMPT[:4], lora_id=3)])
    tr.apply_batch(1, [stored([2], None, PROMPT[:8], block_size=8)])
    d = tr.apply_batch(2, [stored([5, 6], None, PROMPT[:6])])
    assert tr.stats.skipped_blocks["lora"] == 1
    assert tr.stats.skipped_blocks["block_size_mismatch"] == 1
    assert tr.stats.skipped_blocks["short_tokens"] == 1
    assert list(d.stored_keys) == [KEYS[0]]


def test_extra_keys_stop_keying_at_first_non_empty_entry():
    tr = InstanceKvTracker("i0")
    d = tr.apply_batch(
        0, [stored([1, 2, 3], None, PROMPT[:12], extra_keys=(None, ("salt",), None))]
    )
    assert list(d.stored_keys) == [KEYS[0]]
    assert tr.stats.skipped_blocks["extra_keys"] == 2


def test_same_key_on_two_media_is_refcounted():
    tr = InstanceKvTracker("i0")
    tr.apply_batch(0, [stored([1], None, PROMPT[:4], medium="GPU")])
    d = tr.apply_batch(1, [stored([1], None, PROMPT[:4], medium="CPU")])
    assert not d.stored_keys  # already present
    d = tr.apply_batch(2, [BlockRemoved(block_hashes=(1,), medium="GPU")])
    assert not d.removed_keys  # still on CPU
    assert tr.num_blocks == 1
    d = tr.apply_batch(3, [BlockRemoved(block_hashes=(1,), medium="CPU")])
    assert list(d.removed_keys) == [KEYS[0]]


def test_duplicate_store_is_idempotent():
    tr = InstanceKvTracker("i0")
    tr.apply_batch(0, [stored([1], None, PROMPT[:4])])
    d = tr.apply_batch(1, [stored([1], None, PROMPT[:4])])
    assert not d.stored_keys
    d = tr.apply_batch(2, [BlockRemoved(block_hashes=(1,))])
    assert list(d.removed_keys) == [KEYS[0]]
    assert tr.num_blocks == 0


def test_capacity_bound_evicts_oldest_entries():
    tr = InstanceKvTracker("i0", capacity_blocks=3)
    d = tr.apply_batch(0, [stored([1, 2, 3, 4, 5], None, PROMPT[:20])])
    assert tr.num_blocks == 3
    assert tr.stats.stale_evicted == 2
    # The evicted keys were stored and removed in the same batch: net they are absent.
    assert list(d.stored_keys) == KEYS[2:5]
    assert not d.removed_keys


def test_store_and_remove_in_one_batch_nets_out():
    tr = InstanceKvTracker("i0")
    d = tr.apply_batch(0, [stored([1], None, PROMPT[:4]), BlockRemoved(block_hashes=(1,))])
    assert not d.stored_keys and not d.removed_keys


def test_delta_accumulator_merges_to_the_same_result_as_applying_in_order():
    tr = InstanceKvTracker("i0")
    acc = DeltaAccumulator()
    sequential = PrefixIndex()
    batches = [
        [stored([1, 2], None, PROMPT[:8])],
        [BlockRemoved(block_hashes=(2,))],
        [stored([2, 3], 1, PROMPT[4:12])],
        [BlockRemoved(block_hashes=(1, 2, 3))],
        [stored([1], None, PROMPT[:4])],
    ]
    base = PrefixIndex()
    base.apply_delta(
        state_pb2.InstanceBlockDelta(instance_id="i0", stored_keys=[KEYS[5]], block_size=BS)
    )
    sequential.apply_delta(
        state_pb2.InstanceBlockDelta(instance_id="i0", stored_keys=[KEYS[5]], block_size=BS)
    )
    for seq, events in enumerate(batches):
        delta = tr.apply_batch(seq, events)
        sequential.apply_delta(delta)
        acc.add(delta)
    assert acc
    (merged,) = acc.take()
    assert not acc
    assert not set(merged.stored_keys) & set(merged.removed_keys)
    base.apply_delta(merged)
    assert base.keys("i0") == sequential.keys("i0") == {KEYS[0], KEYS[5]}


def test_delta_accumulator_folds_clears():
    acc = DeltaAccumulator()
    acc.add(state_pb2.InstanceBlockDelta(instance_id="a", stored_keys=[1, 2], block_size=16))
    acc.add(
        state_pb2.InstanceBlockDelta(instance_id="a", cleared=True, stored_keys=[3], block_size=16)
    )
    acc.add(state_pb2.InstanceBlockDelta(instance_id="b", block_size=16))
    out = acc.take()
    assert len(out) == 1
    assert out[0].cleared and list(out[0].stored_keys) == [3] and out[0].block_size == 16
    assert acc.take() == []


def test_mark_lost_counts_a_missed_batch():
    tr = InstanceKvTracker("i0")
    tr.apply_batch(0, [])
    tr.mark_lost(1)
    assert tr.stats.missed_batches == 1
    assert tr.possibly_incomplete
    tr.apply_batch(2, [])
    assert tr.stats.gaps == 0
