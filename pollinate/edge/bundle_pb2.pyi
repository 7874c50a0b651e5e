# ruff: noqa
# mypy: ignore-errors
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Task(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_UNSPECIFIED: _ClassVar[Task]
    GENERATION: _ClassVar[Task]
    CLASSIFICATION: _ClassVar[Task]

class Quantization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    QUANTIZATION_UNSPECIFIED: _ClassVar[Quantization]
    NONE: _ClassVar[Quantization]
    INT8: _ClassVar[Quantization]
    INT4: _ClassVar[Quantization]

class AdapterMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_MODE_UNSPECIFIED: _ClassVar[AdapterMode]
    MERGED: _ClassVar[AdapterMode]
    SEPARATE: _ClassVar[AdapterMode]
TASK_UNSPECIFIED: Task
GENERATION: Task
CLASSIFICATION: Task
QUANTIZATION_UNSPECIFIED: Quantization
NONE: Quantization
INT8: Quantization
INT4: Quantization
ADAPTER_MODE_UNSPECIFIED: AdapterMode
MERGED: AdapterMode
SEPARATE: AdapterMode

class FileDigest(_message.Message):
    __slots__ = ("name", "sha256", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    size: int
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class BaseModel(_message.Message):
    __slots__ = ("name", "architecture", "model_type", "num_parameters", "seed", "weights_sha256", "seeded", "base_delta_sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    SEEDED_FIELD_NUMBER: _ClassVar[int]
    BASE_DELTA_SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    architecture: str
    model_type: str
    num_parameters: int
    seed: int
    weights_sha256: str
    seeded: bool
    base_delta_sha256: str
    def __init__(self, name: _Optional[str] = ..., architecture: _Optional[str] = ..., model_type: _Optional[str] = ..., num_parameters: _Optional[int] = ..., seed: _Optional[int] = ..., weights_sha256: _Optional[str] = ..., seeded: bool = ..., base_delta_sha256: _Optional[str] = ...) -> None: ...

class LoraInput(_message.Message):
    __slots__ = ("name", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Graph(_message.Message):
    __slots__ = ("file", "opset", "ir_version", "quantization", "quantization_block_size", "num_layers", "num_kv_heads", "head_dim", "vocab_size", "max_positions", "lora_inputs")
    FILE_FIELD_NUMBER: _ClassVar[int]
    OPSET_FIELD_NUMBER: _ClassVar[int]
    IR_VERSION_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    LORA_INPUTS_FIELD_NUMBER: _ClassVar[int]
    file: str
    opset: int
    ir_version: int
    quantization: Quantization
    quantization_block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    lora_inputs: _containers.RepeatedCompositeFieldContainer[LoraInput]
    def __init__(self, file: _Optional[str] = ..., opset: _Optional[int] = ..., ir_version: _Optional[int] = ..., quantization: _Optional[_Union[Quantization, str]] = ..., quantization_block_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_positions: _Optional[int] = ..., lora_inputs: _Optional[_Iterable[_Union[LoraInput, _Mapping]]] = ...) -> None: ...

class Adapter(_message.Message):
    __slots__ = ("file", "sha256", "size", "base_weights_sha256", "rank", "alpha", "targets", "modules_to_save", "source", "round", "source_sha256", "use_rslora")
    FILE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    BASE_WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    MODULES_TO_SAVE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SHA256_FIELD_NUMBER: _ClassVar[int]
    USE_RSLORA_FIELD_NUMBER: _ClassVar[int]
    file: str
    sha256: str
    size: int
    base_weights_sha256: str
    rank: int
    alpha: float
    targets: _containers.RepeatedScalarFieldContainer[str]
    modules_to_save: _containers.RepeatedScalarFieldContainer[str]
    source: str
    round: int
    source_sha256: str
    use_rslora: bool
    def __init__(self, file: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., base_weights_sha256: _Optional[str] = ..., rank: _Optional[int] = ..., alpha: _Optional[float] = ..., targets: _Optional[_Iterable[str]] = ..., modules_to_save: _Optional[_Iterable[str]] = ..., source: _Optional[str] = ..., round: _Optional[int] = ..., source_sha256: _Optional[str] = ..., use_rslora: bool = ...) -> None: ...

class TokenizerInfo(_message.Message):
    __slots__ = ("file", "chat_template_file", "eos_token_ids", "pad_token_id", "bos_token_id", "max_length")
    FILE_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FILE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PAD_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    BOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    file: str
    chat_template_file: str
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    pad_token_id: int
    bos_token_id: int
    max_length: int
    def __init__(self, file: _Optional[str] = ..., chat_template_file: _Optional[str] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., pad_token_id: _Optional[int] = ..., bos_token_id: _Optional[int] = ..., max_length: _Optional[int] = ...) -> None: ...

class GenerationDefaults(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_p")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ...) -> None: ...

class BundleManifest(_message.Message):
    __slots__ = ("format_version", "pollinate_version", "task", "base", "graph", "adapter_mode", "adapter", "tokenizer", "generation", "labels", "files", "producer")
    class ProducerEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    POLLINATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_MODE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    pollinate_version: str
    task: Task
    base: BaseModel
    graph: Graph
    adapter_mode: AdapterMode
    adapter: Adapter
    tokenizer: TokenizerInfo
    generation: GenerationDefaults
    labels: _containers.RepeatedScalarFieldContainer[str]
    files: _containers.RepeatedCompositeFieldContainer[FileDigest]
    producer: _containers.ScalarMap[str, str]
    def __init__(self, format_version: _Optional[int] = ..., pollinate_version: _Optional[str] = ..., task: _Optional[_Union[Task, str]] = ..., base: _Optional[_Union[BaseModel, _Mapping]] = ..., graph: _Optional[_Union[Graph, _Mapping]] = ..., adapter_mode: _Optional[_Union[AdapterMode, str]] = ..., adapter: _Optional[_Union[Adapter, _Mapping]] = ..., tokenizer: _Optional[_Union[TokenizerInfo, _Mapping]] = ..., generation: _Optional[_Union[GenerationDefaults, _Mapping]] = ..., labels: _Optional[_Iterable[str]] = ..., files: _Optional[_Iterable[_Union[FileDigest, _Mapping]]] = ..., producer: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AdapterManifest(_message.Message):
    __slots__ = ("format_version", "pollinate_version", "adapter")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    POLLINATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    pollinate_version: str
    adapter: Adapter
    def __init__(self, format_version: _Optional[int] = ..., pollinate_version: _Optional[str] = ..., adapter: _Optional[_Union[Adapter, _Mapping]] = ...) -> None: ...

class SignedManifest(_message.Message):
    __slots__ = ("payload_type", "payload", "signature_algorithm", "key_id", "signature")
    PAYLOAD_TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    payload_type: str
    payload: bytes
    signature_algorithm: str
    key_id: str
    signature: bytes
    def __init__(self, payload_type: _Optional[str] = ..., payload: _Optional[bytes] = ..., signature_algorithm: _Optional[str] = ..., key_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...
