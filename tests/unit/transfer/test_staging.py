"""Staging area: only verified chunks are written, the journal resumes, commit is all or nothing."""

from __future__ import annotations

import json
import os

import pytest

from slomesh.transfer.chunks import ChunkChecksumError, FaultInjector, chunk_checksum
from slomesh.transfer.objects import DIGEST_SHA256, DIGEST_XXH3_128, FileEntry, ObjectManifest
from slomesh.transfer.staging import (
    PARTIAL_DIR,
    ObjectDigestError,
    StagingArea,
    validate_transfer_id,
)

CHUNK = 1000


def _object(files: dict[str, bytes], algo: str = DIGEST_XXH3_128) -> ObjectManifest:
    import hashlib

    import xxhash

    def digest(data: bytes) -> str:
        return (
            xxhash.xxh3_128_hexdigest(data)
            if algo == DIGEST_XXH3_128
            else hashlib.sha256(data).hexdigest()
        )

    return ObjectManifest(
        kind="weights",
        object_key="org/model",
        files=tuple(FileEntry(p, len(d), algo, digest(d)) for p, d in files.items()),
        store_info={"kind": "weights"},
    )


def _feed(staged, path: str, data: bytes, upto: int | None = None) -> None:
    end = len(data) if upto is None else upto
    offset = staged.verified_bytes(path)
    while offset < end:
        chunk = data[offset : min(offset + CHUNK, end)]
        staged.write_chunk(path, offset, chunk, chunk_checksum(chunk))
        offset += len(chunk)


FILES = {"a.safetensors": os.urandom(3500), "config.json": b'{"x": 1}', "sub/empty.json": b""}


def test_a_corrupt_chunk_is_never_written(tmp_path):
    staged = StagingArea(tmp_path).create("t1", _object(FILES), {"k": 1})
    data = FILES["a.safetensors"]
    good = data[:CHUNK]
    damaged = FaultInjector.corrupting([0]).on_send("t1", "a.safetensors", 0, good)
    assert damaged != good
    with pytest.raises(ChunkChecksumError):
        staged.write_chunk("a.safetensors", 0, damaged, chunk_checksum(good))
    assert staged.verified_bytes("a.safetensors") == 0
    assert staged.data_path("a.safetensors").read_bytes() == b""
    assert "chunk" not in (staged.directory / "journal").read_text()


def test_out_of_order_and_oversized_chunks_are_refused(tmp_path):
    staged = StagingArea(tmp_path).create("t1", _object(FILES), {})
    data = FILES["a.safetensors"]
    with pytest.raises(ValueError, match="expected offset 0"):
        staged.write_chunk("a.safetensors", CHUNK, data[CHUNK:], chunk_checksum(data[CHUNK:]))
    with pytest.raises(ValueError, match="past the file"):
        big = data + b"x"
        staged.write_chunk("a.safetensors", 0, big, chunk_checksum(big))
    with pytest.raises(ValueError, match="not a file"):
        staged.write_chunk("nope", 0, b"x", chunk_checksum(b"x"))


def test_journal_resumes_from_the_last_verified_chunk(tmp_path):
    area = StagingArea(tmp_path)
    staged = area.create("t1", _object(FILES), {"source_region": "tokyo"})
    data = FILES["a.safetensors"]
    _feed(staged, "a.safetensors", data, upto=2 * CHUNK)
    # A torn journal line (the process died mid-append) is ignored.
    with open(staged.directory / "journal", "ab") as f:
        f.write(b'{"op":"chunk","path":"a.safet')
    reopened = area.open("t1")
    assert reopened.spec == {"source_region": "tokyo"}
    assert reopened.verified_bytes("a.safetensors") == 2 * CHUNK
    assert reopened.resumed_bytes == 2 * CHUNK
    _feed(reopened, "a.safetensors", data)
    assert reopened.data_path("a.safetensors").read_bytes() == data


def test_replay_rechecks_chunks_on_disk(tmp_path):
    area = StagingArea(tmp_path)
    staged = area.create("t1", _object(FILES), {})
    data = FILES["a.safetensors"]
    _feed(staged, "a.safetensors", data, upto=3 * CHUNK)
    # The second chunk's bytes got lost (a crash before they reached the disk).
    with open(staged.data_path("a.safetensors"), "r+b") as f:
        f.seek(CHUNK + 10)
        f.write(b"\x00\x00\x00")
    reopened = area.open("t1")
    assert reopened.verified_bytes("a.safetensors") == CHUNK
    assert reopened.data_path("a.safetensors").stat().st_size == CHUNK


def test_commit_is_all_or_nothing(tmp_path):
    area = StagingArea(tmp_path)
    staged = area.create("t1", _object(FILES, DIGEST_SHA256), {})
    final = tmp_path / "org" / "model"
    for path, data in FILES.items():
        _feed(staged, path, data)
    staged.verify_file("a.safetensors")
    with pytest.raises(ValueError, match="unverified"):
        staged.commit(final)
    assert not final.exists()
    staged.verify_file("config.json")
    staged.verify_file("sub/empty.json")
    staged.commit(final, {".manifest.json": b"{}"})
    assert {str(p.relative_to(final)) for p in final.rglob("*") if p.is_file()} == {
        *FILES,
        ".manifest.json",
    }
    assert all((final / p).read_bytes() == d for p, d in FILES.items())
    assert not staged.directory.exists()
    assert area.transfer_ids() == []


def test_commit_refuses_to_overwrite(tmp_path):
    area = StagingArea(tmp_path)
    staged = area.create("t1", _object(FILES), {})
    for path, data in FILES.items():
        _feed(staged, path, data)
        staged.verify_file(path)
    final = tmp_path / "org" / "model"
    final.mkdir(parents=True)
    (final / "other").write_text("x")
    with pytest.raises(FileExistsError):
        staged.commit(final)
    assert (final / "other").read_text() == "x"


def test_digest_mismatch_resets_the_file(tmp_path):
    files = dict(FILES)
    manifest = _object(files)
    tampered = ObjectManifest(
        kind=manifest.kind,
        object_key=manifest.object_key,
        files=(FileEntry("a.safetensors", 3500, DIGEST_XXH3_128, "0" * 32), *manifest.files[1:]),
        store_info=manifest.store_info,
    )
    area = StagingArea(tmp_path)
    staged = area.create("t1", tampered, {})
    _feed(staged, "a.safetensors", files["a.safetensors"])
    with pytest.raises(ObjectDigestError):
        staged.verify_file("a.safetensors")
    assert staged.verified_bytes("a.safetensors") == 0
    assert area.open("t1").verified_bytes("a.safetensors") == 0
    records = [json.loads(x) for x in (staged.directory / "journal").read_text().splitlines()]
    assert records[-1] == {"op": "reset", "path": "a.safetensors"}


def test_verified_files_stay_verified_across_a_restart(tmp_path):
    area = StagingArea(tmp_path)
    staged = area.create("t1", _object(FILES), {})
    _feed(staged, "a.safetensors", FILES["a.safetensors"])
    staged.verify_file("a.safetensors")
    reopened = area.open("t1")
    assert reopened.is_file_verified("a.safetensors")
    assert not reopened.is_file_verified("config.json")


def test_staging_lives_under_partial_and_ids_are_checked(tmp_path):
    area = StagingArea(tmp_path)
    staged = area.create("t-1.a_b", _object(FILES), {})
    assert staged.directory == tmp_path / PARTIAL_DIR / "t-1.a_b"
    with pytest.raises(FileExistsError):
        area.create("t-1.a_b", _object(FILES), {})
    for bad in ("", ".x", "a/b", "x" * 129, "a b"):
        with pytest.raises(ValueError):
            validate_transfer_id(bad)
    area.discard("t-1.a_b")
    assert area.transfer_ids() == []


@pytest.mark.parametrize("algo", [DIGEST_SHA256, DIGEST_XXH3_128])
def test_the_whole_file_digest_is_computed_as_chunks_are_written(tmp_path, monkeypatch, algo):
    from slomesh.transfer import staging as staging_module

    def no_reread(*args, **kwargs):
        raise AssertionError("a file written by this object is not read back to be hashed")

    staged = StagingArea(tmp_path).create("t1", _object(FILES, algo), {})
    _feed(staged, "a.safetensors", FILES["a.safetensors"])
    monkeypatch.setattr(staging_module, "file_digest", no_reread)
    staged.verify_file("a.safetensors")
    assert staged.is_file_verified("a.safetensors")
    # A file fetched again after a reset is hashed afresh from its first chunk.
    staged.reset_file("a.safetensors")
    _feed(staged, "a.safetensors", FILES["a.safetensors"])
    staged.verify_file("a.safetensors")
    assert staged.is_file_verified("a.safetensors")


def test_a_file_resumed_after_a_restart_is_read_back_for_its_digest(tmp_path):
    area = StagingArea(tmp_path)
    data = FILES["a.safetensors"]
    _feed(area.create("t1", _object(FILES, DIGEST_SHA256), {}), "a.safetensors", data, 2000)
    resumed = area.open("t1")
    _feed(resumed, "a.safetensors", data)
    # Damage a byte written before the restart: only a read-back of the file can see it.
    path = resumed.data_path("a.safetensors")
    raw = bytearray(path.read_bytes())
    raw[10] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ObjectDigestError):
        resumed.verify_file("a.safetensors")
    assert resumed.verified_bytes("a.safetensors") == 0
