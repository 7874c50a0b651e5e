# ruff: noqa
# mypy: ignore-errors
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    BOOL: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT64: DType
BOOL: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("session_id", "round", "step", "h", "mask")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    H_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    round: int
    step: int
    h: Tensor
    mask: Tensor
    def __init__(self, session_id: _Optional[str] = ..., round: _Optional[int] = ..., step: _Optional[int] = ..., h: _Optional[_Union[Tensor, _Mapping]] = ..., mask: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("z",)
    Z_FIELD_NUMBER: _ClassVar[int]
    z: Tensor
    def __init__(self, z: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("session_id", "round", "step", "grad_z")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    GRAD_Z_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    round: int
    step: int
    grad_z: Tensor
    def __init__(self, session_id: _Optional[str] = ..., round: _Optional[int] = ..., step: _Optional[int] = ..., grad_z: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class BackwardReply(_message.Message):
    __slots__ = ("grad_h",)
    GRAD_H_FIELD_NUMBER: _ClassVar[int]
    grad_h: Tensor
    def __init__(self, grad_h: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class EndRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class EndReply(_message.Message):
    __slots__ = ("bytes_received", "bytes_sent")
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    bytes_sent: int
    def __init__(self, bytes_received: _Optional[int] = ..., bytes_sent: _Optional[int] = ...) -> None: ...
