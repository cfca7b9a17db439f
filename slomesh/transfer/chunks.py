"""Chunks on the wire: sizes, the per-chunk checksum, reading, and a test fault injector.

Every chunk a source sends carries ``xxh3_64(data)`` computed on the bytes it read from disk;
the destination recomputes it before writing a byte (`verify_chunk`). A mismatch means the
chunk was damaged between the source's read and the destination's receive; the destination
re-requests the chunk and never stores it. xxh3_64 detects random corruption with probability
``1 - 2**-64`` per chunk at several GB/s per core; it is not a defence against a malicious peer
(the whole-object digests of `slomesh.transfer.objects` are the end-to-end check: sha256 for
weights). Source: Y. Collet, xxHash (https://xxhash.com, XXH3).

`FaultInjector` is the sender's test hook: it flips one bit of chosen chunks (after the
checksum was computed, i.e. "in transit") and can break a stream after some chunks, to test
detection, re-send and resume against real gRPC peers.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MAX_CHUNK_BYTES",
    "MIN_CHUNK_BYTES",
    "ChunkChecksumError",
    "FaultInjector",
    "check_chunk_bytes",
    "chunk_checksum",
    "read_chunk",
    "verify_chunk",
]

DEFAULT_CHUNK_BYTES = 1024 * 1024
"""1 MiB: the unit the link scheduler grants (its default burst is two of them)."""
MIN_CHUNK_BYTES = 4096
"""Smallest chunk a fetch may ask for (smaller ones waste per-message overhead)."""
MAX_CHUNK_BYTES = 16 * 1024 * 1024
"""Largest chunk a fetch may ask for (below the services' 64 MiB gRPC message limit)."""


class ChunkChecksumError(ValueError):
    """A chunk's bytes do not match its checksum (damaged in transit); nothing was stored.

    Attributes:
        path: file of the object.
        offset: the chunk's first byte in the file.
    """

    def __init__(self, path: str, offset: int, expected: int, actual: int):
        super().__init__(
            f"chunk of {path!r} at offset {offset}: checksum {actual:#018x} != {expected:#018x}"
        )
        self.path = path
        self.offset = offset


def chunk_checksum(data: bytes) -> int:
    """xxh3_64 of `data`, as an unsigned 64-bit int (the wire's ``checksum_xxh3_64``)."""
    return xxhash.xxh3_64_intdigest(data)


def verify_chunk(path: str, offset: int, data: bytes, checksum: int) -> None:
    """Raises `ChunkChecksumError` unless ``chunk_checksum(data) == checksum``."""
    actual = chunk_checksum(data)
    if actual != checksum:
        raise ChunkChecksumError(path, offset, checksum, actual)


def check_chunk_bytes(chunk_bytes: int) -> int:
    """Validates a requested chunk size; 0 means `DEFAULT_CHUNK_BYTES`.

    Returns:
        The chunk size to use, bytes.

    Raises:
        ValueError: outside [`MIN_CHUNK_BYTES`, `MAX_CHUNK_BYTES`] (INVALID_ARGUMENT).
    """
    if chunk_bytes == 0:
        return DEFAULT_CHUNK_BYTES
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(
            f"chunk_bytes must be 0 or in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}], got {chunk_bytes}"
        )
    return chunk_bytes


def read_chunk(path: str | Path, offset: int, nbytes: int) -> bytes:
    """Reads up to `nbytes` bytes of `path` from `offset` (fewer at the end of the file).

    Raises:
        OSError: the file cannot be read.
    """
    with open(path, "rb") as f:
        f.seek(offset, os.SEEK_SET)
        return f.read(nbytes)


@dataclass
class FaultInjector:
    """Sender-side test hook: damages chosen chunks once and breaks chosen streams once.

    Chunk indices count a file's chunks from its start (``offset // chunk_bytes``), so they
    name the same chunk when a stream is resumed from a later offset.

    Attributes:
        corrupt_chunk_indices: chunk indices whose bytes get one bit flipped, the first time
            each is sent for each (transfer id, file) pair; the checksum is of the intact bytes.
        break_after_chunks: end a stream with UNAVAILABLE after sending this many chunks of
            one file on it, once per (transfer id, file); None: never.
        corrupted: (transfer id, file path, chunk index) of every chunk damaged so far.
        broken: (transfer id, file path) of every stream broken so far.
    """

    corrupt_chunk_indices: frozenset[int] = frozenset()
    break_after_chunks: int | None = None
    corrupted: list[tuple[str, str, int]] = field(default_factory=list)
    broken: list[tuple[str, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.corrupt_chunk_indices = frozenset(self.corrupt_chunk_indices)
        if any(i < 0 for i in self.corrupt_chunk_indices):
            raise ValueError("corrupt_chunk_indices must be >= 0")
        if self.break_after_chunks is not None and self.break_after_chunks < 1:
            raise ValueError(f"break_after_chunks must be >= 1, got {self.break_after_chunks}")

    @classmethod
    def corrupting(cls, indices: Iterable[int]) -> FaultInjector:
        """An injector that damages the given chunk indices once each."""
        return cls(corrupt_chunk_indices=frozenset(indices))

    def on_send(self, transfer_id: str, path: str, chunk_index: int, data: bytes) -> bytes:
        """The bytes to put on the wire for a chunk: `data`, or `data` with bit 0 of its
        middle byte flipped when the chunk is due to be damaged."""
        if chunk_index not in self.corrupt_chunk_indices or not data:
            return data
        key = (transfer_id, path, chunk_index)
        with self._lock:
            if key in self.corrupted:
                return data
            self.corrupted.append(key)
        damaged = bytearray(data)
        damaged[len(damaged) // 2] ^= 0x01
        return bytes(damaged)

    def should_break(self, transfer_id: str, path: str, chunks_sent: int) -> bool:
        """Whether to end the stream now with UNAVAILABLE (after `chunks_sent` chunks of
        `path` on it)."""
        if self.break_after_chunks is None or chunks_sent < self.break_after_chunks:
            return False
        key = (transfer_id, path)
        with self._lock:
            if key in self.broken:
                return False
            self.broken.append(key)
        return True
