from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TrafficClass(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FOREGROUND_KV: _ClassVar[TrafficClass]
    PREFETCH_KV: _ClassVar[TrafficClass]
    PREWARM_WEIGHTS: _ClassVar[TrafficClass]
FOREGROUND_KV: TrafficClass
PREFETCH_KV: TrafficClass
PREWARM_WEIGHTS: TrafficClass

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TransferServiceInfo(_message.Message):
    __slots__ = ("region", "link_capacity_bytes_per_s", "kv_stores", "weight_cache")
    class LinkCapacityBytesPerSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REGION_FIELD_NUMBER: _ClassVar[int]
    LINK_CAPACITY_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    KV_STORES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_CACHE_FIELD_NUMBER: _ClassVar[int]
    region: str
    link_capacity_bytes_per_s: _containers.ScalarMap[str, float]
    kv_stores: _containers.RepeatedScalarFieldContainer[str]
    weight_cache: bool
    def __init__(self, region: _Optional[str] = ..., link_capacity_bytes_per_s: _Optional[_Mapping[str, float]] = ..., kv_stores: _Optional[_Iterable[str]] = ..., weight_cache: _Optional[bool] = ...) -> None: ...

class TransferPrefixRequest(_message.Message):
    __slots__ = ("transfer_id", "model", "source_region", "source_instance_id", "destination_region", "destination_instance_id", "token_ids", "traffic_class", "deadline_unix_s")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_REGION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_REGION_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_CLASS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    model: str
    source_region: str
    source_instance_id: str
    destination_region: str
    destination_instance_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    traffic_class: TrafficClass
    deadline_unix_s: float
    def __init__(self, transfer_id: _Optional[str] = ..., model: _Optional[str] = ..., source_region: _Optional[str] = ..., source_instance_id: _Optional[str] = ..., destination_region: _Optional[str] = ..., destination_instance_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., traffic_class: _Optional[_Union[TrafficClass, str]] = ..., deadline_unix_s: _Optional[float] = ...) -> None: ...

class PrewarmRequest(_message.Message):
    __slots__ = ("transfer_id", "model", "source_region", "destination_region", "deadline_unix_s", "expected_sha256")
    class ExpectedSha256Entry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_REGION_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_REGION_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_SHA256_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    model: str
    source_region: str
    destination_region: str
    deadline_unix_s: float
    expected_sha256: _containers.ScalarMap[str, str]
    def __init__(self, transfer_id: _Optional[str] = ..., model: _Optional[str] = ..., source_region: _Optional[str] = ..., destination_region: _Optional[str] = ..., deadline_unix_s: _Optional[float] = ..., expected_sha256: _Optional[_Mapping[str, str]] = ...) -> None: ...

class TransferHandle(_message.Message):
    __slots__ = ("transfer_id", "region", "object_key", "prefix_tokens", "bytes_total", "already_present")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    OBJECT_KEY_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    region: str
    object_key: str
    prefix_tokens: int
    bytes_total: int
    already_present: bool
    def __init__(self, transfer_id: _Optional[str] = ..., region: _Optional[str] = ..., object_key: _Optional[str] = ..., prefix_tokens: _Optional[int] = ..., bytes_total: _Optional[int] = ..., already_present: _Optional[bool] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("transfer_id", "region", "min_interval_s")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    MIN_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    region: str
    min_interval_s: float
    def __init__(self, transfer_id: _Optional[str] = ..., region: _Optional[str] = ..., min_interval_s: _Optional[float] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("transfer_id", "region")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    region: str
    def __init__(self, transfer_id: _Optional[str] = ..., region: _Optional[str] = ...) -> None: ...

class TransferProgress(_message.Message):
    __slots__ = ("transfer_id", "state", "bytes_done", "bytes_total", "rate_bytes_per_s", "eta_s", "error", "error_code", "kind", "object_key", "corrupt_chunks", "retries", "resumed_bytes", "traffic_class", "region")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        QUEUED: _ClassVar[TransferProgress.State]
        RUNNING: _ClassVar[TransferProgress.State]
        COMPLETED: _ClassVar[TransferProgress.State]
        FAILED: _ClassVar[TransferProgress.State]
        CANCELLED: _ClassVar[TransferProgress.State]
    QUEUED: TransferProgress.State
    RUNNING: TransferProgress.State
    COMPLETED: TransferProgress.State
    FAILED: TransferProgress.State
    CANCELLED: TransferProgress.State
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RATE_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OBJECT_KEY_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    RESUMED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_CLASS_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    state: TransferProgress.State
    bytes_done: int
    bytes_total: int
    rate_bytes_per_s: float
    eta_s: float
    error: str
    error_code: str
    kind: str
    object_key: str
    corrupt_chunks: int
    retries: int
    resumed_bytes: int
    traffic_class: TrafficClass
    region: str
    def __init__(self, transfer_id: _Optional[str] = ..., state: _Optional[_Union[TransferProgress.State, str]] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., rate_bytes_per_s: _Optional[float] = ..., eta_s: _Optional[float] = ..., error: _Optional[str] = ..., error_code: _Optional[str] = ..., kind: _Optional[str] = ..., object_key: _Optional[str] = ..., corrupt_chunks: _Optional[int] = ..., retries: _Optional[int] = ..., resumed_bytes: _Optional[int] = ..., traffic_class: _Optional[_Union[TrafficClass, str]] = ..., region: _Optional[str] = ...) -> None: ...

class DescribeObjectRequest(_message.Message):
    __slots__ = ("kind", "store", "model", "token_ids", "requester_region")
    KIND_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_REGION_FIELD_NUMBER: _ClassVar[int]
    kind: str
    store: str
    model: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    requester_region: str
    def __init__(self, kind: _Optional[str] = ..., store: _Optional[str] = ..., model: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., requester_region: _Optional[str] = ...) -> None: ...

class FileManifest(_message.Message):
    __slots__ = ("path", "size_bytes", "digest_algo", "digest")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIGEST_ALGO_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    path: str
    size_bytes: int
    digest_algo: str
    digest: str
    def __init__(self, path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., digest_algo: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...

class ObjectManifest(_message.Message):
    __slots__ = ("kind", "object_key", "files", "store_info", "prefix_tokens")
    class StoreInfoEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    OBJECT_KEY_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    STORE_INFO_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    object_key: str
    files: _containers.RepeatedCompositeFieldContainer[FileManifest]
    store_info: _containers.ScalarMap[str, str]
    prefix_tokens: int
    def __init__(self, kind: _Optional[str] = ..., object_key: _Optional[str] = ..., files: _Optional[_Iterable[_Union[FileManifest, _Mapping]]] = ..., store_info: _Optional[_Mapping[str, str]] = ..., prefix_tokens: _Optional[int] = ...) -> None: ...

class FetchChunksRequest(_message.Message):
    __slots__ = ("transfer_id", "requester_region", "kind", "store", "object_key", "path", "offset", "chunk_bytes", "size_bytes", "traffic_class", "deadline_unix_s", "next_files")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_REGION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    OBJECT_KEY_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_CLASS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    NEXT_FILES_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    requester_region: str
    kind: str
    store: str
    object_key: str
    path: str
    offset: int
    chunk_bytes: int
    size_bytes: int
    traffic_class: TrafficClass
    deadline_unix_s: float
    next_files: _containers.RepeatedCompositeFieldContainer[FileRange]
    def __init__(self, transfer_id: _Optional[str] = ..., requester_region: _Optional[str] = ..., kind: _Optional[str] = ..., store: _Optional[str] = ..., object_key: _Optional[str] = ..., path: _Optional[str] = ..., offset: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., size_bytes: _Optional[int] = ..., traffic_class: _Optional[_Union[TrafficClass, str]] = ..., deadline_unix_s: _Optional[float] = ..., next_files: _Optional[_Iterable[_Union[FileRange, _Mapping]]] = ...) -> None: ...

class FileRange(_message.Message):
    __slots__ = ("path", "offset", "size_bytes")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    path: str
    offset: int
    size_bytes: int
    def __init__(self, path: _Optional[str] = ..., offset: _Optional[int] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("path", "offset", "data", "checksum_xxh3_64")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_XXH3_64_FIELD_NUMBER: _ClassVar[int]
    path: str
    offset: int
    data: bytes
    checksum_xxh3_64: int
    def __init__(self, path: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., checksum_xxh3_64: _Optional[int] = ...) -> None: ...
