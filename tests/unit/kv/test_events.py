"""Tests of slomesh.kv.events: decoding vLLM's ZMQ KV event messages."""

from __future__ import annotations

import msgspec
import pytest

from slomesh.kv.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEventDecodeError,
    decode_multipart,
    decode_payload,
    encode_multipart,
    encode_payload,
)

_pack = msgspec.msgpack.encode


def _stored(**overrides):
    fields = {
        "block_hashes": [11, 12],
        "parent_block_hash": None,
        "token_ids": list(range(32)),
        "block_size": 16,
        "lora_id": None,
        "medium": "GPU",
    }
    fields.update(overrides)
    return BlockStored(
        block_hashes=tuple(fields["block_hashes"]),
        parent_block_hash=fields["parent_block_hash"],
        token_ids=tuple(fields["token_ids"]),
        block_size=fields["block_size"],
        lora_id=fields["lora_id"],
        medium=fields["medium"],
    )


@pytest.mark.parametrize("form", ["map", "array"])
def test_round_trip_both_encodings(form):
    events = [
        _stored(),
        BlockRemoved(block_hashes=(11,), medium="GPU"),
        AllBlocksCleared(),
    ]
    frames = encode_multipart(41, events, topic="kv", ts=12.5, form=form)
    batch = decode_multipart(frames)
    assert batch.seq == 41
    assert batch.topic == "kv"
    assert batch.ts == 12.5
    assert batch.data_parallel_rank == 0
    assert batch.events == events


def test_vllm_map_form_literal():
    # The shape a real vLLM (0.1x+) publishes: tagged maps with extra newer fields.
    payload = _pack(
        [
            1.0,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": [1969525349861141707],
                    "parent_block_hash": None,
                    "token_ids": list(range(128)),
                    "block_size": 128,
                    "lora_id": None,
                    "medium": "GPU",
                    "lora_name": None,
                    "extra_keys": [None],
                    "group_idx": 0,
                    "kv_cache_spec_kind": "full_attention",
                }
            ],
            0,
        ]
    )
    batch = decode_payload(payload)
    (event,) = batch.events
    assert isinstance(event, BlockStored)
    assert event.block_hashes == (1969525349861141707,)
    assert event.block_size == 128
    assert event.group_idx == 0
    assert event.extra_keys == (None,)


def test_positional_array_form_with_omitted_trailing_fields():
    payload = _pack([2.0, [["BlockStored", [5], 4, [1, 2, 3, 4], 4], ["BlockRemoved", [5]]]])
    batch = decode_payload(payload)
    stored, removed = batch.events
    assert stored == BlockStored(
        block_hashes=(5,), parent_block_hash=4, token_ids=(1, 2, 3, 4), block_size=4
    )
    assert removed == BlockRemoved(block_hashes=(5,))
    assert batch.data_parallel_rank is None


def test_bytes_hashes_are_kept_as_bytes():
    h1, h2 = b"\x01" * 32, b"\x02" * 32
    payload = _pack(
        [
            0.0,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": [h2],
                    "parent_block_hash": h1,
                    "token_ids": [1] * 16,
                    "block_size": 16,
                    "lora_id": None,
                    "medium": None,
                }
            ],
            0,
        ]
    )
    (event,) = decode_payload(payload).events
    assert event.block_hashes == (h2,)
    assert event.parent_block_hash == h1
    assert isinstance(event.parent_block_hash, bytes)
    assert hash(event.parent_block_hash) == hash(h1)


def test_map_form_batch_is_accepted():
    payload = _pack({"ts": 3.0, "events": [{"type": "AllBlocksCleared"}], "data_parallel_rank": 2})
    batch = decode_payload(payload)
    assert batch.events == [AllBlocksCleared()]
    assert batch.data_parallel_rank == 2


def test_two_element_payload():
    payload = encode_payload([AllBlocksCleared()], ts=1.0, data_parallel_rank=None)
    assert msgspec.msgpack.decode(payload) == [1.0, [{"type": "AllBlocksCleared"}]]
    batch = decode_payload(payload)
    assert batch.events == [AllBlocksCleared()]
    assert batch.data_parallel_rank is None


def test_unknown_event_types_are_skipped_and_reported():
    payload = _pack([0.0, [{"type": "BlockPinned", "x": 1}, ["AllBlocksCleared"]], 0])
    batch = decode_payload(payload)
    assert batch.events == [AllBlocksCleared()]
    assert batch.unknown_event_types == ["BlockPinned"]


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\xc1\xc1", "msgpack"),
        (_pack(42), "array or map"),
        (_pack([1.0]), "items"),
        (_pack([1.0, [], 0, 9]), "items"),
        (_pack(["ts", []]), "ts"),
        (_pack([1.0, {"a": 1}]), "events"),
        (_pack([1.0, [42]]), "event 0"),
        (_pack([1.0, [{"block_hashes": [1]}]]), "type"),
        (_pack([1.0, [["BlockStored", [1], None]]]), "BlockStored"),
        (
            _pack(
                [
                    1.0,
                    [
                        {
                            "type": "BlockStored",
                            "block_hashes": [1],
                            "parent_block_hash": None,
                            "token_ids": [1],
                            "block_size": 0,
                        }
                    ],
                ]
            ),
            "block_size",
        ),
        (
            _pack(
                [
                    1.0,
                    [
                        {
                            "type": "BlockStored",
                            "block_hashes": [1.5],
                            "parent_block_hash": None,
                            "token_ids": [1],
                            "block_size": 1,
                        }
                    ],
                ]
            ),
            "block hash",
        ),
        (
            _pack(
                [
                    1.0,
                    [
                        {
                            "type": "BlockStored",
                            "block_hashes": [1],
                            "parent_block_hash": None,
                            "token_ids": ["a"],
                            "block_size": 1,
                        }
                    ],
                ]
            ),
            "token_ids",
        ),
        (_pack([1.0, [{"type": "BlockRemoved"}]]), "BlockRemoved"),
        (_pack({"ts": 1.0}), "events"),
    ],
)
def test_malformed_payloads_raise(payload, message):
    with pytest.raises(KvEventDecodeError, match=message):
        decode_payload(payload)


def test_malformed_frames_raise():
    with pytest.raises(KvEventDecodeError, match="3 frames"):
        decode_multipart([b"kv", b"\x00" * 8])
    with pytest.raises(KvEventDecodeError, match="8 bytes"):
        decode_multipart([b"kv", b"\x00" * 4, encode_payload([])])


def test_decode_error_is_a_value_error():
    assert issubclass(KvEventDecodeError, ValueError)
