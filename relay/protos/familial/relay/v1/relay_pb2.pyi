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
    INT8: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
INT8: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "scales")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    scales: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., scales: _Optional[bytes] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ExitPolicy(_message.Message):
    __slots__ = ("kind", "threshold")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        FIXED: _ClassVar[ExitPolicy.Kind]
        MAX_PROB: _ClassVar[ExitPolicy.Kind]
        ENTROPY: _ClassVar[ExitPolicy.Kind]
        MARGIN: _ClassVar[ExitPolicy.Kind]
    FIXED: ExitPolicy.Kind
    MAX_PROB: ExitPolicy.Kind
    ENTROPY: ExitPolicy.Kind
    MARGIN: ExitPolicy.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    kind: ExitPolicy.Kind
    threshold: float
    def __init__(self, kind: _Optional[_Union[ExitPolicy.Kind, str]] = ..., threshold: _Optional[float] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class ExitConfidence(_message.Message):
    __slots__ = ("exit", "max_prob", "entropy", "margin")
    EXIT_FIELD_NUMBER: _ClassVar[int]
    MAX_PROB_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    exit: int
    max_prob: float
    entropy: float
    margin: float
    def __init__(self, exit: _Optional[int] = ..., max_prob: _Optional[float] = ..., entropy: _Optional[float] = ..., margin: _Optional[float] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("session_id", "max_tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    max_tokens: int
    def __init__(self, session_id: _Optional[str] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class OpenSessionReply(_message.Message):
    __slots__ = ("session_id", "max_tokens", "capability")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    max_tokens: int
    capability: str
    def __init__(self, session_id: _Optional[str] = ..., max_tokens: _Optional[int] = ..., capability: _Optional[str] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("session_id", "request_id", "pos", "tokens", "hidden", "pending", "max_exit", "policy", "sampling", "fill_only", "capability")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    POS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    MAX_EXIT_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    FILL_ONLY_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    request_id: str
    pos: int
    tokens: TokenIds
    hidden: Tensor
    pending: int
    max_exit: int
    policy: ExitPolicy
    sampling: Sampling
    fill_only: bool
    capability: str
    def __init__(self, session_id: _Optional[str] = ..., request_id: _Optional[str] = ..., pos: _Optional[int] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., pending: _Optional[int] = ..., max_exit: _Optional[int] = ..., policy: _Optional[_Union[ExitPolicy, _Mapping]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., fill_only: _Optional[bool] = ..., capability: _Optional[str] = ...) -> None: ...

class TierTiming(_message.Message):
    __slots__ = ("tier", "compute_ms")
    TIER_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    tier: str
    compute_ms: float
    def __init__(self, tier: _Optional[str] = ..., compute_ms: _Optional[float] = ...) -> None: ...

class HopTiming(_message.Message):
    __slots__ = ("src", "dst", "net_ms")
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    NET_MS_FIELD_NUMBER: _ClassVar[int]
    src: str
    dst: str
    net_ms: float
    def __init__(self, src: _Optional[str] = ..., dst: _Optional[str] = ..., net_ms: _Optional[float] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("request_id", "token", "exit", "tier", "confidence", "degraded", "reason", "tiers", "hops", "length", "total_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token: int
    exit: int
    tier: str
    confidence: _containers.RepeatedCompositeFieldContainer[ExitConfidence]
    degraded: bool
    reason: str
    tiers: _containers.RepeatedCompositeFieldContainer[TierTiming]
    hops: _containers.RepeatedCompositeFieldContainer[HopTiming]
    length: int
    total_ms: float
    def __init__(self, request_id: _Optional[str] = ..., token: _Optional[int] = ..., exit: _Optional[int] = ..., tier: _Optional[str] = ..., confidence: _Optional[_Iterable[_Union[ExitConfidence, _Mapping]]] = ..., degraded: _Optional[bool] = ..., reason: _Optional[str] = ..., tiers: _Optional[_Iterable[_Union[TierTiming, _Mapping]]] = ..., hops: _Optional[_Iterable[_Union[HopTiming, _Mapping]]] = ..., length: _Optional[int] = ..., total_ms: _Optional[float] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id", "capability")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    capability: str
    def __init__(self, session_id: _Optional[str] = ..., capability: _Optional[str] = ...) -> None: ...

class CloseSessionReply(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "length", "kv_bytes", "log_bytes", "acked", "idle_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOG_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACKED_FIELD_NUMBER: _ClassVar[int]
    IDLE_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    length: int
    kv_bytes: int
    log_bytes: int
    acked: int
    idle_s: float
    def __init__(self, session_id: _Optional[str] = ..., length: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., log_bytes: _Optional[int] = ..., acked: _Optional[int] = ..., idle_s: _Optional[float] = ...) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("tier", "exits", "start_layer", "stop_layer", "sessions", "total_bytes", "max_sessions", "max_tokens", "max_total_bytes", "evicted", "served", "next", "live_sessions", "pool_slots", "pool_free_slots", "pool_bytes_per_token", "pool_max_len", "steps", "rows", "degraded", "replays", "running", "stage_s", "cpu_s", "uptime_s")
    TIER_FIELD_NUMBER: _ClassVar[int]
    EXITS_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    STOP_LAYER_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    LIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    POOL_SLOTS_FIELD_NUMBER: _ClassVar[int]
    POOL_FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    POOL_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    POOL_MAX_LEN_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    REPLAYS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    STAGE_S_FIELD_NUMBER: _ClassVar[int]
    CPU_S_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    tier: str
    exits: _containers.RepeatedScalarFieldContainer[int]
    start_layer: int
    stop_layer: int
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    total_bytes: int
    max_sessions: int
    max_tokens: int
    max_total_bytes: int
    evicted: int
    served: int
    next: str
    live_sessions: int
    pool_slots: int
    pool_free_slots: int
    pool_bytes_per_token: int
    pool_max_len: int
    steps: int
    rows: int
    degraded: int
    replays: int
    running: int
    stage_s: float
    cpu_s: float
    uptime_s: float
    def __init__(self, tier: _Optional[str] = ..., exits: _Optional[_Iterable[int]] = ..., start_layer: _Optional[int] = ..., stop_layer: _Optional[int] = ..., sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., max_sessions: _Optional[int] = ..., max_tokens: _Optional[int] = ..., max_total_bytes: _Optional[int] = ..., evicted: _Optional[int] = ..., served: _Optional[int] = ..., next: _Optional[str] = ..., live_sessions: _Optional[int] = ..., pool_slots: _Optional[int] = ..., pool_free_slots: _Optional[int] = ..., pool_bytes_per_token: _Optional[int] = ..., pool_max_len: _Optional[int] = ..., steps: _Optional[int] = ..., rows: _Optional[int] = ..., degraded: _Optional[int] = ..., replays: _Optional[int] = ..., running: _Optional[int] = ..., stage_s: _Optional[float] = ..., cpu_s: _Optional[float] = ..., uptime_s: _Optional[float] = ...) -> None: ...

class FamilyInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExitInfo(_message.Message):
    __slots__ = ("index", "layer", "val_loss")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    index: int
    layer: int
    val_loss: float
    def __init__(self, index: _Optional[int] = ..., layer: _Optional[int] = ..., val_loss: _Optional[float] = ...) -> None: ...

class TierInfo(_message.Message):
    __slots__ = ("tier", "start_layer", "stop_layer", "exits", "onnx", "address", "wire_dtype")
    TIER_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    STOP_LAYER_FIELD_NUMBER: _ClassVar[int]
    EXITS_FIELD_NUMBER: _ClassVar[int]
    ONNX_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    tier: str
    start_layer: int
    stop_layer: int
    exits: _containers.RepeatedCompositeFieldContainer[ExitInfo]
    onnx: bool
    address: str
    wire_dtype: str
    def __init__(self, tier: _Optional[str] = ..., start_layer: _Optional[int] = ..., stop_layer: _Optional[int] = ..., exits: _Optional[_Iterable[_Union[ExitInfo, _Mapping]]] = ..., onnx: _Optional[bool] = ..., address: _Optional[str] = ..., wire_dtype: _Optional[str] = ...) -> None: ...

class FamilyInfoReply(_message.Message):
    __slots__ = ("tiers", "n_exits", "complete")
    TIERS_FIELD_NUMBER: _ClassVar[int]
    N_EXITS_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedCompositeFieldContainer[TierInfo]
    n_exits: int
    complete: bool
    def __init__(self, tiers: _Optional[_Iterable[_Union[TierInfo, _Mapping]]] = ..., n_exits: _Optional[int] = ..., complete: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt_ids", "max_tokens", "sampling", "exit", "policy", "ignore_eos", "eos_ids", "deadline_ms", "step_timeout_ms", "speculative")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    EOS_IDS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    STEP_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    sampling: Sampling
    exit: int
    policy: ExitPolicy
    ignore_eos: bool
    eos_ids: _containers.RepeatedScalarFieldContainer[int]
    deadline_ms: float
    step_timeout_ms: float
    speculative: Speculative
    def __init__(self, request_id: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., exit: _Optional[int] = ..., policy: _Optional[_Union[ExitPolicy, _Mapping]] = ..., ignore_eos: _Optional[bool] = ..., eos_ids: _Optional[_Iterable[int]] = ..., deadline_ms: _Optional[float] = ..., step_timeout_ms: _Optional[float] = ..., speculative: _Optional[_Union[Speculative, _Mapping]] = ...) -> None: ...

class Speculative(_message.Message):
    __slots__ = ("draft_exit", "k", "fixed_k")
    DRAFT_EXIT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FIXED_K_FIELD_NUMBER: _ClassVar[int]
    draft_exit: int
    k: int
    fixed_k: bool
    def __init__(self, draft_exit: _Optional[int] = ..., k: _Optional[int] = ..., fixed_k: _Optional[bool] = ...) -> None: ...

class UpdateRequest(_message.Message):
    __slots__ = ("request_id", "exit")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    exit: int
    def __init__(self, request_id: _Optional[str] = ..., exit: _Optional[int] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class GenerateCall(_message.Message):
    __slots__ = ("submit", "update", "abort")
    SUBMIT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    submit: GenerateRequest
    update: UpdateRequest
    abort: AbortRequest
    def __init__(self, submit: _Optional[_Union[GenerateRequest, _Mapping]] = ..., update: _Optional[_Union[UpdateRequest, _Mapping]] = ..., abort: _Optional[_Union[AbortRequest, _Mapping]] = ...) -> None: ...

class TokenEvent(_message.Message):
    __slots__ = ("request_id", "token", "exit", "tier", "index", "degraded", "reason", "tiers", "hops", "confidence", "finish_reason", "error", "draft", "drafted", "accepted")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token: int
    exit: int
    tier: str
    index: int
    degraded: bool
    reason: str
    tiers: _containers.RepeatedCompositeFieldContainer[TierTiming]
    hops: _containers.RepeatedCompositeFieldContainer[HopTiming]
    confidence: _containers.RepeatedCompositeFieldContainer[ExitConfidence]
    finish_reason: str
    error: str
    draft: bool
    drafted: int
    accepted: int
    def __init__(self, request_id: _Optional[str] = ..., token: _Optional[int] = ..., exit: _Optional[int] = ..., tier: _Optional[str] = ..., index: _Optional[int] = ..., degraded: _Optional[bool] = ..., reason: _Optional[str] = ..., tiers: _Optional[_Iterable[_Union[TierTiming, _Mapping]]] = ..., hops: _Optional[_Iterable[_Union[HopTiming, _Mapping]]] = ..., confidence: _Optional[_Iterable[_Union[ExitConfidence, _Mapping]]] = ..., finish_reason: _Optional[str] = ..., error: _Optional[str] = ..., draft: _Optional[bool] = ..., drafted: _Optional[int] = ..., accepted: _Optional[int] = ...) -> None: ...

class TokenEvents(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[TokenEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[TokenEvent, _Mapping]]] = ...) -> None: ...

class SeqStep(_message.Message):
    __slots__ = ("seq_id", "pos", "count", "max_exit", "policy", "sampling", "fill_only", "deadline_ms", "drafts", "draft_p")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    POS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MAX_EXIT_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    FILL_ONLY_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    DRAFTS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_P_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    pos: int
    count: int
    max_exit: int
    policy: ExitPolicy
    sampling: Sampling
    fill_only: bool
    deadline_ms: float
    drafts: _containers.RepeatedScalarFieldContainer[int]
    draft_p: Tensor
    def __init__(self, seq_id: _Optional[str] = ..., pos: _Optional[int] = ..., count: _Optional[int] = ..., max_exit: _Optional[int] = ..., policy: _Optional[_Union[ExitPolicy, _Mapping]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., fill_only: _Optional[bool] = ..., deadline_ms: _Optional[float] = ..., drafts: _Optional[_Iterable[int]] = ..., draft_p: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SeqColumns(_message.Message):
    __slots__ = ("seq_id", "pos", "count", "max_exit", "deadline_ms", "fill_only", "extras")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    POS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MAX_EXIT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    FILL_ONLY_FIELD_NUMBER: _ClassVar[int]
    EXTRAS_FIELD_NUMBER: _ClassVar[int]
    seq_id: _containers.RepeatedScalarFieldContainer[str]
    pos: _containers.RepeatedScalarFieldContainer[int]
    count: _containers.RepeatedScalarFieldContainer[int]
    max_exit: _containers.RepeatedScalarFieldContainer[int]
    deadline_ms: _containers.RepeatedScalarFieldContainer[float]
    fill_only: _containers.RepeatedScalarFieldContainer[bool]
    extras: _containers.RepeatedCompositeFieldContainer[SeqExtra]
    def __init__(self, seq_id: _Optional[_Iterable[str]] = ..., pos: _Optional[_Iterable[int]] = ..., count: _Optional[_Iterable[int]] = ..., max_exit: _Optional[_Iterable[int]] = ..., deadline_ms: _Optional[_Iterable[float]] = ..., fill_only: _Optional[_Iterable[bool]] = ..., extras: _Optional[_Iterable[_Union[SeqExtra, _Mapping]]] = ...) -> None: ...

class SeqExtra(_message.Message):
    __slots__ = ("index", "policy", "sampling", "drafts", "draft_p")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    DRAFTS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_P_FIELD_NUMBER: _ClassVar[int]
    index: int
    policy: ExitPolicy
    sampling: Sampling
    drafts: _containers.RepeatedScalarFieldContainer[int]
    draft_p: Tensor
    def __init__(self, index: _Optional[int] = ..., policy: _Optional[_Union[ExitPolicy, _Mapping]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., drafts: _Optional[_Iterable[int]] = ..., draft_p: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("seqs", "hidden", "src", "call_id", "cols")
    SEQS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    seqs: _containers.RepeatedCompositeFieldContainer[SeqStep]
    hidden: Tensor
    src: str
    call_id: int
    cols: SeqColumns
    def __init__(self, seqs: _Optional[_Iterable[_Union[SeqStep, _Mapping]]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., src: _Optional[str] = ..., call_id: _Optional[int] = ..., cols: _Optional[_Union[SeqColumns, _Mapping]] = ...) -> None: ...

class SeqResult(_message.Message):
    __slots__ = ("token", "exit", "tier", "degraded", "reason", "confidence", "tiers", "hops", "length", "total_ms", "error_code", "error", "drafted", "accepted")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    token: int
    exit: int
    tier: str
    degraded: bool
    reason: str
    confidence: _containers.RepeatedCompositeFieldContainer[ExitConfidence]
    tiers: _containers.RepeatedCompositeFieldContainer[TierTiming]
    hops: _containers.RepeatedCompositeFieldContainer[HopTiming]
    length: int
    total_ms: float
    error_code: str
    error: str
    drafted: int
    accepted: int
    def __init__(self, token: _Optional[int] = ..., exit: _Optional[int] = ..., tier: _Optional[str] = ..., degraded: _Optional[bool] = ..., reason: _Optional[str] = ..., confidence: _Optional[_Iterable[_Union[ExitConfidence, _Mapping]]] = ..., tiers: _Optional[_Iterable[_Union[TierTiming, _Mapping]]] = ..., hops: _Optional[_Iterable[_Union[HopTiming, _Mapping]]] = ..., length: _Optional[int] = ..., total_ms: _Optional[float] = ..., error_code: _Optional[str] = ..., error: _Optional[str] = ..., drafted: _Optional[int] = ..., accepted: _Optional[int] = ...) -> None: ...

class ResultColumns(_message.Message):
    __slots__ = ("token", "exit", "names", "tier", "degraded", "length", "total_ms", "drafted", "accepted", "n_conf", "conf_exit", "conf_max_prob", "conf_entropy", "conf_margin", "n_timing", "timing_key", "timing_ms", "notes")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    N_CONF_FIELD_NUMBER: _ClassVar[int]
    CONF_EXIT_FIELD_NUMBER: _ClassVar[int]
    CONF_MAX_PROB_FIELD_NUMBER: _ClassVar[int]
    CONF_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    CONF_MARGIN_FIELD_NUMBER: _ClassVar[int]
    N_TIMING_FIELD_NUMBER: _ClassVar[int]
    TIMING_KEY_FIELD_NUMBER: _ClassVar[int]
    TIMING_MS_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    token: _containers.RepeatedScalarFieldContainer[int]
    exit: _containers.RepeatedScalarFieldContainer[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    tier: _containers.RepeatedScalarFieldContainer[int]
    degraded: _containers.RepeatedScalarFieldContainer[bool]
    length: _containers.RepeatedScalarFieldContainer[int]
    total_ms: _containers.RepeatedScalarFieldContainer[float]
    drafted: _containers.RepeatedScalarFieldContainer[int]
    accepted: _containers.RepeatedScalarFieldContainer[int]
    n_conf: _containers.RepeatedScalarFieldContainer[int]
    conf_exit: _containers.RepeatedScalarFieldContainer[int]
    conf_max_prob: _containers.RepeatedScalarFieldContainer[float]
    conf_entropy: _containers.RepeatedScalarFieldContainer[float]
    conf_margin: _containers.RepeatedScalarFieldContainer[float]
    n_timing: _containers.RepeatedScalarFieldContainer[int]
    timing_key: _containers.RepeatedScalarFieldContainer[int]
    timing_ms: _containers.RepeatedScalarFieldContainer[float]
    notes: _containers.RepeatedCompositeFieldContainer[ResultNote]
    def __init__(self, token: _Optional[_Iterable[int]] = ..., exit: _Optional[_Iterable[int]] = ..., names: _Optional[_Iterable[str]] = ..., tier: _Optional[_Iterable[int]] = ..., degraded: _Optional[_Iterable[bool]] = ..., length: _Optional[_Iterable[int]] = ..., total_ms: _Optional[_Iterable[float]] = ..., drafted: _Optional[_Iterable[int]] = ..., accepted: _Optional[_Iterable[int]] = ..., n_conf: _Optional[_Iterable[int]] = ..., conf_exit: _Optional[_Iterable[int]] = ..., conf_max_prob: _Optional[_Iterable[float]] = ..., conf_entropy: _Optional[_Iterable[float]] = ..., conf_margin: _Optional[_Iterable[float]] = ..., n_timing: _Optional[_Iterable[int]] = ..., timing_key: _Optional[_Iterable[int]] = ..., timing_ms: _Optional[_Iterable[float]] = ..., notes: _Optional[_Iterable[_Union[ResultNote, _Mapping]]] = ...) -> None: ...

class ResultNote(_message.Message):
    __slots__ = ("index", "reason", "error_code", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    reason: str
    error_code: str
    error: str
    def __init__(self, index: _Optional[int] = ..., reason: _Optional[str] = ..., error_code: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class StepReply(_message.Message):
    __slots__ = ("results", "tier", "call_id", "error_code", "error", "cols")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SeqResult]
    tier: str
    call_id: int
    error_code: str
    error: str
    cols: ResultColumns
    def __init__(self, results: _Optional[_Iterable[_Union[SeqResult, _Mapping]]] = ..., tier: _Optional[str] = ..., call_id: _Optional[int] = ..., error_code: _Optional[str] = ..., error: _Optional[str] = ..., cols: _Optional[_Union[ResultColumns, _Mapping]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("seq_ids",)
    SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    seq_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, seq_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class SyncRequest(_message.Message):
    __slots__ = ("src", "live")
    SRC_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    src: str
    live: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, src: _Optional[str] = ..., live: _Optional[_Iterable[str]] = ...) -> None: ...

class SyncReply(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...
