"""Tests of the KV event subscriber's message handling (no sockets involved)."""

from __future__ import annotations

import zmq.asyncio
from prometheus_client import REGISTRY

from services.region_agent.kv_subscriber import KvEventSubscriber
from slomesh.kv.events import BlockRemoved, BlockStored, encode_multipart
from slomesh.kv.hashing import compute_block_keys
from slomesh.kv.index import InstanceKvTracker


def make(instance_id):
    deltas = []
    sub = KvEventSubscriber(
        "test-region",
        InstanceKvTracker(instance_id),
        "tcp://127.0.0.1:1",
        False,
        deltas.append,
        zmq.asyncio.Context.instance(),
    )
    return sub, deltas


def sample(name, instance, **extra):
    labels = {"region": "test-region", "instance": instance, **extra}
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_messages_become_deltas_and_metrics():
    sub, deltas = make("sub-a")
    tokens = tuple(range(32))
    sub.handle_frames(encode_multipart(0, [BlockStored((1, 2), None, tokens, 16)]))
    sub.handle_frames(encode_multipart(1, [], form="array"))  # empty batch: no delta
    sub.handle_frames(encode_multipart(4, [BlockRemoved((2,))], form="array"))
    keys = compute_block_keys(tokens, 16)
    assert [list(d.stored_keys) for d in deltas] == [keys, []]
    assert list(deltas[1].removed_keys) == [keys[1]]
    assert sample("slomesh_agent_kv_events_applied_total", "sub-a") == 2
    assert sample("slomesh_agent_kv_event_gaps_total", "sub-a") == 1
    assert sample("slomesh_agent_kv_missed_batches_total", "sub-a") == 2


def test_undecodable_messages_are_counted_not_raised():
    sub, deltas = make("sub-b")
    sub.handle_frames([b"kv", (0).to_bytes(8, "big"), b"\xc1"])
    sub.handle_frames([b"kv"])
    assert sub.decode_errors == 2
    assert not deltas
    assert sub.tracker.possibly_incomplete
    assert sample("slomesh_agent_kv_decode_errors_total", "sub-b") == 2
    assert sample("slomesh_agent_kv_index_possibly_incomplete", "sub-b") == 1


def test_skipped_blocks_are_exported_by_reason():
    sub, _ = make("sub-c")
    sub.handle_frames(encode_multipart(0, [BlockStored((9,), 8, tuple(range(16)), 16)]))
    assert sample("slomesh_agent_kv_blocks_skipped_total", "sub-c", reason="unknown_parent") == 1
