from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HardwareProfile(_message.Message):
    __slots__ = ("hardware_class", "arch", "accelerators", "execution_providers", "cpu_count", "memory_bytes", "os")
    HARDWARE_CLASS_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    ACCELERATORS_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    OS_FIELD_NUMBER: _ClassVar[int]
    hardware_class: str
    arch: str
    accelerators: _containers.RepeatedScalarFieldContainer[str]
    execution_providers: _containers.RepeatedScalarFieldContainer[str]
    cpu_count: int
    memory_bytes: int
    os: str
    def __init__(self, hardware_class: _Optional[str] = ..., arch: _Optional[str] = ..., accelerators: _Optional[_Iterable[str]] = ..., execution_providers: _Optional[_Iterable[str]] = ..., cpu_count: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., os: _Optional[str] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("token", "requested_id", "labels", "hardware", "csr_pem", "agent_version")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    token: str
    requested_id: str
    labels: _containers.ScalarMap[str, str]
    hardware: HardwareProfile
    csr_pem: bytes
    agent_version: str
    def __init__(self, token: _Optional[str] = ..., requested_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., hardware: _Optional[_Union[HardwareProfile, _Mapping]] = ..., csr_pem: _Optional[bytes] = ..., agent_version: _Optional[str] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("device_id", "device_secret", "certificate_pem", "ca_pem", "labels", "not_after_ms")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SECRET_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    device_secret: str
    certificate_pem: bytes
    ca_pem: bytes
    labels: _containers.ScalarMap[str, str]
    not_after_ms: int
    def __init__(self, device_id: _Optional[str] = ..., device_secret: _Optional[str] = ..., certificate_pem: _Optional[bytes] = ..., ca_pem: _Optional[bytes] = ..., labels: _Optional[_Mapping[str, str]] = ..., not_after_ms: _Optional[int] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("csr_pem",)
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    csr_pem: bytes
    def __init__(self, csr_pem: _Optional[bytes] = ...) -> None: ...

class RenewResponse(_message.Message):
    __slots__ = ("certificate_pem", "ca_pem", "not_after_ms")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: bytes
    ca_pem: bytes
    not_after_ms: int
    def __init__(self, certificate_pem: _Optional[bytes] = ..., ca_pem: _Optional[bytes] = ..., not_after_ms: _Optional[int] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "state")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    state: ActualState
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., state: _Optional[_Union[ActualState, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("device_id", "labels", "hardware", "agent_version", "state")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    labels: _containers.ScalarMap[str, str]
    hardware: HardwareProfile
    agent_version: str
    state: ActualState
    def __init__(self, device_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., hardware: _Optional[_Union[HardwareProfile, _Mapping]] = ..., agent_version: _Optional[str] = ..., state: _Optional[_Union[ActualState, _Mapping]] = ...) -> None: ...

class ModelSlot(_message.Message):
    __slots__ = ("role", "version", "sha256", "loaded", "execution_providers")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    role: str
    version: str
    sha256: str
    loaded: bool
    execution_providers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, role: _Optional[str] = ..., version: _Optional[str] = ..., sha256: _Optional[str] = ..., loaded: _Optional[bool] = ..., execution_providers: _Optional[_Iterable[str]] = ...) -> None: ...

class UpdateStatus(_message.Message):
    __slots__ = ("target_version", "target_role", "state", "error", "failed_version", "attempt", "updated_at_ms", "bytes_done", "bytes_total")
    TARGET_VERSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_ROLE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FAILED_VERSION_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    target_version: str
    target_role: str
    state: str
    error: str
    failed_version: str
    attempt: int
    updated_at_ms: int
    bytes_done: int
    bytes_total: int
    def __init__(self, target_version: _Optional[str] = ..., target_role: _Optional[str] = ..., state: _Optional[str] = ..., error: _Optional[str] = ..., failed_version: _Optional[str] = ..., attempt: _Optional[int] = ..., updated_at_ms: _Optional[int] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ...) -> None: ...

class ModelState(_message.Message):
    __slots__ = ("model", "slots", "update")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    model: str
    slots: _containers.RepeatedCompositeFieldContainer[ModelSlot]
    update: UpdateStatus
    def __init__(self, model: _Optional[str] = ..., slots: _Optional[_Iterable[_Union[ModelSlot, _Mapping]]] = ..., update: _Optional[_Union[UpdateStatus, _Mapping]] = ...) -> None: ...

class ActualState(_message.Message):
    __slots__ = ("desired_generation", "models")
    DESIRED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    desired_generation: int
    models: _containers.RepeatedCompositeFieldContainer[ModelState]
    def __init__(self, desired_generation: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelState, _Mapping]]] = ...) -> None: ...

class ControllerMessage(_message.Message):
    __slots__ = ("desired", "notice")
    DESIRED_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    desired: DesiredState
    notice: Notice
    def __init__(self, desired: _Optional[_Union[DesiredState, _Mapping]] = ..., notice: _Optional[_Union[Notice, _Mapping]] = ...) -> None: ...

class BundleRef(_message.Message):
    __slots__ = ("version", "url", "sha256", "length", "target_path")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    TARGET_PATH_FIELD_NUMBER: _ClassVar[int]
    version: str
    url: str
    sha256: str
    length: int
    target_path: str
    def __init__(self, version: _Optional[str] = ..., url: _Optional[str] = ..., sha256: _Optional[str] = ..., length: _Optional[int] = ..., target_path: _Optional[str] = ...) -> None: ...

class ModelAssignment(_message.Message):
    __slots__ = ("model", "serving", "shadow", "shadow_sample_rate", "rollout")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    SHADOW_SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    model: str
    serving: BundleRef
    shadow: BundleRef
    shadow_sample_rate: float
    rollout: str
    def __init__(self, model: _Optional[str] = ..., serving: _Optional[_Union[BundleRef, _Mapping]] = ..., shadow: _Optional[_Union[BundleRef, _Mapping]] = ..., shadow_sample_rate: _Optional[float] = ..., rollout: _Optional[str] = ...) -> None: ...

class DesiredState(_message.Message):
    __slots__ = ("generation", "models", "telemetry_interval_ms")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    generation: int
    models: _containers.RepeatedCompositeFieldContainer[ModelAssignment]
    telemetry_interval_ms: int
    def __init__(self, generation: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelAssignment, _Mapping]]] = ..., telemetry_interval_ms: _Optional[int] = ...) -> None: ...

class Notice(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class LatencyHistogram(_message.Message):
    __slots__ = ("relative_accuracy", "buckets", "zero_count", "count", "sum", "min", "max")
    class BucketsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    RELATIVE_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    ZERO_COUNT_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    relative_accuracy: float
    buckets: _containers.ScalarMap[int, int]
    zero_count: int
    count: int
    sum: float
    min: float
    max: float
    def __init__(self, relative_accuracy: _Optional[float] = ..., buckets: _Optional[_Mapping[int, int]] = ..., zero_count: _Optional[int] = ..., count: _Optional[int] = ..., sum: _Optional[float] = ..., min: _Optional[float] = ..., max: _Optional[float] = ...) -> None: ...

class OutputAgreement(_message.Message):
    __slots__ = ("output", "samples", "cosine_sum", "cosine_min", "mean_abs_diff_sum", "max_abs_diff", "top1_agree", "top1_samples", "sums", "confusion")
    class SumsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ConfusionEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    COSINE_SUM_FIELD_NUMBER: _ClassVar[int]
    COSINE_MIN_FIELD_NUMBER: _ClassVar[int]
    MEAN_ABS_DIFF_SUM_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    TOP1_AGREE_FIELD_NUMBER: _ClassVar[int]
    TOP1_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SUMS_FIELD_NUMBER: _ClassVar[int]
    CONFUSION_FIELD_NUMBER: _ClassVar[int]
    output: str
    samples: int
    cosine_sum: float
    cosine_min: float
    mean_abs_diff_sum: float
    max_abs_diff: float
    top1_agree: int
    top1_samples: int
    sums: _containers.ScalarMap[str, float]
    confusion: _containers.ScalarMap[str, int]
    def __init__(self, output: _Optional[str] = ..., samples: _Optional[int] = ..., cosine_sum: _Optional[float] = ..., cosine_min: _Optional[float] = ..., mean_abs_diff_sum: _Optional[float] = ..., max_abs_diff: _Optional[float] = ..., top1_agree: _Optional[int] = ..., top1_samples: _Optional[int] = ..., sums: _Optional[_Mapping[str, float]] = ..., confusion: _Optional[_Mapping[str, int]] = ...) -> None: ...

class FeatureDrift(_message.Message):
    __slots__ = ("feature", "kind", "type", "counts", "reference", "samples", "psi", "ks", "js")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PSI_FIELD_NUMBER: _ClassVar[int]
    KS_FIELD_NUMBER: _ClassVar[int]
    JS_FIELD_NUMBER: _ClassVar[int]
    feature: str
    kind: str
    type: str
    counts: _containers.RepeatedScalarFieldContainer[int]
    reference: _containers.RepeatedScalarFieldContainer[float]
    samples: int
    psi: float
    ks: float
    js: float
    def __init__(self, feature: _Optional[str] = ..., kind: _Optional[str] = ..., type: _Optional[str] = ..., counts: _Optional[_Iterable[int]] = ..., reference: _Optional[_Iterable[float]] = ..., samples: _Optional[int] = ..., psi: _Optional[float] = ..., ks: _Optional[float] = ..., js: _Optional[float] = ...) -> None: ...

class ModelWindow(_message.Message):
    __slots__ = ("model", "version", "role", "compared_to", "requests", "errors", "latency_ms", "agreement", "mirrored", "shadow_dropped", "paired_serving_latency_ms", "drift", "profile_source", "cpu_ms", "paired_serving_cpu_ms")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    COMPARED_TO_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    MIRRORED_FIELD_NUMBER: _ClassVar[int]
    SHADOW_DROPPED_FIELD_NUMBER: _ClassVar[int]
    PAIRED_SERVING_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    PROFILE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    CPU_MS_FIELD_NUMBER: _ClassVar[int]
    PAIRED_SERVING_CPU_MS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    role: str
    compared_to: str
    requests: int
    errors: int
    latency_ms: LatencyHistogram
    agreement: _containers.RepeatedCompositeFieldContainer[OutputAgreement]
    mirrored: int
    shadow_dropped: int
    paired_serving_latency_ms: LatencyHistogram
    drift: _containers.RepeatedCompositeFieldContainer[FeatureDrift]
    profile_source: str
    cpu_ms: LatencyHistogram
    paired_serving_cpu_ms: LatencyHistogram
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., role: _Optional[str] = ..., compared_to: _Optional[str] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., latency_ms: _Optional[_Union[LatencyHistogram, _Mapping]] = ..., agreement: _Optional[_Iterable[_Union[OutputAgreement, _Mapping]]] = ..., mirrored: _Optional[int] = ..., shadow_dropped: _Optional[int] = ..., paired_serving_latency_ms: _Optional[_Union[LatencyHistogram, _Mapping]] = ..., drift: _Optional[_Iterable[_Union[FeatureDrift, _Mapping]]] = ..., profile_source: _Optional[str] = ..., cpu_ms: _Optional[_Union[LatencyHistogram, _Mapping]] = ..., paired_serving_cpu_ms: _Optional[_Union[LatencyHistogram, _Mapping]] = ...) -> None: ...

class UpdateEvent(_message.Message):
    __slots__ = ("model", "version", "role", "state", "reason", "at_ms")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    role: str
    state: str
    reason: str
    at_ms: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., role: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., at_ms: _Optional[int] = ...) -> None: ...

class TelemetryBatch(_message.Message):
    __slots__ = ("seq", "window_start_ms", "window_end_ms", "windows", "events")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_MS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_MS_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    window_start_ms: int
    window_end_ms: int
    windows: _containers.RepeatedCompositeFieldContainer[ModelWindow]
    events: _containers.RepeatedCompositeFieldContainer[UpdateEvent]
    def __init__(self, seq: _Optional[int] = ..., window_start_ms: _Optional[int] = ..., window_end_ms: _Optional[int] = ..., windows: _Optional[_Iterable[_Union[ModelWindow, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[UpdateEvent, _Mapping]]] = ...) -> None: ...

class TelemetryReport(_message.Message):
    __slots__ = ("device_id", "batches", "state")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    batches: _containers.RepeatedCompositeFieldContainer[TelemetryBatch]
    state: ActualState
    def __init__(self, device_id: _Optional[str] = ..., batches: _Optional[_Iterable[_Union[TelemetryBatch, _Mapping]]] = ..., state: _Optional[_Union[ActualState, _Mapping]] = ...) -> None: ...

class TelemetryAck(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, stored: _Optional[_Iterable[int]] = ...) -> None: ...
