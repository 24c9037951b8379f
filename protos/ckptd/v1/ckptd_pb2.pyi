from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    ERROR_REASON_INVALID_REQUEST: _ClassVar[ErrorReason]
    ERROR_REASON_INCOMPLETE_STREAM: _ClassVar[ErrorReason]
    ERROR_REASON_RUN_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_STEP_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_STEP_EXISTS: _ClassVar[ErrorReason]
    ERROR_REASON_STEP_ORDER: _ClassVar[ErrorReason]
    ERROR_REASON_BUSY: _ClassVar[ErrorReason]
    ERROR_REASON_SHUTTING_DOWN: _ClassVar[ErrorReason]
    ERROR_REASON_CORRUPT_CHECKPOINT: _ClassVar[ErrorReason]
    ERROR_REASON_DATA_MISSING: _ClassVar[ErrorReason]
    ERROR_REASON_STORAGE_IN_USE: _ClassVar[ErrorReason]
    ERROR_REASON_STORAGE_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_SHARED_MEMORY_REFUSED: _ClassVar[ErrorReason]
    ERROR_REASON_INTERNAL: _ClassVar[ErrorReason]
    ERROR_REASON_STORAGE_FULL: _ClassVar[ErrorReason]
    ERROR_REASON_UNAUTHENTICATED: _ClassVar[ErrorReason]
    ERROR_REASON_PERMISSION_DENIED: _ClassVar[ErrorReason]
    ERROR_REASON_STREAM_IDLE: _ClassVar[ErrorReason]
    ERROR_REASON_STEP_INCOMPLETE: _ClassVar[ErrorReason]
    ERROR_REASON_CHAIN_LEASED: _ClassVar[ErrorReason]

class Dtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[Dtype]
    DTYPE_FLOAT32: _ClassVar[Dtype]
    DTYPE_FLOAT16: _ClassVar[Dtype]
    DTYPE_BFLOAT16: _ClassVar[Dtype]
    DTYPE_FLOAT64: _ClassVar[Dtype]
    DTYPE_INT8: _ClassVar[Dtype]
    DTYPE_INT16: _ClassVar[Dtype]
    DTYPE_INT32: _ClassVar[Dtype]
    DTYPE_INT64: _ClassVar[Dtype]
    DTYPE_UINT8: _ClassVar[Dtype]
    DTYPE_BOOL: _ClassVar[Dtype]
    DTYPE_UINT16: _ClassVar[Dtype]
    DTYPE_UINT32: _ClassVar[Dtype]
    DTYPE_UINT64: _ClassVar[Dtype]

class Policy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POLICY_UNSPECIFIED: _ClassVar[Policy]
    POLICY_LOSSY: _ClassVar[Policy]
    POLICY_EXACT: _ClassVar[Policy]
    POLICY_LOSSY_LOG: _ClassVar[Policy]
    POLICY_LOSSY_SCALED: _ClassVar[Policy]

class SaveState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAVE_STATE_UNSPECIFIED: _ClassVar[SaveState]
    SAVE_STATE_ACCEPTED: _ClassVar[SaveState]
    SAVE_STATE_ENCODING: _ClassVar[SaveState]
    SAVE_STATE_WRITING: _ClassVar[SaveState]
    SAVE_STATE_DURABLE: _ClassVar[SaveState]
    SAVE_STATE_FAILED: _ClassVar[SaveState]

class StepKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STEP_KIND_UNSPECIFIED: _ClassVar[StepKind]
    STEP_KIND_BASE: _ClassVar[StepKind]
    STEP_KIND_DELTA: _ClassVar[StepKind]
ERROR_REASON_UNSPECIFIED: ErrorReason
ERROR_REASON_INVALID_REQUEST: ErrorReason
ERROR_REASON_INCOMPLETE_STREAM: ErrorReason
ERROR_REASON_RUN_NOT_FOUND: ErrorReason
ERROR_REASON_STEP_NOT_FOUND: ErrorReason
ERROR_REASON_STEP_EXISTS: ErrorReason
ERROR_REASON_STEP_ORDER: ErrorReason
ERROR_REASON_BUSY: ErrorReason
ERROR_REASON_SHUTTING_DOWN: ErrorReason
ERROR_REASON_CORRUPT_CHECKPOINT: ErrorReason
ERROR_REASON_DATA_MISSING: ErrorReason
ERROR_REASON_STORAGE_IN_USE: ErrorReason
ERROR_REASON_STORAGE_UNAVAILABLE: ErrorReason
ERROR_REASON_SHARED_MEMORY_REFUSED: ErrorReason
ERROR_REASON_INTERNAL: ErrorReason
ERROR_REASON_STORAGE_FULL: ErrorReason
ERROR_REASON_UNAUTHENTICATED: ErrorReason
ERROR_REASON_PERMISSION_DENIED: ErrorReason
ERROR_REASON_STREAM_IDLE: ErrorReason
ERROR_REASON_STEP_INCOMPLETE: ErrorReason
ERROR_REASON_CHAIN_LEASED: ErrorReason
DTYPE_UNSPECIFIED: Dtype
DTYPE_FLOAT32: Dtype
DTYPE_FLOAT16: Dtype
DTYPE_BFLOAT16: Dtype
DTYPE_FLOAT64: Dtype
DTYPE_INT8: Dtype
DTYPE_INT16: Dtype
DTYPE_INT32: Dtype
DTYPE_INT64: Dtype
DTYPE_UINT8: Dtype
DTYPE_BOOL: Dtype
DTYPE_UINT16: Dtype
DTYPE_UINT32: Dtype
DTYPE_UINT64: Dtype
POLICY_UNSPECIFIED: Policy
POLICY_LOSSY: Policy
POLICY_EXACT: Policy
POLICY_LOSSY_LOG: Policy
POLICY_LOSSY_SCALED: Policy
SAVE_STATE_UNSPECIFIED: SaveState
SAVE_STATE_ACCEPTED: SaveState
SAVE_STATE_ENCODING: SaveState
SAVE_STATE_WRITING: SaveState
SAVE_STATE_DURABLE: SaveState
SAVE_STATE_FAILED: SaveState
STEP_KIND_UNSPECIFIED: StepKind
STEP_KIND_BASE: StepKind
STEP_KIND_DELTA: StepKind

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "policy", "bits", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: Dtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    policy: Policy
    bits: int
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[Dtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., policy: _Optional[_Union[Policy, str]] = ..., bits: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class SharedMemoryRef(_message.Message):
    __slots__ = ("segment_name", "segment_bytes", "offsets")
    SEGMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    segment_name: str
    segment_bytes: int
    offsets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, segment_name: _Optional[str] = ..., segment_bytes: _Optional[int] = ..., offsets: _Optional[_Iterable[int]] = ...) -> None: ...

class SaveHeader(_message.Message):
    __slots__ = ("run", "rank", "step", "tensors", "metadata", "shared_memory", "fail_if_busy", "metrics", "world_size", "reshardable")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    FAIL_IF_BUSY_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RESHARDABLE_FIELD_NUMBER: _ClassVar[int]
    run: str
    rank: int
    step: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    metadata: _containers.ScalarMap[str, str]
    shared_memory: SharedMemoryRef
    fail_if_busy: bool
    metrics: _containers.ScalarMap[str, float]
    world_size: int
    reshardable: bool
    def __init__(self, run: _Optional[str] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., shared_memory: _Optional[_Union[SharedMemoryRef, _Mapping]] = ..., fail_if_busy: _Optional[bool] = ..., metrics: _Optional[_Mapping[str, float]] = ..., world_size: _Optional[int] = ..., reshardable: _Optional[bool] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("tensor_index", "offset", "data")
    TENSOR_INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    tensor_index: int
    offset: int
    data: bytes
    def __init__(self, tensor_index: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class SaveRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: SaveHeader
    chunk: TensorChunk
    def __init__(self, header: _Optional[_Union[SaveHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class StepRef(_message.Message):
    __slots__ = ("run", "rank", "step")
    RUN_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    run: str
    rank: int
    step: int
    def __init__(self, run: _Optional[str] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class SaveStatus(_message.Message):
    __slots__ = ("ref", "state", "error")
    REF_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ref: StepRef
    state: SaveState
    error: str
    def __init__(self, ref: _Optional[_Union[StepRef, _Mapping]] = ..., state: _Optional[_Union[SaveState, str]] = ..., error: _Optional[str] = ...) -> None: ...

class SaveResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: SaveStatus
    def __init__(self, status: _Optional[_Union[SaveStatus, _Mapping]] = ...) -> None: ...

class WaitSaveRequest(_message.Message):
    __slots__ = ("ref", "timeout_s")
    REF_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    ref: StepRef
    timeout_s: float
    def __init__(self, ref: _Optional[_Union[StepRef, _Mapping]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class WaitSaveResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: SaveStatus
    def __init__(self, status: _Optional[_Union[SaveStatus, _Mapping]] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("run", "rank", "step", "allow_incomplete", "shared_memory")
    RUN_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ALLOW_INCOMPLETE_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    run: str
    rank: int
    step: int
    allow_incomplete: bool
    shared_memory: SharedMemoryRef
    def __init__(self, run: _Optional[str] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., allow_incomplete: _Optional[bool] = ..., shared_memory: _Optional[_Union[SharedMemoryRef, _Mapping]] = ...) -> None: ...

class RestoreHeader(_message.Message):
    __slots__ = ("ref", "tensors", "metadata", "checksum", "shared_memory")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REF_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    ref: StepRef
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    metadata: _containers.ScalarMap[str, str]
    checksum: str
    shared_memory: SharedMemoryRef
    def __init__(self, ref: _Optional[_Union[StepRef, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., checksum: _Optional[str] = ..., shared_memory: _Optional[_Union[SharedMemoryRef, _Mapping]] = ...) -> None: ...

class RestoreResponse(_message.Message):
    __slots__ = ("header", "chunk", "segment_ready")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_READY_FIELD_NUMBER: _ClassVar[int]
    header: RestoreHeader
    chunk: TensorChunk
    segment_ready: int
    def __init__(self, header: _Optional[_Union[RestoreHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., segment_ready: _Optional[int] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RunInfo(_message.Message):
    __slots__ = ("run", "rank", "step_count", "latest_step", "stored_bytes", "retention", "hidden_steps", "hidden_bytes")
    RUN_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_COUNT_FIELD_NUMBER: _ClassVar[int]
    LATEST_STEP_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RETENTION_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STEPS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_BYTES_FIELD_NUMBER: _ClassVar[int]
    run: str
    rank: int
    step_count: int
    latest_step: int
    stored_bytes: int
    retention: RetentionPolicy
    hidden_steps: int
    hidden_bytes: int
    def __init__(self, run: _Optional[str] = ..., rank: _Optional[int] = ..., step_count: _Optional[int] = ..., latest_step: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., retention: _Optional[_Union[RetentionPolicy, _Mapping]] = ..., hidden_steps: _Optional[int] = ..., hidden_bytes: _Optional[int] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunInfo]
    def __init__(self, runs: _Optional[_Iterable[_Union[RunInfo, _Mapping]]] = ...) -> None: ...

class ListStepsRequest(_message.Message):
    __slots__ = ("run", "rank")
    RUN_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    run: str
    rank: int
    def __init__(self, run: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...

class StepInfo(_message.Message):
    __slots__ = ("step", "kind", "parent_step", "raw_bytes", "stored_bytes", "compression_ratio", "chain_depth", "created_unix_s", "metrics", "world_size", "missing_ranks")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARENT_STEP_FIELD_NUMBER: _ClassVar[int]
    RAW_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_RATIO_FIELD_NUMBER: _ClassVar[int]
    CHAIN_DEPTH_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    MISSING_RANKS_FIELD_NUMBER: _ClassVar[int]
    step: int
    kind: StepKind
    parent_step: int
    raw_bytes: int
    stored_bytes: int
    compression_ratio: float
    chain_depth: int
    created_unix_s: float
    metrics: _containers.ScalarMap[str, float]
    world_size: int
    missing_ranks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, step: _Optional[int] = ..., kind: _Optional[_Union[StepKind, str]] = ..., parent_step: _Optional[int] = ..., raw_bytes: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., compression_ratio: _Optional[float] = ..., chain_depth: _Optional[int] = ..., created_unix_s: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., world_size: _Optional[int] = ..., missing_ranks: _Optional[_Iterable[int]] = ...) -> None: ...

class ListStepsResponse(_message.Message):
    __slots__ = ("steps",)
    STEPS_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[StepInfo]
    def __init__(self, steps: _Optional[_Iterable[_Union[StepInfo, _Mapping]]] = ...) -> None: ...

class DeleteStepRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: StepRef
    def __init__(self, ref: _Optional[_Union[StepRef, _Mapping]] = ...) -> None: ...

class DeleteStepResponse(_message.Message):
    __slots__ = ("deleted_steps",)
    DELETED_STEPS_FIELD_NUMBER: _ClassVar[int]
    deleted_steps: int
    def __init__(self, deleted_steps: _Optional[int] = ...) -> None: ...

class DeleteRunRequest(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: str
    def __init__(self, run: _Optional[str] = ...) -> None: ...

class DeleteRunResponse(_message.Message):
    __slots__ = ("deleted_steps",)
    DELETED_STEPS_FIELD_NUMBER: _ClassVar[int]
    deleted_steps: int
    def __init__(self, deleted_steps: _Optional[int] = ...) -> None: ...

class RetentionPolicy(_message.Message):
    __slots__ = ("keep_last", "keep_every", "keep_interval_s", "keep_best", "best_metric", "best_mode", "max_bytes")
    KEEP_LAST_FIELD_NUMBER: _ClassVar[int]
    KEEP_EVERY_FIELD_NUMBER: _ClassVar[int]
    KEEP_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    KEEP_BEST_FIELD_NUMBER: _ClassVar[int]
    BEST_METRIC_FIELD_NUMBER: _ClassVar[int]
    BEST_MODE_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    keep_last: int
    keep_every: int
    keep_interval_s: float
    keep_best: int
    best_metric: str
    best_mode: str
    max_bytes: int
    def __init__(self, keep_last: _Optional[int] = ..., keep_every: _Optional[int] = ..., keep_interval_s: _Optional[float] = ..., keep_best: _Optional[int] = ..., best_metric: _Optional[str] = ..., best_mode: _Optional[str] = ..., max_bytes: _Optional[int] = ...) -> None: ...

class SetRetentionRequest(_message.Message):
    __slots__ = ("run", "policy")
    RUN_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    run: str
    policy: RetentionPolicy
    def __init__(self, run: _Optional[str] = ..., policy: _Optional[_Union[RetentionPolicy, _Mapping]] = ...) -> None: ...

class SetRetentionResponse(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: RetentionPolicy
    def __init__(self, policy: _Optional[_Union[RetentionPolicy, _Mapping]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "api_version", "storage_url", "max_inflight_bytes", "max_message_bytes", "max_chunk_bytes", "max_checkpoint_bytes", "max_tensors", "default_bits", "base_interval", "shared_memory", "hostname", "boot_id", "lossy_min_elements", "auto_bits_max_error", "auto_bits_relative_to", "buckets_per_octave")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    STORAGE_URL_FIELD_NUMBER: _ClassVar[int]
    MAX_INFLIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHECKPOINT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TENSORS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_BITS_FIELD_NUMBER: _ClassVar[int]
    BASE_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    BOOT_ID_FIELD_NUMBER: _ClassVar[int]
    LOSSY_MIN_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    AUTO_BITS_MAX_ERROR_FIELD_NUMBER: _ClassVar[int]
    AUTO_BITS_RELATIVE_TO_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_PER_OCTAVE_FIELD_NUMBER: _ClassVar[int]
    version: str
    api_version: str
    storage_url: str
    max_inflight_bytes: int
    max_message_bytes: int
    max_chunk_bytes: int
    max_checkpoint_bytes: int
    max_tensors: int
    default_bits: int
    base_interval: int
    shared_memory: bool
    hostname: str
    boot_id: str
    lossy_min_elements: int
    auto_bits_max_error: float
    auto_bits_relative_to: str
    buckets_per_octave: int
    def __init__(self, version: _Optional[str] = ..., api_version: _Optional[str] = ..., storage_url: _Optional[str] = ..., max_inflight_bytes: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., max_checkpoint_bytes: _Optional[int] = ..., max_tensors: _Optional[int] = ..., default_bits: _Optional[int] = ..., base_interval: _Optional[int] = ..., shared_memory: _Optional[bool] = ..., hostname: _Optional[str] = ..., boot_id: _Optional[str] = ..., lossy_min_elements: _Optional[int] = ..., auto_bits_max_error: _Optional[float] = ..., auto_bits_relative_to: _Optional[str] = ..., buckets_per_octave: _Optional[int] = ...) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: ServerInfo
    def __init__(self, info: _Optional[_Union[ServerInfo, _Mapping]] = ...) -> None: ...
