"""KV-cache events over ZMQ, on vLLM's wire format.

Each engine step that changed the prefix cache becomes one ZMQ PUB message of three frames::

    [topic (utf-8), seq (8-byte big-endian unsigned, +1 per message from 0), payload]

``payload`` is msgpack ``[ts, events, data_parallel_rank]`` (``ts``: unix seconds, float). Each
event is encoded in one of two forms:

- ``"map"`` (vLLM 0.32, observed; see ``REAL_VLLM.md``)::

      {"type": "BlockStored", "block_hashes": [...], "parent_block_hash": int | None,
       "token_ids": [...], "block_size": 16, "lora_id": None, "medium": "GPU", "lora_name": None}
      {"type": "BlockRemoved", "block_hashes": [...], "medium": "GPU"}
      {"type": "AllBlocksCleared"}

- ``"array"`` (older vLLM, msgspec ``array_like`` tagged structs)::

      ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]
      ["BlockRemoved", block_hashes, medium]
      ["AllBlocksCleared"]

An optional ROUTER replay socket serves gaps, as vLLM's ``replay_endpoint`` does: a DEALER
client sends ``[b"", start_seq (8-byte big-endian)]`` and receives ``[b"", seq, payload]`` for
every buffered message with ``seq >= start_seq``, then ``[b"", (-1 as 8-byte big-endian
signed), b""]``. (A REQ client also works but ZMQ hands it only the first reply.)

The PUB socket binds its endpoint by default (``mode="bind"``): the emulator is the stable side
and subscribers (region agents) connect, as they do to a vLLM started with ``tcp://*:5557``.
``mode="auto"`` applies vLLM's own rule instead (an endpoint containing ``*`` or ``::``, or an
``ipc://`` / ``inproc://`` one, is bound; any other is connected to), and ``mode="connect"``
always connects (the subscriber binds). ``tcp://127.0.0.1:*`` binds a free port;
:attr:`ZmqKvEventPublisher.endpoint` gives the result.

Source: vLLM ``vllm/distributed/kv_events.py`` (``ZmqEventPublisher``, ``BlockStored``,
``BlockRemoved``, ``AllBlocksCleared``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Literal

import msgspec
import zmq
import zmq.asyncio

from slomesh.engine.kv_cache import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

logger = logging.getLogger(__name__)

KvEventEncoding = Literal["map", "array"]
KvEventSocketMode = Literal["bind", "connect", "auto"]
MEDIUM_GPU = "GPU"
END_SEQ = (-1).to_bytes(8, "big", signed=True)
"""Replay end marker (vLLM's ``ZmqEventPublisher.END_SEQ``)."""

_encoder = msgspec.msgpack.Encoder()


def encode_event(event: KVEvent, encoding: KvEventEncoding = "map") -> Any:
    """One event as the msgpack-ready object vLLM would send (module docstring).

    Raises:
        ValueError: unknown ``encoding``.
        TypeError: not a KV event.
    """
    if encoding not in ("map", "array"):
        raise ValueError(f"encoding must be 'map' or 'array', got {encoding!r}")
    if isinstance(event, BlockStored):
        if encoding == "map":
            return {
                "type": "BlockStored",
                "block_hashes": list(event.block_hashes),
                "parent_block_hash": event.parent_block_hash,
                "token_ids": list(event.token_ids),
                "block_size": event.block_size,
                "lora_id": None,
                "medium": MEDIUM_GPU,
                "lora_name": None,
            }
        return [
            "BlockStored",
            list(event.block_hashes),
            event.parent_block_hash,
            list(event.token_ids),
            event.block_size,
            None,
            MEDIUM_GPU,
        ]
    if isinstance(event, BlockRemoved):
        if encoding == "map":
            return {
                "type": "BlockRemoved",
                "block_hashes": list(event.block_hashes),
                "medium": MEDIUM_GPU,
            }
        return ["BlockRemoved", list(event.block_hashes), MEDIUM_GPU]
    if isinstance(event, AllBlocksCleared):
        return {"type": "AllBlocksCleared"} if encoding == "map" else ["AllBlocksCleared"]
    raise TypeError(f"not a KV event: {event!r}")


def encode_batch(
    events: Sequence[KVEvent],
    encoding: KvEventEncoding = "map",
    ts: float | None = None,
    data_parallel_rank: int = 0,
) -> bytes:
    """msgpack payload ``[ts, [events...], data_parallel_rank]`` of one message."""
    return _encoder.encode(
        [
            time.time() if ts is None else ts,
            [encode_event(e, encoding) for e in events],
            data_parallel_rank,
        ]
    )


def vllm_should_bind(endpoint: str) -> bool:
    """vLLM's rule for its PUB endpoint: bind a wildcard/IPC/in-process one, connect otherwise."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class ZmqKvEventPublisher:
    """Publishes KV-event batches on a ZMQ PUB socket, with an optional replay ROUTER.

    Call from one asyncio event loop. Messages are kept (up to ``buffer_steps``) for replay.

    Args:
        endpoint: PUB endpoint.
        mode: ``"bind"``, ``"connect"`` or ``"auto"`` (vLLM's rule; module docstring).
        topic: Topic frame (vLLM's ``kv_events_config.topic``).
        encoding: ``"map"`` or ``"array"`` event encoding.
        replay_endpoint: ROUTER endpoint to bind for replay requests, or ``None``.
        buffer_steps: Messages kept for replay.
        hwm: PUB send high-water mark (messages beyond it are dropped by ZMQ, as in vLLM).
        data_parallel_rank: Third element of every payload.

    Raises:
        ValueError: unknown ``encoding`` or ``mode``.
        zmq.ZMQError: the endpoint cannot be bound/connected.
    """

    def __init__(
        self,
        endpoint: str,
        mode: KvEventSocketMode = "bind",
        topic: str = "kv",
        encoding: KvEventEncoding = "map",
        replay_endpoint: str | None = None,
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
        data_parallel_rank: int = 0,
    ) -> None:
        if encoding not in ("map", "array"):
            raise ValueError(f"encoding must be 'map' or 'array', got {encoding!r}")
        if mode not in ("bind", "connect", "auto"):
            raise ValueError(f"mode must be 'bind', 'connect' or 'auto', got {mode!r}")
        self.topic = topic
        self.encoding: KvEventEncoding = encoding
        self.data_parallel_rank = data_parallel_rank
        self._topic_bytes = topic.encode("utf-8")
        self._ctx = zmq.asyncio.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        if mode == "bind" or (mode == "auto" and vllm_should_bind(endpoint)):
            self._pub.bind(endpoint)
            self.endpoint: str = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self._pub.connect(endpoint)
            self.endpoint = endpoint
        self._replay: zmq.asyncio.Socket | None = None
        self.replay_endpoint: str | None = None
        if replay_endpoint is not None:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(replay_endpoint)
            self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._next_seq = 0
        self._replay_task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def next_seq(self) -> int:
        """Sequence number the next message will carry."""
        return self._next_seq

    def start(self) -> None:
        """Start serving replay requests (needs a running event loop; no-op without replay)."""
        if self._replay is not None and self._replay_task is None:
            self._replay_task = asyncio.get_running_loop().create_task(
                self._serve_replay(), name="kv-events-replay"
            )

    def publish(self, events: Sequence[KVEvent], ts: float | None = None) -> int | None:
        """Send one message holding ``events`` (nothing is sent for an empty list).

        Returns:
            The message's sequence number, or ``None`` when nothing was sent.
        """
        if not events or self._closed:
            return None
        seq = self._next_seq
        self._next_seq += 1
        payload = encode_batch(events, self.encoding, ts, self.data_parallel_rank)
        seq_bytes = seq.to_bytes(8, "big")
        try:
            self._pub.send_multipart([self._topic_bytes, seq_bytes, payload], flags=zmq.NOBLOCK)
        except zmq.Again:
            logger.warning(
                "kv event message dropped at the PUB high-water mark", extra={"seq": seq}
            )
        self._buffer.append((seq, payload))
        return seq

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3:
                logger.warning("invalid kv event replay request", extra={"frames": len(frames)})
                continue
            client_id, _empty, start_bytes = frames
            start_seq = int.from_bytes(start_bytes, "big")
            for seq, payload in list(self._buffer):
                if seq >= start_seq:
                    await self._replay.send_multipart(
                        [client_id, b"", seq.to_bytes(8, "big"), payload]
                    )
            await self._replay.send_multipart([client_id, b"", END_SEQ, b""])

    async def close(self) -> None:
        """Stop replay and close the sockets."""
        if self._closed:
            return
        self._closed = True
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
        self._ctx.term()
