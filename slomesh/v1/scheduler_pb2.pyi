from slomesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt_token_ids", "prompt_text", "max_tokens", "ignore_eos", "slo_class", "origin_region", "tenant", "expected_output_tokens", "priority")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    SLO_CLASS_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_REGION_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    prompt_text: str
    max_tokens: int
    ignore_eos: bool
    slo_class: str
    origin_region: str
    tenant: str
    expected_output_tokens: int
    priority: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., prompt_text: _Optional[str] = ..., max_tokens: _Optional[int] = ..., ignore_eos: _Optional[bool] = ..., slo_class: _Optional[str] = ..., origin_region: _Optional[str] = ..., tenant: _Optional[str] = ..., expected_output_tokens: _Optional[int] = ..., priority: _Optional[int] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("request_id", "region", "instance_id", "agent_endpoint", "predicted", "cached_prefix_tokens", "predicted_cost_usd", "objective", "policy", "origin_region", "slo_class", "slo_feasible", "loads_model", "kv_transfer_source_region", "kv_transfer_source_instance", "kv_transfer_prefix_tokens", "kv_transfer_bytes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    CACHED_PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_COST_USD_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_REGION_FIELD_NUMBER: _ClassVar[int]
    SLO_CLASS_FIELD_NUMBER: _ClassVar[int]
    SLO_FEASIBLE_FIELD_NUMBER: _ClassVar[int]
    LOADS_MODEL_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_SOURCE_REGION_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_SOURCE_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_BYTES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    region: str
    instance_id: str
    agent_endpoint: str
    predicted: _common_pb2.PredictedTimings
    cached_prefix_tokens: int
    predicted_cost_usd: float
    objective: float
    policy: str
    origin_region: str
    slo_class: str
    slo_feasible: bool
    loads_model: bool
    kv_transfer_source_region: str
    kv_transfer_source_instance: str
    kv_transfer_prefix_tokens: int
    kv_transfer_bytes: int
    def __init__(self, request_id: _Optional[str] = ..., region: _Optional[str] = ..., instance_id: _Optional[str] = ..., agent_endpoint: _Optional[str] = ..., predicted: _Optional[_Union[_common_pb2.PredictedTimings, _Mapping]] = ..., cached_prefix_tokens: _Optional[int] = ..., predicted_cost_usd: _Optional[float] = ..., objective: _Optional[float] = ..., policy: _Optional[str] = ..., origin_region: _Optional[str] = ..., slo_class: _Optional[str] = ..., slo_feasible: _Optional[bool] = ..., loads_model: _Optional[bool] = ..., kv_transfer_source_region: _Optional[str] = ..., kv_transfer_source_instance: _Optional[str] = ..., kv_transfer_prefix_tokens: _Optional[int] = ..., kv_transfer_bytes: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("placement", "tokens", "completion")
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    placement: Placement
    tokens: _common_pb2.TokenChunk
    completion: _common_pb2.Completion
    def __init__(self, placement: _Optional[_Union[Placement, _Mapping]] = ..., tokens: _Optional[_Union[_common_pb2.TokenChunk, _Mapping]] = ..., completion: _Optional[_Union[_common_pb2.Completion, _Mapping]] = ...) -> None: ...

class OutcomeReport(_message.Message):
    __slots__ = ("request_id", "completion", "outcome", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    completion: _common_pb2.Completion
    outcome: str
    error: str
    def __init__(self, request_id: _Optional[str] = ..., completion: _Optional[_Union[_common_pb2.Completion, _Mapping]] = ..., outcome: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class OutcomeAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
