from __future__ import annotations

import asyncio

import msgspec
import pytest
import zmq
import zmq.asyncio

from slomesh.emulator.kv_events import (
    END_SEQ,
    ZmqKvEventPublisher,
    encode_batch,
    encode_event,
    vllm_should_bind,
)
from slomesh.engine.kv_cache import AllBlocksCleared, BlockRemoved, BlockStored

STORED = BlockStored(
    block_hashes=[11, 12], parent_block_hash=10, token_ids=list(range(8)), block_size=4
)


def test_map_encoding_matches_vllm_tagged_structs():
    assert encode_event(STORED, "map") == {
        "type": "BlockStored",
        "block_hashes": [11, 12],
        "parent_block_hash": 10,
        "token_ids": list(range(8)),
        "block_size": 4,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }
    assert encode_event(BlockRemoved([5]), "map") == {
        "type": "BlockRemoved",
        "block_hashes": [5],
        "medium": "GPU",
    }
    assert encode_event(AllBlocksCleared(), "map") == {"type": "AllBlocksCleared"}


def test_array_encoding_is_positional_with_tag_first():
    assert encode_event(STORED, "array") == [
        "BlockStored",
        [11, 12],
        10,
        list(range(8)),
        4,
        None,
        "GPU",
    ]
    assert encode_event(BlockRemoved([5, 6]), "array") == ["BlockRemoved", [5, 6], "GPU"]
    assert encode_event(AllBlocksCleared(), "array") == ["AllBlocksCleared"]


class _EventV(msgspec.Struct, array_like=True, omit_defaults=True, tag=True):
    """Older vLLM's array-like tagged event structs, re-declared for decoding."""


class BlockStoredV(_EventV, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class BlockRemovedV(_EventV, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None


class BatchV(msgspec.Struct, array_like=True):
    ts: float
    events: list[BlockStoredV | BlockRemovedV]
    data_parallel_rank: int | None = None


def test_array_encoding_decodes_with_vllm_style_array_like_structs():
    payload = encode_batch([STORED, BlockRemoved([3])], "array", ts=12.5, data_parallel_rank=0)
    batch = msgspec.msgpack.decode(payload, type=BatchV)
    assert batch.ts == 12.5 and batch.data_parallel_rank == 0
    assert batch.events[0].block_hashes == [11, 12] and batch.events[0].medium == "GPU"
    assert batch.events[1] == BlockRemovedV([3], "GPU")


def test_batch_is_ts_events_rank_array():
    payload = msgspec.msgpack.decode(encode_batch([STORED], "map", ts=1.0, data_parallel_rank=3))
    assert payload[0] == 1.0 and payload[2] == 3
    assert payload[1][0]["type"] == "BlockStored"


def test_uint64_hashes_survive_msgpack():
    big = BlockStored([2**64 - 1], None, [1, 2], 2)
    decoded = msgspec.msgpack.decode(encode_batch([big], "map"))
    assert decoded[1][0]["block_hashes"] == [2**64 - 1]


def test_vllm_bind_rule():
    assert vllm_should_bind("tcp://*:5557")
    assert vllm_should_bind("ipc:///tmp/kv")
    assert not vllm_should_bind("tcp://127.0.0.1:5557")


def test_bad_encoding_and_mode():
    with pytest.raises(ValueError, match="encoding"):
        encode_event(STORED, "json")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        ZmqKvEventPublisher("tcp://127.0.0.1:*", mode="listen")  # type: ignore[arg-type]


async def _recv(sock, timeout_s=5.0):
    return await asyncio.wait_for(sock.recv_multipart(), timeout_s)


async def test_pub_sub_sequence_numbers_and_replay():
    pub = ZmqKvEventPublisher(
        "tcp://127.0.0.1:*", topic="kv", encoding="map", replay_endpoint="tcp://127.0.0.1:*"
    )
    pub.start()
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    sub.connect(pub.endpoint)
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(pub.replay_endpoint)
    try:
        # Wait until the subscription reached the publisher (slow-joiner).
        first = None
        for _ in range(100):
            pub.publish([AllBlocksCleared()])
            if await sub.poll(50):
                first = await sub.recv_multipart()
                break
        assert first is not None
        base = int.from_bytes(first[1], "big")
        assert base < pub.next_seq
        assert pub.publish([]) is None  # nothing to send
        for i in range(3):
            pub.publish([BlockRemoved([i])])
        seqs, hashes = [], []
        while len(hashes) < 3:
            topic, seq_b, payload = await _recv(sub)
            assert topic == b"kv"
            seq = int.from_bytes(seq_b, "big")
            body = msgspec.msgpack.decode(payload)
            if body[1][0]["type"] != "BlockRemoved":
                continue  # warm-up messages still in flight
            seqs.append(seq)
            hashes.append(body[1][0]["block_hashes"][0])
        assert hashes == [0, 1, 2]
        assert seqs == [seqs[0], seqs[0] + 1, seqs[0] + 2] and seqs[0] > base
        assert pub.next_seq == seqs[-1] + 1
        # Replay from the second BlockRemoved message.
        await dealer.send_multipart([b"", seqs[1].to_bytes(8, "big")])
        replayed = []
        while True:
            seq_b, payload = await _replay_recv(dealer)
            if seq_b == END_SEQ:
                assert payload == b""
                break
            replayed.append(int.from_bytes(seq_b, "big"))
        assert replayed == [seqs[1], seqs[2]]
    finally:
        sub.close(0)
        dealer.close(0)
        ctx.term()
        await pub.close()


async def _replay_recv(dealer):
    empty, seq_b, payload = await asyncio.wait_for(dealer.recv_multipart(), 5.0)
    assert empty == b""
    return seq_b, payload
