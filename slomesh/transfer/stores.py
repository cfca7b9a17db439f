"""Store adapters: where transferred objects live in a region, and what makes two ends compatible.

Three adapters, one interface (`ObjectStore`):

- `ExampleConnectorStore` with ``kind="vllm_example"``: the directory vLLM's file-based KV
  connector (``ExampleConnector``, formerly ``SharedStorageConnector``) reads and writes, its
  ``kv_connector_extra_config.shared_storage_path``. vLLM 0.32 writes one folder per stored
  prompt, ``<path>/<md5 of the prefix's token ids as int64 bytes>/<layer name>.safetensors``
  (one tensor ``kv_cache`` of shape ``[prefix tokens, ...]`` per attention layer), and on a new
  request loads the folder named by the request's own prefix if it exists. Source:
  ``vllm/distributed/kv_transfer/kv_connector/v1/example_connector.py`` (vLLM 0.32:
  ``_generate_foldername_debug``, ``align_to_block_size``, ``ReqMeta.make_meta``); the hash is
  ``vllm.utils.hashing.safe_hash``: md5, or sha256 where FIPS forbids md5.
- `ExampleConnectorStore` with ``kind="emulator"``: the same layout written by slomesh's vLLM
  emulator (``--kv-store-path``); its bytes are sized like real KV but are not KV, so it is
  only compatible with another emulator store.
- `WeightCacheStore`: a model weight cache, ``<root>/<model id>/`` holding ``config.json``,
  ``*.safetensors`` shards and index/tokenizer files, each verified by sha256.

What each adapter needs from the engine's configuration (it cannot read it from the files
alone) is in its config class: `KvStoreConfig` (model, KV block size, KV dtype, folder hash;
the engine's prefix-caching hash seed is *not* needed: the connector's folder names are plain
md5 of the tokens, independent of ``PYTHONHASHSEED`` and ``prefix_caching_hash_algo``) and
`WeightCacheConfig` (the dtype the region's engines load). A destination refuses a transfer
from an incompatible source (`ObjectStore.check_compatible`) with `IncompatibleStores`, which
the service maps to FAILED_PRECONDITION.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
import re
import struct
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from slomesh.transfer.objects import (
    DIGEST_SHA256,
    DIGEST_XXH3_128,
    KIND_KV_PREFIX,
    KIND_WEIGHTS,
    FileEntry,
    ObjectManifest,
    file_digest,
    validate_object_path,
)
from slomesh.transfer.staging import StagedObject, StagingArea

logger = logging.getLogger(__name__)

__all__ = [
    "SAFETENSORS_DTYPES",
    "WEIGHT_MANIFEST_FILE",
    "ExampleConnectorStore",
    "IncompatibleStores",
    "InvalidObjectRequest",
    "KvStoreConfig",
    "ObjectIncomplete",
    "ObjectNotFound",
    "ObjectStore",
    "SafetensorsFormatError",
    "TransferStoreError",
    "WeightCacheConfig",
    "WeightCacheStore",
    "check_expected_sha256",
    "example_connector_folder_name",
    "example_connector_lookup_tokens",
    "example_connector_stored_tokens",
    "read_safetensors_header",
    "validate_model_id",
    "write_safetensors_file",
]


# -- errors ----------------------------------------------------------------------------------


class TransferStoreError(Exception):
    """Base of the adapters' errors; `status` is the gRPC status name a service answers with."""

    status: ClassVar[str] = "INTERNAL"


class ObjectNotFound(TransferStoreError):
    """The store holds no such object or file (NOT_FOUND)."""

    status = "NOT_FOUND"


class IncompatibleStores(TransferStoreError):
    """The two ends' engine configurations differ, or an object contradicts its store's
    configuration (FAILED_PRECONDITION)."""

    status = "FAILED_PRECONDITION"


class InvalidObjectRequest(TransferStoreError, ValueError):
    """A malformed object key, path or token list (INVALID_ARGUMENT)."""

    status = "INVALID_ARGUMENT"


class ObjectIncomplete(TransferStoreError):
    """The object is still being written by its engine (UNAVAILABLE: retry later)."""

    status = "UNAVAILABLE"


# -- safetensors ---------------------------------------------------------------------------------

SAFETENSORS_DTYPES: Mapping[str, str] = {
    "bfloat16": "BF16",
    "float16": "F16",
    "half": "F16",
    "float32": "F32",
    "float": "F32",
    "fp8": "F8_E4M3",
    "fp8_e4m3": "F8_E4M3",
    "fp8_e5m2": "F8_E5M2",
    "uint8": "U8",
}
"""Engine dtype names (vLLM's ``--dtype`` / ``--kv-cache-dtype``, config.json's
``torch_dtype``) -> safetensors dtype tags. Source: the safetensors format,
https://github.com/huggingface/safetensors (``Dtype``)."""

_SAFETENSORS_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "F8_E5M2": 1, "U8": 1}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsFormatError(ValueError):
    """A file is not a complete safetensors file."""


def read_safetensors_header(path: str | Path) -> dict[str, Any]:
    """The tensor table of a safetensors file, after checking that the file is complete.

    Format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header
    length ``N``, ``N`` bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
    "__metadata__": {...}}``, then the data; offsets are relative to the data's start.

    Args:
        path: the file.

    Returns:
        {tensor name: {"dtype": str, "shape": [int, ...], "data_offsets": [int, int]}}, without
        ``__metadata__``.

    Raises:
        SafetensorsFormatError: the header is malformed, or the file is shorter or longer than
            its header says (a file still being written is shorter).
        OSError: the file cannot be read.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsFormatError(f"{path}: {size} bytes, no safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise SafetensorsFormatError(f"{path}: header length {header_len} beyond the file")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SafetensorsFormatError(f"{path}: header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        try:
            begin_off, end_off = (int(x) for x in info["data_offsets"])
            shape = [int(x) for x in info["shape"]]
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsFormatError(f"{path}: tensor {name!r} is malformed") from None
        if not 0 <= begin_off <= end_off:
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has bad data_offsets")
        width = _SAFETENSORS_DTYPE_BYTES.get(dtype)
        if width is not None and (end_off - begin_off) != width * int(
            np.prod(shape, dtype=np.int64)
        ):
            raise SafetensorsFormatError(f"{path}: tensor {name!r} size disagrees with its shape")
        end = max(end, end_off)
    if 8 + header_len + end != size:
        raise SafetensorsFormatError(
            f"{path}: {size} bytes, the header says {8 + header_len + end} (being written?)"
        )
    return header


def write_safetensors_file(
    path: str | Path, name: str, dtype: str, shape: Sequence[int], data: bytes
) -> None:
    """Writes a one-tensor safetensors file (atomically: a temporary file, then a rename).

    Args:
        path: destination file.
        name: tensor name (vLLM's ExampleConnector uses ``"kv_cache"``).
        dtype: safetensors dtype tag (`SAFETENSORS_DTYPES` values, e.g. ``"BF16"``).
        shape: tensor shape.
        data: the tensor's bytes, ``prod(shape) * dtype width`` of them.

    Raises:
        ValueError: unknown dtype, or `data` does not match the shape.
        OSError: the file cannot be written.
    """
    width = _SAFETENSORS_DTYPE_BYTES.get(dtype)
    if width is None:
        raise ValueError(f"dtype must be one of {sorted(_SAFETENSORS_DTYPE_BYTES)}, got {dtype!r}")
    if len(data) != width * int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"{len(data)} bytes do not fill a {dtype} tensor of shape {list(shape)}")
    header = json.dumps(
        {name: {"dtype": dtype, "shape": list(shape), "data_offsets": [0, len(data)]}},
        separators=(",", ":"),
    ).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        f.write(data)
    os.replace(tmp, path)


# -- vLLM ExampleConnector naming ------------------------------------------------------------------


def example_connector_stored_tokens(num_prompt_tokens: int, block_size: int) -> int:
    """Prompt tokens whose KV vLLM's ExampleConnector stores for a prompt of this length.

    ``((n - 1) // block_size) * block_size`` (``align_to_block_size(len(prompt))``): whole
    blocks, never the prompt's last token. Source: vLLM 0.32 ``example_connector.py``
    (``ReqMeta.make_meta``).
    """
    return max(0, (num_prompt_tokens - 1) // block_size * block_size)


def example_connector_lookup_tokens(num_prompt_tokens: int, block_size: int) -> int:
    """Prompt tokens whose folder vLLM's ExampleConnector looks up for a new prompt.

    ``align_to_block_size(len(prompt) - 1)`` = ``((n - 2) // block_size) * block_size``; it
    equals `example_connector_stored_tokens` except when ``n - 1`` is a multiple of the block
    size. Source: vLLM 0.32 ``example_connector.py`` (``_found_match_for_prompt``).
    """
    return max(0, (num_prompt_tokens - 2) // block_size * block_size)


def _hasher(folder_hash: str) -> Any:
    if folder_hash == "md5":
        return hashlib.md5(usedforsecurity=False)
    if folder_hash == "sha256":
        return hashlib.sha256()
    raise ValueError(f"folder_hash must be 'md5' or 'sha256', got {folder_hash!r}")


def _token_bytes(token_ids: Sequence[int]) -> bytes:
    return np.asarray(token_ids, dtype="<i8").tobytes()


def example_connector_folder_name(token_ids: Sequence[int], folder_hash: str = "md5") -> str:
    """The folder name vLLM's ExampleConnector gives the KV of exactly these tokens.

    ``safe_hash(torch.tensor(token_ids).numpy().tobytes()).hexdigest()``: the hash of the tokens
    as little-endian int64 (torch's default integer type on the little-endian hosts vLLM runs
    on); requests with multimodal inputs append their mm hashes, which this does not model.
    Source: vLLM 0.32 ``ExampleConnector._generate_foldername_debug``,
    ``vllm.utils.hashing.safe_hash``.

    Args:
        token_ids: the prefix's token ids (already cut to whole blocks).
        folder_hash: "md5" (vLLM's default) or "sha256" (vLLM under FIPS).

    Raises:
        ValueError: unknown `folder_hash`.
    """
    hasher = _hasher(folder_hash)
    hasher.update(_token_bytes(token_ids))
    return hasher.hexdigest()


# -- configs ---------------------------------------------------------------------------------------

_STORE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_MODEL_PART = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")


def validate_model_id(model: str) -> str:
    """Checks a model id used as a relative path: 1 to 4 '/'-separated parts of
    ``[A-Za-z0-9._-]`` not starting with '.' (e.g. ``meta-llama/Llama-3.1-8B-Instruct``).

    Raises:
        InvalidObjectRequest: the id does not match.
    """
    parts = model.split("/")
    if not 1 <= len(parts) <= 4 or not all(_MODEL_PART.match(p) for p in parts):
        raise InvalidObjectRequest(
            f"model must be 1-4 '/'-separated parts of [A-Za-z0-9._-] not starting with '.', "
            f"got {model!r}"
        )
    return model


class KvStoreConfig(BaseModel):
    """A KV store of one engine instance (the service's ``--kv-store`` JSON).

    Attributes:
        id: the store's id in its region (use the instance id), ``[A-Za-z0-9._:-]``.
        kind: "vllm_example" (a real vLLM's ExampleConnector directory) or "emulator" (the
            emulator's ``--kv-store-path``).
        path: the directory: vLLM's ``kv_connector_extra_config.shared_storage_path``.
        model: the model the engine serves (its ``--served-model-name``, or ``--model``).
        block_size: the engine's KV block size, tokens (``vllm:cache_config_info``
            ``block_size``: 16 on GPUs, 128 on vLLM's CPU backend); the connector stores whole
            blocks only.
        kv_dtype: the KV cache's dtype: ``--kv-cache-dtype``, or ``--dtype`` when that is
            "auto" (e.g. "bfloat16"); checked against the safetensors files.
        folder_hash: the connector's folder hash: "md5" (vLLM's ``safe_hash``), "sha256" under
            FIPS.
        num_layers: attention layers of the model (one file per layer); when set, a folder
            with fewer files is taken as still being written. None: not checked.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    kind: Literal["vllm_example", "emulator"] = "vllm_example"
    path: Path
    model: str = Field(min_length=1)
    block_size: int = Field(gt=0)
    kv_dtype: str = "bfloat16"
    folder_hash: Literal["md5", "sha256"] = "md5"
    num_layers: int | None = Field(default=None, gt=0)

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not _STORE_ID.match(value):
            raise ValueError(f"id must match [A-Za-z0-9._:-]{{1,128}}, got {value!r}")
        return value

    @field_validator("kv_dtype")
    @classmethod
    def _check_dtype(cls, value: str) -> str:
        if value not in SAFETENSORS_DTYPES:
            raise ValueError(f"kv_dtype must be one of {sorted(SAFETENSORS_DTYPES)}, got {value!r}")
        return value


class WeightCacheConfig(BaseModel):
    """A region's model weight cache (the service's ``--weight-cache`` JSON).

    Attributes:
        path: the cache's root; model ``org/name`` lives in ``<path>/org/name/``.
        dtype: the dtype the region's engines load weights in (``--dtype``); a model whose
            ``config.json`` ``torch_dtype`` differs is refused. None: any.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path
    dtype: str | None = None


# -- the interface -------------------------------------------------------------------------------


class ObjectStore(abc.ABC):
    """What the transfer service needs of a store, on both ends.

    Source side: a ``describe_*`` method (the adapter's own) and `file_path`. Destination side:
    `check_compatible`, `has_object`, `object_dir`, `staging` and `commit_extra_files`.

    Attributes:
        object_kind: `KIND_KV_PREFIX` or `KIND_WEIGHTS`.
        root: the store's directory.
        staging: the store's staging area (``root/.partial``).
    """

    object_kind: ClassVar[str]

    def __init__(self, root: Path):
        self.root = Path(root)
        self.staging = StagingArea(self.root)
        self._digest_cache: dict[tuple[str, int, int, int], str] = {}
        self._digest_lock = threading.Lock()

    @abc.abstractmethod
    def store_info(self) -> dict[str, str]:
        """The engine configuration a peer checks compatibility against."""
        ...

    @abc.abstractmethod
    def validate_key(self, object_key: str) -> str:
        """Checks an object key's syntax. Raises `InvalidObjectRequest`."""
        ...

    @abc.abstractmethod
    def check_compatible(self, manifest: ObjectManifest) -> None:
        """Checks that an object from a peer may be stored here.

        Raises:
            IncompatibleStores: the configurations differ (the message lists every field).
        """
        ...

    def object_dir(self, object_key: str) -> Path:
        """The object's directory in this store (validated key)."""
        return self.root / self.validate_key(object_key)

    def has_object(self, object_key: str) -> bool:
        """The store holds the (committed) object."""
        return self.object_dir(object_key).is_dir()

    def file_path(self, object_key: str, path: str) -> Path:
        """A file of an object, for reading.

        Raises:
            InvalidObjectRequest: malformed key or path.
            ObjectNotFound: no such object or file.
        """
        try:
            validate_object_path(path)
        except ValueError as exc:
            raise InvalidObjectRequest(str(exc)) from None
        full = self.object_dir(object_key) / path
        if not full.is_file():
            raise ObjectNotFound(f"no file {path!r} in object {object_key!r}")
        return full

    def commit_extra_files(self, staged: StagedObject) -> dict[str, bytes]:
        """Bookkeeping files written into an object when it is committed (none by default)."""
        return {}

    def _digest(self, path: Path, algo: str) -> str:
        """A file's digest, cached by (path, size, mtime, inode)."""
        st = path.stat()
        key = (f"{algo}:{path}", st.st_size, st.st_mtime_ns, st.st_ino)
        with self._digest_lock:
            cached = self._digest_cache.get(key)
        if cached is not None:
            return cached
        digest = file_digest(path, algo)
        with self._digest_lock:
            if len(self._digest_cache) > 65536:
                self._digest_cache.clear()
            self._digest_cache[key] = digest
        return digest


# -- (a), (b): ExampleConnector directories --------------------------------------------------------


class ExampleConnectorStore(ObjectStore):
    """A vLLM ExampleConnector KV directory (or the emulator's store of the same layout).

    Objects are prefix folders keyed by `example_connector_folder_name`; the source resolves
    the longest prefix of a prompt's whole blocks that has a folder (`resolve_prefix`).

    Args:
        config: the store's configuration.
    """

    object_kind = KIND_KV_PREFIX

    def __init__(self, config: KvStoreConfig):
        super().__init__(config.path)
        self.config = config

    @property
    def id(self) -> str:
        """The store's id."""
        return self.config.id

    def store_info(self) -> dict[str, str]:
        """``kind``, ``model``, ``block_size``, ``kv_dtype``, ``folder_hash``."""
        c = self.config
        return {
            "kind": c.kind,
            "model": c.model,
            "block_size": str(c.block_size),
            "kv_dtype": c.kv_dtype,
            "folder_hash": c.folder_hash,
        }

    def validate_key(self, object_key: str) -> str:
        """A folder name: lower-case hex of the folder hash's length (32 md5, 64 sha256)."""
        want = 32 if self.config.folder_hash == "md5" else 64
        if len(object_key) != want or not re.fullmatch(r"[0-9a-f]+", object_key):
            raise InvalidObjectRequest(
                f"KV folder name must be {want} hex characters ({self.config.folder_hash}), "
                f"got {object_key!r}"
            )
        return object_key

    def folder_name(self, token_ids: Sequence[int]) -> str:
        """`example_connector_folder_name` with this store's folder hash."""
        return example_connector_folder_name(token_ids, self.config.folder_hash)

    def resolve_prefix(self, token_ids: Sequence[int]) -> tuple[int, str] | None:
        """The longest whole-block prefix of `token_ids` that has a folder here.

        Hashes incrementally (one pass over the tokens, a digest copy per block boundary).

        Args:
            token_ids: a prompt's token ids.

        Returns:
            (prefix tokens, folder name), or None when no prefix of at least one block is
            stored.
        """
        bs = self.config.block_size
        data = _token_bytes(token_ids)
        hasher = _hasher(self.config.folder_hash)
        candidates: list[tuple[int, str]] = []
        for n in range(bs, len(token_ids) + 1, bs):
            hasher.update(data[(n - bs) * 8 : n * 8])
            candidates.append((n, hasher.copy().hexdigest()))
        for n, name in reversed(candidates):
            if (self.root / name).is_dir():
                return n, name
        return None

    def describe_prefix(self, token_ids: Sequence[int]) -> ObjectManifest:
        """The manifest of the longest stored whole-block prefix of `token_ids` (source side).

        Checks every layer file: a complete safetensors file with one ``kv_cache`` tensor of
        this store's KV dtype and ``prefix tokens`` rows.

        Raises:
            InvalidObjectRequest: fewer tokens than one block.
            ObjectNotFound: no prefix of the tokens is stored.
            ObjectIncomplete: the folder is still being written (a layer file short, or fewer
                files than `KvStoreConfig.num_layers`).
            IncompatibleStores: a file's dtype or token count contradicts the configuration.
        """
        bs = self.config.block_size
        if len(token_ids) < bs:
            raise InvalidObjectRequest(
                f"token_ids must hold at least one KV block ({bs} tokens), got {len(token_ids)}"
            )
        found = self.resolve_prefix(token_ids)
        if found is None:
            raise ObjectNotFound(
                f"KV store {self.id!r} holds no prefix of the {len(token_ids)} tokens "
                f"(block size {bs})"
            )
        prefix_tokens, key = found
        folder = self.root / key
        names = sorted(
            p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
        )
        if not names or (
            self.config.num_layers is not None and len(names) < self.config.num_layers
        ):
            raise ObjectIncomplete(f"KV folder {key} has {len(names)} layer files (being written?)")
        want_dtype = SAFETENSORS_DTYPES[self.config.kv_dtype]
        files = []
        for name in names:
            path = folder / name
            try:
                header = read_safetensors_header(path)
            except SafetensorsFormatError as exc:
                raise ObjectIncomplete(str(exc)) from None
            tensor = header.get("kv_cache")
            if tensor is None or len(header) != 1:
                raise IncompatibleStores(
                    f"{path}: expected one tensor 'kv_cache', got {list(header)}"
                )
            if tensor["dtype"] != want_dtype:
                raise IncompatibleStores(
                    f"{path}: KV dtype {tensor['dtype']}, store {self.id!r} is configured with "
                    f"kv_dtype={self.config.kv_dtype} ({want_dtype})"
                )
            if not tensor["shape"] or int(tensor["shape"][0]) != prefix_tokens:
                raise IncompatibleStores(
                    f"{path}: KV of {tensor['shape'][:1]} tokens in the folder of a "
                    f"{prefix_tokens}-token prefix (block size or hash differ from the engine's?)"
                )
            files.append(
                FileEntry(
                    name, path.stat().st_size, DIGEST_XXH3_128, self._digest(path, DIGEST_XXH3_128)
                )
            )
        return ObjectManifest(
            kind=KIND_KV_PREFIX,
            object_key=key,
            files=tuple(files),
            store_info=self.store_info(),
            prefix_tokens=prefix_tokens,
        )

    def check_compatible(self, manifest: ObjectManifest) -> None:
        """Refuses KV from a store of another kind, model, block size, KV dtype or folder hash.

        Raises:
            IncompatibleStores: listing every field that differs, or a manifest that is not a
                whole-block KV prefix.
        """
        if manifest.kind != KIND_KV_PREFIX:
            raise IncompatibleStores(f"KV store {self.id!r} cannot hold a {manifest.kind!r} object")
        mine = self.store_info()
        diffs = [
            f"{field}: source {manifest.store_info.get(field, '<unset>')!r} != "
            f"destination {mine[field]!r}"
            for field in ("kind", "model", "block_size", "kv_dtype", "folder_hash")
            if manifest.store_info.get(field) != mine[field]
        ]
        if diffs:
            raise IncompatibleStores(
                f"KV stores are incompatible for {manifest.object_key}: " + "; ".join(diffs)
            )
        bs = self.config.block_size
        if manifest.prefix_tokens <= 0 or manifest.prefix_tokens % bs:
            raise IncompatibleStores(
                f"KV of {manifest.prefix_tokens} tokens is not whole blocks of {bs}"
            )
        try:
            self.validate_key(manifest.object_key)
        except InvalidObjectRequest as exc:
            raise IncompatibleStores(str(exc)) from None
        for entry in manifest.files:
            if "/" in entry.path or not entry.path.endswith(".safetensors"):
                raise IncompatibleStores(f"KV file {entry.path!r} is not a layer's safetensors")


# -- (c): weight cache ---------------------------------------------------------------------------

WEIGHT_MANIFEST_FILE = ".slomesh-manifest.json"
"""Written into a model directory when a prewarm commits it: each file's size, mtime and
sha256, so that the region can serve as a source without hashing the weights again."""

_WEIGHT_FILE_NAMES = {"tokenizer.model", "merges.txt", "vocab.txt"}
_WEIGHT_SUFFIXES = (".safetensors", ".json", ".tiktoken")


class WeightCacheStore(ObjectStore):
    """A model weight cache directory: ``<root>/<model id>/`` per model.

    An object is a model's top-level files that an engine loads: ``*.safetensors`` (required,
    at least one), ``config.json`` (required), other ``*.json`` (index, generation config,
    tokenizer), ``tokenizer.model``, ``*.tiktoken``, ``merges.txt``, ``vocab.txt``; each with
    its sha256.

    Args:
        config: the cache's configuration.
    """

    object_kind = KIND_WEIGHTS

    def __init__(self, config: WeightCacheConfig):
        super().__init__(config.path)
        self.config = config

    def store_info(self) -> dict[str, str]:
        """``kind`` ("weights") and ``dtype`` (the configured one, "" when any)."""
        return {"kind": "weights", "dtype": self.config.dtype or ""}

    def validate_key(self, object_key: str) -> str:
        """A model id (`validate_model_id`)."""
        return validate_model_id(object_key)

    def describe_model(
        self, model: str, expected_sha256: Mapping[str, str] | None = None
    ) -> ObjectManifest:
        """The manifest of a model's weight files (source side).

        Args:
            model: the model id.
            expected_sha256: file path -> sha256 hex the files must have (optional).

        Returns:
            The manifest; ``store_info`` has ``kind``, ``model`` and ``dtype`` (config.json's
            ``torch_dtype``, "" when absent).

        Raises:
            InvalidObjectRequest: malformed model id.
            ObjectNotFound: the model is not in the cache.
            IncompatibleStores: no config.json or no safetensors shard, a truncated shard, or a
                file whose sha256 differs from `expected_sha256` (or that is missing).
        """
        model_dir = self.object_dir(model)
        if not model_dir.is_dir():
            raise ObjectNotFound(f"model {model!r} is not in the weight cache {self.root}")
        names = sorted(
            p.name
            for p in model_dir.iterdir()
            if p.is_file()
            and not p.name.startswith(".")
            and (p.name in _WEIGHT_FILE_NAMES or p.name.endswith(_WEIGHT_SUFFIXES))
        )
        if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
            raise IncompatibleStores(
                f"model {model!r} in {self.root} is not a safetensors model with a config.json "
                f"(files: {names})"
            )
        try:
            model_config = json.loads((model_dir / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise IncompatibleStores(f"model {model!r}: unreadable config.json: {exc}") from None
        for name in names:
            if name.endswith(".safetensors"):
                try:
                    read_safetensors_header(model_dir / name)
                except SafetensorsFormatError as exc:
                    raise IncompatibleStores(f"model {model!r}: {exc}") from None
        recorded = self._recorded_digests(model_dir)
        files = []
        for name in names:
            path = model_dir / name
            st = path.stat()
            digest = recorded.get((name, st.st_size, st.st_mtime_ns)) or self._digest(
                path, DIGEST_SHA256
            )
            files.append(FileEntry(name, st.st_size, DIGEST_SHA256, digest))
        manifest = ObjectManifest(
            kind=KIND_WEIGHTS,
            object_key=model,
            files=tuple(files),
            store_info={
                "kind": "weights",
                "model": model,
                "dtype": str(model_config.get("torch_dtype") or ""),
            },
        )
        if expected_sha256:
            check_expected_sha256(manifest, expected_sha256)
        return manifest

    def check_compatible(self, manifest: ObjectManifest) -> None:
        """Refuses a non-weights object, non-sha256 digests, or a dtype other than the
        configured one.

        Raises:
            IncompatibleStores: as above.
        """
        if manifest.kind != KIND_WEIGHTS or manifest.store_info.get("kind") != "weights":
            raise IncompatibleStores(f"the weight cache cannot hold a {manifest.kind!r} object")
        bad = [f.path for f in manifest.files if f.digest_algo != DIGEST_SHA256]
        if bad:
            raise IncompatibleStores(f"weight files must be verified by sha256: {bad}")
        dtype = manifest.store_info.get("dtype", "")
        if self.config.dtype and dtype and dtype != self.config.dtype:
            raise IncompatibleStores(
                f"model {manifest.object_key!r} is {dtype}, this region's engines load "
                f"{self.config.dtype}"
            )
        self.validate_key(manifest.object_key)

    def commit_extra_files(self, staged: StagedObject) -> dict[str, bytes]:
        """`WEIGHT_MANIFEST_FILE`: each committed file's size, mtime and verified sha256."""
        entries = {}
        for f in staged.manifest.files:
            st = staged.data_path(f.path).stat()
            entries[f.path] = {
                "size_bytes": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "sha256": f.digest,
            }
        return {WEIGHT_MANIFEST_FILE: json.dumps({"files": entries}, indent=1).encode()}

    def _recorded_digests(self, model_dir: Path) -> dict[tuple[str, int, int], str]:
        try:
            data = json.loads((model_dir / WEIGHT_MANIFEST_FILE).read_text())
            return {
                (name, int(e["size_bytes"]), int(e["mtime_ns"])): str(e["sha256"])
                for name, e in data["files"].items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}


def check_expected_sha256(manifest: ObjectManifest, expected_sha256: Mapping[str, str]) -> None:
    """Checks a weights manifest against externally known sha256 (e.g. a hub's LFS ids).

    Raises:
        IncompatibleStores: a named file is missing or its sha256 differs.
    """
    digests = {f.path: f.digest for f in manifest.files}
    problems = []
    for path, want in sorted(expected_sha256.items()):
        have = digests.get(path)
        if have is None:
            problems.append(f"{path}: missing")
        elif have != want.lower():
            problems.append(f"{path}: sha256 {have} != expected {want.lower()}")
    if problems:
        raise IncompatibleStores(
            f"model {manifest.object_key!r} does not match expected_sha256: " + "; ".join(problems)
        )
