"""The objects a KV transfer moves: a set of files with their sizes and whole-file digests.

An object is what a store adapter (`slomesh.transfer.stores`) names by one key and what must
appear at the destination all at once or not at all:

- ``kind="kv_prefix"``: one vLLM ExampleConnector folder (``<shared_storage_path>/<hash>/``, one
  ``model.layers.N.self_attn.attn.safetensors`` per attention layer) holding a prompt prefix's
  KV; digests are xxh3_128 (fast; the data are re-computable, integrity is what matters);
- ``kind="weights"``: a model's weight files in a weight cache directory (safetensors shards,
  ``config.json``, index and tokenizer files); digests are sha256, the digest model hubs publish
  (Hugging Face's LFS object ids), so a prewarmed copy can be checked against the hub's.

A manifest is produced by the source's store adapter, sent to the destination
(`ObjectManifest.to_proto`), and checked there (`ObjectManifest.from_proto`, which refuses
unsafe paths), so a peer can never make the destination write outside the object's directory.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import xxhash

from slomesh.v1 import kv_transfer_pb2

__all__ = [
    "DIGEST_ALGOS",
    "DIGEST_SHA256",
    "DIGEST_XXH3_128",
    "KINDS",
    "KIND_KV_PREFIX",
    "KIND_WEIGHTS",
    "FileEntry",
    "ObjectManifest",
    "file_digest",
    "new_digest",
    "validate_object_path",
]

KIND_KV_PREFIX = "kv_prefix"
"""A prompt prefix's KV in a KV store (one ExampleConnector folder)."""
KIND_WEIGHTS = "weights"
"""A model's weight files in a weight cache."""
KINDS = (KIND_KV_PREFIX, KIND_WEIGHTS)

DIGEST_XXH3_128 = "xxh3_128"
"""xxHash3, 128 bits (Y. Collet, https://xxhash.com): integrity of re-computable KV."""
DIGEST_SHA256 = "sha256"
"""SHA-256 (FIPS 180-4): the digest model hubs publish for weight files."""
DIGEST_ALGOS = (DIGEST_XXH3_128, DIGEST_SHA256)

_HEX = re.compile(r"^[0-9a-f]+$")
_DIGEST_HEX_CHARS = {DIGEST_XXH3_128: 32, DIGEST_SHA256: 64}
_READ_BYTES = 4 * 1024 * 1024


def validate_object_path(path: str) -> str:
    """Checks that `path` is a safe file path inside an object's directory.

    Args:
        path: '/'-separated relative path, e.g. ``"model.layers.0.self_attn.attn.safetensors"``.

    Returns:
        `path` unchanged.

    Raises:
        ValueError: empty, absolute, with a backslash, NUL, an empty, ``.`` or ``..``
            component, a component starting with ``.`` (hidden files are the stores' own
            bookkeeping), or longer than 1024 characters (INVALID_ARGUMENT for a service).
    """
    if not path or len(path) > 1024:
        raise ValueError(f"object path must have 1..1024 characters, got {len(path)}")
    if "\\" in path or "\x00" in path or path.startswith("/"):
        raise ValueError(f"object path must be relative and '/'-separated: {path!r}")
    for part in path.split("/"):
        if not part or part in (".", "..") or part.startswith("."):
            raise ValueError(f"object path has an empty, dot or hidden component: {path!r}")
    return path


def new_digest(algo: str) -> Any:
    """A fresh incremental hasher (``update(bytes)``, ``hexdigest()``) for `algo`.

    Raises:
        ValueError: `algo` is not one of `DIGEST_ALGOS`.
    """
    if algo == DIGEST_XXH3_128:
        return xxhash.xxh3_128()
    if algo == DIGEST_SHA256:
        return hashlib.sha256()
    raise ValueError(f"digest_algo must be one of {DIGEST_ALGOS}, got {algo!r}")


def file_digest(path: str | Path, algo: str, limit_bytes: int | None = None) -> str:
    """Hex digest of a file's bytes (its first `limit_bytes` when given).

    Args:
        path: file to read.
        algo: one of `DIGEST_ALGOS`.
        limit_bytes: hash at most this many bytes; None = the whole file.

    Raises:
        ValueError: unknown `algo`.
        OSError: the file cannot be read.
    """
    hasher = new_digest(algo)
    remaining = limit_bytes
    with open(path, "rb") as f:
        while remaining is None or remaining > 0:
            want = _READ_BYTES if remaining is None else min(_READ_BYTES, remaining)
            block = f.read(want)
            if not block:
                break
            hasher.update(block)
            if remaining is not None:
                remaining -= len(block)
    return hasher.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    """One file of an object.

    Attributes:
        path: '/'-separated path relative to the object's directory (`validate_object_path`).
        size_bytes: the file's size, bytes, >= 0.
        digest_algo: one of `DIGEST_ALGOS`.
        digest: lower-case hex digest of the whole file.

    Raises:
        ValueError: a field out of range (the message names it).
    """

    path: str
    size_bytes: int
    digest_algo: str
    digest: str

    def __post_init__(self) -> None:
        validate_object_path(self.path)
        if self.size_bytes < 0:
            raise ValueError(f"size_bytes of {self.path!r} must be >= 0, got {self.size_bytes}")
        if self.digest_algo not in DIGEST_ALGOS:
            raise ValueError(
                f"digest_algo of {self.path!r} must be one of {DIGEST_ALGOS}, "
                f"got {self.digest_algo!r}"
            )
        want = _DIGEST_HEX_CHARS[self.digest_algo]
        if len(self.digest) != want or not _HEX.match(self.digest):
            raise ValueError(
                f"digest of {self.path!r} must be {want} lower-case hex characters "
                f"({self.digest_algo}), got {self.digest!r}"
            )


@dataclass(frozen=True)
class ObjectManifest:
    """An object's files and the engine configuration of the store it came from.

    Attributes:
        kind: `KIND_KV_PREFIX` or `KIND_WEIGHTS`.
        object_key: the store's name for the object: a KV folder name (hex) or a model id.
        files: the object's files, in transfer order, paths unique.
        store_info: the source store's engine configuration (``model``, ``block_size``,
            ``kv_dtype``, ...; see each adapter's `store_info`), checked by the destination.
        prefix_tokens: prompt tokens the KV covers (0 for weights).

    Raises:
        ValueError: unknown kind, empty key, no files, duplicate paths, negative
            `prefix_tokens`.
    """

    kind: str
    object_key: str
    files: tuple[FileEntry, ...]
    store_info: Mapping[str, str] = field(default_factory=dict)
    prefix_tokens: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not self.object_key:
            raise ValueError("object_key must not be empty")
        if not self.files:
            raise ValueError(f"object {self.object_key!r} has no files")
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError(f"object {self.object_key!r} lists a file twice")
        if self.prefix_tokens < 0:
            raise ValueError(f"prefix_tokens must be >= 0, got {self.prefix_tokens}")
        object.__setattr__(self, "files", tuple(self.files))
        object.__setattr__(self, "store_info", MappingProxyType(dict(self.store_info)))

    @property
    def total_bytes(self) -> int:
        """Bytes of all files."""
        return sum(f.size_bytes for f in self.files)

    def file(self, path: str) -> FileEntry:
        """The entry of `path`.

        Raises:
            KeyError: the object has no such file.
        """
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)

    def to_proto(self) -> kv_transfer_pb2.ObjectManifest:
        """The `slomesh.v1.ObjectManifest` message."""
        return kv_transfer_pb2.ObjectManifest(
            kind=self.kind,
            object_key=self.object_key,
            files=[
                kv_transfer_pb2.FileManifest(
                    path=f.path, size_bytes=f.size_bytes, digest_algo=f.digest_algo, digest=f.digest
                )
                for f in self.files
            ],
            store_info=dict(self.store_info),
            prefix_tokens=self.prefix_tokens,
        )

    @classmethod
    def from_proto(cls, msg: kv_transfer_pb2.ObjectManifest) -> ObjectManifest:
        """Decodes and validates a manifest received from a peer.

        Raises:
            ValueError: any field invalid (unsafe path, bad digest, ...).
        """
        return cls(
            kind=msg.kind,
            object_key=msg.object_key,
            files=tuple(
                FileEntry(f.path, f.size_bytes, f.digest_algo, f.digest) for f in msg.files
            ),
            store_info=dict(msg.store_info),
            prefix_tokens=msg.prefix_tokens,
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the staging area's record of the transfer)."""
        return {
            "kind": self.kind,
            "object_key": self.object_key,
            "files": [
                {
                    "path": f.path,
                    "size_bytes": f.size_bytes,
                    "digest_algo": f.digest_algo,
                    "digest": f.digest,
                }
                for f in self.files
            ],
            "store_info": dict(self.store_info),
            "prefix_tokens": self.prefix_tokens,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ObjectManifest:
        """Inverse of `to_json`.

        Raises:
            ValueError, KeyError, TypeError: malformed data.
        """
        files: Iterable[Mapping[str, Any]] = data["files"]
        return cls(
            kind=str(data["kind"]),
            object_key=str(data["object_key"]),
            files=tuple(
                FileEntry(
                    str(f["path"]), int(f["size_bytes"]), str(f["digest_algo"]), str(f["digest"])
                )
                for f in files
            ),
            store_info={str(k): str(v) for k, v in dict(data["store_info"]).items()},
            prefix_tokens=int(data.get("prefix_tokens", 0)),
        )
