"""Decoding (and encoding) of vLLM KV cache events as published on ZMQ.

Wire format (vLLM `ZmqEventPublisher`, `vllm/distributed/kv_events.py`): each message has three
frames `[topic, seq, payload]` where `seq` is an 8-byte big-endian counter that starts at 0 when
the engine starts, and `payload` is a msgpack `EventBatch`:

- array form `[ts, [events...], data_parallel_rank]` (the rank may be absent: `[ts, events]`);
- map form `{"ts": ..., "events": [...], "data_parallel_rank": ...}` (msgspec structs without
  `array_like`).

Each event is a tagged msgspec struct, either

- a map with a `"type"` key: `{"type": "BlockStored", "block_hashes": [...], ...}`, or
- a positional array tagged by its type name (older vLLM, `array_like=True`):
  `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
  lora_name, extra_keys, group_idx, ...]`, `["BlockRemoved", block_hashes, medium, group_idx]`,
  `["AllBlocksCleared"]`; trailing fields with default values may be omitted.

Block hashes are ints (Python `hash`, older vLLM) or bytes (sha256-based hashes, newer vLLM);
both are kept as they are (ints stay ints, bytes-like values become `bytes`), which is hashable
and compares equal between a block's own hash and a child's `parent_block_hash`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

logger = logging.getLogger(__name__)

BlockHash = int | bytes | str
"""An engine block hash, normalised: int, bytes, or (rarely) str."""

_decoder = msgspec.msgpack.Decoder()
_encoder = msgspec.msgpack.Encoder()


class KvEventDecodeError(ValueError):
    """A KV event message could not be decoded (bad frames, msgpack or event layout)."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Consecutive full blocks entered the engine's prefix cache.

    Attributes:
        block_hashes: engine hashes of the blocks, in order (block k covers
            `token_ids[k*block_size:(k+1)*block_size]`).
        parent_block_hash: engine hash of the block before the first one; None when the first
            block starts the sequence.
        token_ids: tokens of all the blocks, length `len(block_hashes) * block_size`.
        block_size: tokens per block.
        lora_id: LoRA adapter id, None for the base model.
        medium: where the blocks live ("GPU", "CPU", ...); None when not reported.
        lora_name: LoRA adapter name (newer vLLM), None for the base model.
        extra_keys: per-block extra hash inputs (multimodal ids, cache salt, ...), or None.
        group_idx: KV cache group of the blocks (hybrid models), None when not reported.
    """

    block_hashes: tuple[BlockHash, ...]
    parent_block_hash: BlockHash | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: tuple[Any, ...] | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks left the engine's prefix cache (evicted).

    Attributes:
        block_hashes: engine hashes of the removed blocks.
        medium: where they were removed from; None when not reported.
        group_idx: KV cache group, None when not reported.
    """

    block_hashes: tuple[BlockHash, ...]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The engine dropped its whole prefix cache (e.g. `reset_prefix_cache`)."""


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(slots=True)
class KvEventBatch:
    """One decoded ZMQ message.

    Attributes:
        seq: the publisher's sequence number (0 for the first message after engine start).
        ts: engine timestamp of the batch, seconds since the epoch.
        events: known events in publication order.
        data_parallel_rank: DP rank of the publishing engine, None when absent.
        topic: the topic frame, decoded as UTF-8.
        unknown_event_types: type names of events that were skipped because they are not
            known (newer vLLM may add event types).
    """

    seq: int
    ts: float
    events: list[KvEvent]
    data_parallel_rank: int | None = None
    topic: str = ""
    unknown_event_types: list[str] = field(default_factory=list)


# -- decoding -----------------------------------------------------------------------------------


def decode_multipart(frames: Sequence[bytes]) -> KvEventBatch:
    """Decodes one ZMQ multipart message `[topic, seq, payload]`.

    Args:
        frames: the message frames as received by a SUB socket.

    Returns:
        The decoded batch.

    Raises:
        KvEventDecodeError: wrong number of frames, a sequence frame that is not 8 bytes, or a
            malformed payload.
    """
    if len(frames) != 3:
        raise KvEventDecodeError(f"expected 3 frames [topic, seq, payload], got {len(frames)}")
    topic_frame, seq_frame, payload = (bytes(f) for f in frames)
    if len(seq_frame) != 8:
        raise KvEventDecodeError(f"seq frame must be 8 bytes, got {len(seq_frame)}")
    seq = int.from_bytes(seq_frame, "big", signed=False)
    batch = decode_payload(payload)
    batch.seq = seq
    batch.topic = topic_frame.decode("utf-8", errors="replace")
    return batch


def decode_payload(payload: bytes) -> KvEventBatch:
    """Decodes a msgpack `EventBatch` payload (array or map form).

    Args:
        payload: the third frame of a KV event message.

    Returns:
        A batch with `seq` 0 and empty `topic` (set by `decode_multipart`).

    Raises:
        KvEventDecodeError: not msgpack, or not an event batch.
    """
    try:
        obj = _decoder.decode(payload)
    except (msgspec.DecodeError, ValueError) as exc:
        raise KvEventDecodeError(f"payload is not valid msgpack: {exc}") from None
    if isinstance(obj, (list, tuple)):
        if len(obj) not in (2, 3):
            raise KvEventDecodeError(
                f"payload array must be [ts, events] or [ts, events, dp_rank], got {len(obj)} items"
            )
        ts, raw_events = obj[0], obj[1]
        dp_rank = obj[2] if len(obj) == 3 else None
    elif isinstance(obj, dict):
        if "events" not in obj:
            raise KvEventDecodeError("payload map lacks 'events'")
        ts = obj.get("ts", 0.0)
        raw_events = obj["events"]
        dp_rank = obj.get("data_parallel_rank")
    else:
        raise KvEventDecodeError(f"payload must be an array or map, got {type(obj).__name__}")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        raise KvEventDecodeError(f"batch ts must be a number, got {type(ts).__name__}")
    if not isinstance(raw_events, (list, tuple)):
        raise KvEventDecodeError(f"batch events must be an array, got {type(raw_events).__name__}")
    if dp_rank is not None and (not isinstance(dp_rank, int) or isinstance(dp_rank, bool)):
        raise KvEventDecodeError(f"data_parallel_rank must be an int, got {dp_rank!r}")
    events: list[KvEvent] = []
    unknown: list[str] = []
    for index, raw in enumerate(raw_events):
        try:
            event = decode_event(raw)
        except KvEventDecodeError as exc:
            raise KvEventDecodeError(f"event {index}: {exc}") from None
        if isinstance(event, str):
            unknown.append(event)
            logger.warning("skipping unknown KV event type", extra={"event_type": event})
            continue
        events.append(event)
    return KvEventBatch(
        seq=0, ts=float(ts), events=events, data_parallel_rank=dp_rank, unknown_event_types=unknown
    )


_STORED_FIELDS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
)
_STORED_REQUIRED = 4
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")
_REMOVED_REQUIRED = 1


def decode_event(raw: Any) -> KvEvent | str:
    """Decodes one event (map with "type" or positional array tagged by the type name).

    Args:
        raw: one element of a batch's events, as decoded from msgpack.

    Returns:
        The event, or the type name (a str) when the type is not known.

    Raises:
        KvEventDecodeError: the event has no type tag, misses required fields, or has fields of
            the wrong type.
    """
    if isinstance(raw, dict):
        tag = raw.get("type")
        fields = raw
    elif isinstance(raw, (list, tuple)) and raw:
        tag = raw[0]
        fields = None
    else:
        raise KvEventDecodeError(f"event must be a tagged map or array, got {raw!r:.80}")
    if not isinstance(tag, str):
        raise KvEventDecodeError(f"event type tag must be a string, got {tag!r:.80}")
    if tag == "BlockStored":
        values = _fields(tag, raw, fields, _STORED_FIELDS, _STORED_REQUIRED)
        return _make_stored(values)
    if tag == "BlockRemoved":
        values = _fields(tag, raw, fields, _REMOVED_FIELDS, _REMOVED_REQUIRED)
        return BlockRemoved(
            block_hashes=_hashes(values["block_hashes"]),
            medium=_opt_str("medium", values["medium"]),
            group_idx=_opt_int("group_idx", values["group_idx"]),
        )
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    return tag


def _fields(
    tag: str, raw: Any, fields: dict | None, names: tuple[str, ...], required: int
) -> dict[str, Any]:
    if fields is not None:
        missing = [n for n in names[:required] if n not in fields]
        if missing:
            raise KvEventDecodeError(f"{tag} lacks field(s) {missing}")
        return {n: fields.get(n) for n in names}
    values = list(raw[1:])
    if len(values) < required:
        raise KvEventDecodeError(
            f"{tag} array has {len(values)} fields, needs at least {required} ({names[:required]})"
        )
    values += [None] * (len(names) - len(values))
    return dict(zip(names, values[: len(names)]))


def _make_stored(values: dict[str, Any]) -> BlockStored:
    token_ids = values["token_ids"]
    if not isinstance(token_ids, (list, tuple)) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in token_ids
    ):
        raise KvEventDecodeError("BlockStored.token_ids must be an array of ints")
    block_size = values["block_size"]
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise KvEventDecodeError(f"BlockStored.block_size must be an int >= 1, got {block_size!r}")
    parent = values["parent_block_hash"]
    extra = values["extra_keys"]
    if extra is not None and not isinstance(extra, (list, tuple)):
        raise KvEventDecodeError("BlockStored.extra_keys must be an array or nil")
    return BlockStored(
        block_hashes=_hashes(values["block_hashes"]),
        parent_block_hash=None if parent is None else normalize_block_hash(parent),
        token_ids=tuple(token_ids),
        block_size=block_size,
        lora_id=_opt_int("lora_id", values["lora_id"]),
        medium=_opt_str("medium", values["medium"]),
        lora_name=_opt_str("lora_name", values["lora_name"]),
        extra_keys=None if extra is None else tuple(extra),
        group_idx=_opt_int("group_idx", values["group_idx"]),
    )


def normalize_block_hash(value: Any) -> BlockHash:
    """An engine block hash as a hashable value: ints stay ints, bytes-likes become bytes.

    Raises:
        KvEventDecodeError: any other type (float, array, map, bool, nil).
    """
    if isinstance(value, bool):
        raise KvEventDecodeError(f"block hash must be an int or bytes, got {value!r}")
    if isinstance(value, (int, bytes, str)):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise KvEventDecodeError(f"block hash must be an int or bytes, got {type(value).__name__}")


def _hashes(values: Any) -> tuple[BlockHash, ...]:
    if not isinstance(values, (list, tuple)):
        raise KvEventDecodeError(f"block_hashes must be an array, got {type(values).__name__}")
    return tuple(normalize_block_hash(v) for v in values)


def _opt_int(name: str, value: Any) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise KvEventDecodeError(f"{name} must be an int or nil, got {value!r:.40}")


def _opt_str(name: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise KvEventDecodeError(f"{name} must be a string or nil, got {value!r:.40}")


# -- encoding (vLLM's wire format, for publishers and tests) ------------------------------------


def encode_event(event: KvEvent, form: Literal["map", "array"] = "map") -> Any:
    """The msgpack-ready representation of one event in vLLM's map or positional array form."""
    if isinstance(event, BlockStored):
        values = [
            list(event.block_hashes),
            event.parent_block_hash,
            list(event.token_ids),
            event.block_size,
            event.lora_id,
            event.medium,
            event.lora_name,
            None if event.extra_keys is None else list(event.extra_keys),
            event.group_idx,
        ]
        names: tuple[str, ...] = _STORED_FIELDS
        tag = "BlockStored"
    elif isinstance(event, BlockRemoved):
        values = [list(event.block_hashes), event.medium, event.group_idx]
        names = _REMOVED_FIELDS
        tag = "BlockRemoved"
    elif isinstance(event, AllBlocksCleared):
        values, names, tag = [], (), "AllBlocksCleared"
    else:
        raise TypeError(f"not a KV event: {event!r}")
    if form == "array":
        while values and values[-1] is None:
            values.pop()
        return [tag, *values]
    if form != "map":
        raise ValueError(f"form: must be 'map' or 'array', got {form!r}")
    out: dict[str, Any] = {"type": tag}
    out.update((n, v) for n, v in zip(names, values))
    return out


def encode_payload(
    events: Iterable[KvEvent],
    ts: float | None = None,
    data_parallel_rank: int | None = 0,
    form: Literal["map", "array"] = "map",
) -> bytes:
    """A msgpack `EventBatch` payload `[ts, [events], dp_rank]` (rank omitted when None).

    Args:
        events: events in order.
        ts: batch timestamp in seconds since the epoch (None = now).
        data_parallel_rank: the publishing engine's DP rank, or None to write `[ts, events]`.
        form: per-event encoding, vLLM's "map" (tagged maps) or "array" (tagged arrays).
    """
    body: list[Any] = [time.time() if ts is None else ts, [encode_event(e, form) for e in events]]
    if data_parallel_rank is not None:
        body.append(data_parallel_rank)
    return _encoder.encode(body)


def encode_multipart(
    seq: int,
    events: Iterable[KvEvent],
    topic: str = "",
    ts: float | None = None,
    data_parallel_rank: int | None = 0,
    form: Literal["map", "array"] = "map",
) -> list[bytes]:
    """The three frames `[topic, seq (8-byte big-endian), payload]` of one KV event message."""
    if seq < 0:
        raise ValueError(f"seq: must be >= 0, got {seq}")
    return [
        topic.encode("utf-8"),
        seq.to_bytes(8, "big"),
        encode_payload(events, ts=ts, data_parallel_rank=data_parallel_rank, form=form),
    ]
