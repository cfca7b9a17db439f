from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TransferServiceInfo(_message.Message):
    __slots__ = ("region", "link_capacity_bytes_per_s")
    class LinkCapacityBytesPerSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REGION_FIELD_NUMBER: _ClassVar[int]
    LINK_CAPACITY_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    region: str
    link_capacity_bytes_per_s: _containers.ScalarMap[str, float]
    def __init__(self, region: _Optional[str] = ..., link_capacity_bytes_per_s: _Optional[_Mapping[str, float]] = ...) -> None: ...
