"""Chunk checksums, chunk-size limits, manifests and the sender's fault injector."""

from __future__ import annotations

import pytest
import xxhash

from slomesh.transfer.chunks import (
    DEFAULT_CHUNK_BYTES,
    ChunkChecksumError,
    FaultInjector,
    check_chunk_bytes,
    chunk_checksum,
    read_chunk,
    verify_chunk,
)
from slomesh.transfer.objects import (
    DIGEST_SHA256,
    FileEntry,
    ObjectManifest,
    validate_object_path,
)


def test_checksum_is_xxh3_64_and_detects_a_flipped_bit():
    data = bytes(range(256)) * 10
    assert chunk_checksum(data) == xxhash.xxh3_64_intdigest(data)
    verify_chunk("f", 0, data, chunk_checksum(data))
    flipped = FaultInjector.corrupting([3]).on_send("t", "f", 3, data)
    assert sum((a ^ b).bit_count() for a, b in zip(data, flipped, strict=True)) == 1
    with pytest.raises(ChunkChecksumError, match="offset 7"):
        verify_chunk("f", 7, flipped, chunk_checksum(data))


def test_fault_injector_damages_each_chunk_once_per_transfer_and_file():
    faults = FaultInjector.corrupting([1])
    data = b"abcdef"
    assert faults.on_send("t", "f", 0, data) == data
    assert faults.on_send("t", "f", 1, data) != data
    assert faults.on_send("t", "f", 1, data) == data  # the re-sent chunk arrives intact
    assert faults.on_send("t", "g", 1, data) != data
    assert faults.corrupted == [("t", "f", 1), ("t", "g", 1)]
    breaking = FaultInjector(break_after_chunks=2)
    assert not breaking.should_break("t", "f", 1)
    assert breaking.should_break("t", "f", 2)
    assert not breaking.should_break("t", "f", 2)
    with pytest.raises(ValueError):
        FaultInjector(break_after_chunks=0)


def test_chunk_bytes_limits():
    assert check_chunk_bytes(0) == DEFAULT_CHUNK_BYTES
    assert check_chunk_bytes(65536) == 65536
    for bad in (1, 4095, 17 * 1024 * 1024):
        with pytest.raises(ValueError, match="chunk_bytes"):
            check_chunk_bytes(bad)


def test_read_chunk_stops_at_the_end(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    assert read_chunk(path, 8, 100) == b"89"
    assert read_chunk(path, 10, 100) == b""


def test_manifest_round_trip_and_unsafe_paths():
    entry = FileEntry("a/b.json", 3, DIGEST_SHA256, "a" * 64)
    manifest = ObjectManifest("weights", "org/m", (entry,), {"kind": "weights"})
    assert ObjectManifest.from_proto(manifest.to_proto()) == manifest
    assert ObjectManifest.from_json(manifest.to_json()) == manifest
    assert manifest.total_bytes == 3
    for bad in ("", "/etc/passwd", "../x", "a/../b", "a//b", ".hidden", "a\\b"):
        with pytest.raises(ValueError):
            validate_object_path(bad)
    msg = manifest.to_proto()
    msg.files[0].path = "../../escape"
    with pytest.raises(ValueError):
        ObjectManifest.from_proto(msg)
    with pytest.raises(ValueError, match="digest"):
        FileEntry("x", 1, DIGEST_SHA256, "abc")
    with pytest.raises(ValueError, match="twice"):
        ObjectManifest("weights", "m", (entry, entry))
