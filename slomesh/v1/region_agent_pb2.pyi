from slomesh.v1 import common_pb2 as _common_pb2
from slomesh.v1 import state_pb2 as _state_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgentGenerateRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt_token_ids", "prompt_text", "max_tokens", "ignore_eos", "instance_id", "slo_class", "origin_region")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SLO_CLASS_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_REGION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    prompt_text: str
    max_tokens: int
    ignore_eos: bool
    instance_id: str
    slo_class: str
    origin_region: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., prompt_text: _Optional[str] = ..., max_tokens: _Optional[int] = ..., ignore_eos: _Optional[bool] = ..., instance_id: _Optional[str] = ..., slo_class: _Optional[str] = ..., origin_region: _Optional[str] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("region", "instance_id", "indexed_prefix_tokens")
    REGION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    INDEXED_PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    region: str
    instance_id: str
    indexed_prefix_tokens: int
    def __init__(self, region: _Optional[str] = ..., instance_id: _Optional[str] = ..., indexed_prefix_tokens: _Optional[int] = ...) -> None: ...

class AgentGenerateResponse(_message.Message):
    __slots__ = ("started", "tokens", "completion")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    started: Started
    tokens: _common_pb2.TokenChunk
    completion: _common_pb2.Completion
    def __init__(self, started: _Optional[_Union[Started, _Mapping]] = ..., tokens: _Optional[_Union[_common_pb2.TokenChunk, _Mapping]] = ..., completion: _Optional[_Union[_common_pb2.Completion, _Mapping]] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("from_region", "sent_unix_ns")
    FROM_REGION_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    from_region: str
    sent_unix_ns: int
    def __init__(self, from_region: _Optional[str] = ..., sent_unix_ns: _Optional[int] = ...) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ("region", "received_unix_ns")
    REGION_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    region: str
    received_unix_ns: int
    def __init__(self, region: _Optional[str] = ..., received_unix_ns: _Optional[int] = ...) -> None: ...

class GetStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
