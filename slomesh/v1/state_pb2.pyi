from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InstanceState(_message.Message):
    __slots__ = ("instance_id", "url", "gpu_type", "model", "healthy", "num_requests_running", "num_requests_waiting", "kv_cache_usage", "queued_prefill_tokens", "queued_decode_tokens", "prefill_tokens_per_s", "decode_tokens_per_s", "block_size", "num_gpu_blocks", "max_model_len", "price_usd_per_hour", "spot_price_usd_per_hour", "prefix_cache_queries_total", "prefix_cache_hits_total", "num_requests_outstanding", "num_indexed_blocks", "swappable", "model_load_overhead_s", "model_load_remaining_s", "decode_fit", "prefill_fit")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    GPU_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    QUEUED_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_GPU_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    PRICE_USD_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    SPOT_PRICE_USD_PER_HOUR_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERIES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HITS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_OUTSTANDING_FIELD_NUMBER: _ClassVar[int]
    NUM_INDEXED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SWAPPABLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOAD_OVERHEAD_S_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOAD_REMAINING_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIT_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIT_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    url: str
    gpu_type: str
    model: str
    healthy: bool
    num_requests_running: int
    num_requests_waiting: int
    kv_cache_usage: float
    queued_prefill_tokens: int
    queued_decode_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    block_size: int
    num_gpu_blocks: int
    max_model_len: int
    price_usd_per_hour: float
    spot_price_usd_per_hour: float
    prefix_cache_queries_total: int
    prefix_cache_hits_total: int
    num_requests_outstanding: int
    num_indexed_blocks: int
    swappable: bool
    model_load_overhead_s: float
    model_load_remaining_s: float
    decode_fit: OnlineLatencyFit
    prefill_fit: OnlineLatencyFit
    def __init__(self, instance_id: _Optional[str] = ..., url: _Optional[str] = ..., gpu_type: _Optional[str] = ..., model: _Optional[str] = ..., healthy: _Optional[bool] = ..., num_requests_running: _Optional[int] = ..., num_requests_waiting: _Optional[int] = ..., kv_cache_usage: _Optional[float] = ..., queued_prefill_tokens: _Optional[int] = ..., queued_decode_tokens: _Optional[int] = ..., prefill_tokens_per_s: _Optional[float] = ..., decode_tokens_per_s: _Optional[float] = ..., block_size: _Optional[int] = ..., num_gpu_blocks: _Optional[int] = ..., max_model_len: _Optional[int] = ..., price_usd_per_hour: _Optional[float] = ..., spot_price_usd_per_hour: _Optional[float] = ..., prefix_cache_queries_total: _Optional[int] = ..., prefix_cache_hits_total: _Optional[int] = ..., num_requests_outstanding: _Optional[int] = ..., num_indexed_blocks: _Optional[int] = ..., swappable: _Optional[bool] = ..., model_load_overhead_s: _Optional[float] = ..., model_load_remaining_s: _Optional[float] = ..., decode_fit: _Optional[_Union[OnlineLatencyFit, _Mapping]] = ..., prefill_fit: _Optional[_Union[OnlineLatencyFit, _Mapping]] = ...) -> None: ...

class RegionState(_message.Message):
    __slots__ = ("region", "seq", "timestamp_unix_ns", "agent_endpoint", "instances", "agent_incarnation", "egress_usd_per_gb", "weight_cache_models", "weight_cache_gb_per_s", "remote_weights_gb_per_s")
    REGION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    AGENT_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    AGENT_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    EGRESS_USD_PER_GB_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_CACHE_MODELS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_CACHE_GB_PER_S_FIELD_NUMBER: _ClassVar[int]
    REMOTE_WEIGHTS_GB_PER_S_FIELD_NUMBER: _ClassVar[int]
    region: str
    seq: int
    timestamp_unix_ns: int
    agent_endpoint: str
    instances: _containers.RepeatedCompositeFieldContainer[InstanceState]
    agent_incarnation: str
    egress_usd_per_gb: float
    weight_cache_models: _containers.RepeatedScalarFieldContainer[str]
    weight_cache_gb_per_s: float
    remote_weights_gb_per_s: float
    def __init__(self, region: _Optional[str] = ..., seq: _Optional[int] = ..., timestamp_unix_ns: _Optional[int] = ..., agent_endpoint: _Optional[str] = ..., instances: _Optional[_Iterable[_Union[InstanceState, _Mapping]]] = ..., agent_incarnation: _Optional[str] = ..., egress_usd_per_gb: _Optional[float] = ..., weight_cache_models: _Optional[_Iterable[str]] = ..., weight_cache_gb_per_s: _Optional[float] = ..., remote_weights_gb_per_s: _Optional[float] = ...) -> None: ...

class InstanceBlockDelta(_message.Message):
    __slots__ = ("instance_id", "stored_keys", "removed_keys", "cleared", "block_size")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    STORED_KEYS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_KEYS_FIELD_NUMBER: _ClassVar[int]
    CLEARED_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    stored_keys: _containers.RepeatedScalarFieldContainer[int]
    removed_keys: _containers.RepeatedScalarFieldContainer[int]
    cleared: bool
    block_size: int
    def __init__(self, instance_id: _Optional[str] = ..., stored_keys: _Optional[_Iterable[int]] = ..., removed_keys: _Optional[_Iterable[int]] = ..., cleared: _Optional[bool] = ..., block_size: _Optional[int] = ...) -> None: ...

class KvIndexDelta(_message.Message):
    __slots__ = ("region", "seq", "timestamp_unix_ns", "instances", "agent_incarnation")
    REGION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    AGENT_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    region: str
    seq: int
    timestamp_unix_ns: int
    instances: _containers.RepeatedCompositeFieldContainer[InstanceBlockDelta]
    agent_incarnation: str
    def __init__(self, region: _Optional[str] = ..., seq: _Optional[int] = ..., timestamp_unix_ns: _Optional[int] = ..., instances: _Optional[_Iterable[_Union[InstanceBlockDelta, _Mapping]]] = ..., agent_incarnation: _Optional[str] = ...) -> None: ...

class KvIndexSnapshot(_message.Message):
    __slots__ = ("region", "seq", "timestamp_unix_ns", "instances", "agent_incarnation")
    REGION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    AGENT_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    region: str
    seq: int
    timestamp_unix_ns: int
    instances: _containers.RepeatedCompositeFieldContainer[InstanceBlockDelta]
    agent_incarnation: str
    def __init__(self, region: _Optional[str] = ..., seq: _Optional[int] = ..., timestamp_unix_ns: _Optional[int] = ..., instances: _Optional[_Iterable[_Union[InstanceBlockDelta, _Mapping]]] = ..., agent_incarnation: _Optional[str] = ...) -> None: ...

class OnlineLatencyFit(_message.Message):
    __slots__ = ("coefficients", "observations", "r2", "rmse_ms", "static_rmse_ms", "prediction_rmse_ms")
    COEFFICIENTS_FIELD_NUMBER: _ClassVar[int]
    OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    R2_FIELD_NUMBER: _ClassVar[int]
    RMSE_MS_FIELD_NUMBER: _ClassVar[int]
    STATIC_RMSE_MS_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_RMSE_MS_FIELD_NUMBER: _ClassVar[int]
    coefficients: _containers.RepeatedScalarFieldContainer[float]
    observations: int
    r2: float
    rmse_ms: float
    static_rmse_ms: float
    prediction_rmse_ms: float
    def __init__(self, coefficients: _Optional[_Iterable[float]] = ..., observations: _Optional[int] = ..., r2: _Optional[float] = ..., rmse_ms: _Optional[float] = ..., static_rmse_ms: _Optional[float] = ..., prediction_rmse_ms: _Optional[float] = ...) -> None: ...

class RttReport(_message.Message):
    __slots__ = ("region", "timestamp_unix_ns", "rtt_ms")
    class RttMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REGION_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    RTT_MS_FIELD_NUMBER: _ClassVar[int]
    region: str
    timestamp_unix_ns: int
    rtt_ms: _containers.ScalarMap[str, float]
    def __init__(self, region: _Optional[str] = ..., timestamp_unix_ns: _Optional[int] = ..., rtt_ms: _Optional[_Mapping[str, float]] = ...) -> None: ...

class LinkStats(_message.Message):
    __slots__ = ("capacity_bytes_per_s", "throughput_bytes_per_s", "spare_bytes_per_s", "foreground_bytes_per_s", "queued_bytes", "prefetch_bytes_per_s", "prewarm_bytes_per_s", "queued_foreground_bytes", "window_s")
    CAPACITY_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    SPARE_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    FOREGROUND_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    QUEUED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    PREWARM_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FOREGROUND_BYTES_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    capacity_bytes_per_s: float
    throughput_bytes_per_s: float
    spare_bytes_per_s: float
    foreground_bytes_per_s: float
    queued_bytes: int
    prefetch_bytes_per_s: float
    prewarm_bytes_per_s: float
    queued_foreground_bytes: int
    window_s: float
    def __init__(self, capacity_bytes_per_s: _Optional[float] = ..., throughput_bytes_per_s: _Optional[float] = ..., spare_bytes_per_s: _Optional[float] = ..., foreground_bytes_per_s: _Optional[float] = ..., queued_bytes: _Optional[int] = ..., prefetch_bytes_per_s: _Optional[float] = ..., prewarm_bytes_per_s: _Optional[float] = ..., queued_foreground_bytes: _Optional[int] = ..., window_s: _Optional[float] = ...) -> None: ...

class LinkStatsReport(_message.Message):
    __slots__ = ("region", "timestamp_unix_ns", "links")
    class LinksEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: LinkStats
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[LinkStats, _Mapping]] = ...) -> None: ...
    REGION_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    region: str
    timestamp_unix_ns: int
    links: _containers.MessageMap[str, LinkStats]
    def __init__(self, region: _Optional[str] = ..., timestamp_unix_ns: _Optional[int] = ..., links: _Optional[_Mapping[str, LinkStats]] = ...) -> None: ...
