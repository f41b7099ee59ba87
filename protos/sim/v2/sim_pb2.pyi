from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AudioEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIO_ENCODING_UNSPECIFIED: _ClassVar[AudioEncoding]
    LINEAR16: _ClassVar[AudioEncoding]
    FLOAT32: _ClassVar[AudioEncoding]
AUDIO_ENCODING_UNSPECIFIED: AudioEncoding
LINEAR16: AudioEncoding
FLOAT32: AudioEncoding

class StreamConfig(_message.Message):
    __slots__ = ("sample_rate", "encoding", "levels", "return_logvar")
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGVAR_FIELD_NUMBER: _ClassVar[int]
    sample_rate: int
    encoding: AudioEncoding
    levels: _containers.RepeatedScalarFieldContainer[str]
    return_logvar: bool
    def __init__(self, sample_rate: _Optional[int] = ..., encoding: _Optional[_Union[AudioEncoding, str]] = ..., levels: _Optional[_Iterable[str]] = ..., return_logvar: _Optional[bool] = ...) -> None: ...

class StreamEncodeRequest(_message.Message):
    __slots__ = ("config", "audio")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    config: StreamConfig
    audio: bytes
    def __init__(self, config: _Optional[_Union[StreamConfig, _Mapping]] = ..., audio: _Optional[bytes] = ...) -> None: ...

class LevelFrames(_message.Message):
    __slots__ = ("level", "first_index", "count", "dim", "mu", "logvar", "kl", "maha", "ood_score", "p_value", "ood", "window_score")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    FIRST_INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MU_FIELD_NUMBER: _ClassVar[int]
    LOGVAR_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    MAHA_FIELD_NUMBER: _ClassVar[int]
    OOD_SCORE_FIELD_NUMBER: _ClassVar[int]
    P_VALUE_FIELD_NUMBER: _ClassVar[int]
    OOD_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SCORE_FIELD_NUMBER: _ClassVar[int]
    level: str
    first_index: int
    count: int
    dim: int
    mu: bytes
    logvar: bytes
    kl: bytes
    maha: bytes
    ood_score: bytes
    p_value: bytes
    ood: bytes
    window_score: bytes
    def __init__(self, level: _Optional[str] = ..., first_index: _Optional[int] = ..., count: _Optional[int] = ..., dim: _Optional[int] = ..., mu: _Optional[bytes] = ..., logvar: _Optional[bytes] = ..., kl: _Optional[bytes] = ..., maha: _Optional[bytes] = ..., ood_score: _Optional[bytes] = ..., p_value: _Optional[bytes] = ..., ood: _Optional[bytes] = ..., window_score: _Optional[bytes] = ...) -> None: ...

class StreamEncodeResponse(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[LevelFrames]
    def __init__(self, frames: _Optional[_Iterable[_Union[LevelFrames, _Mapping]]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LevelInfo(_message.Message):
    __slots__ = ("name", "dim", "hop_samples", "has_logvar", "has_decoder", "calibration")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    HOP_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    HAS_LOGVAR_FIELD_NUMBER: _ClassVar[int]
    HAS_DECODER_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    dim: int
    hop_samples: int
    has_logvar: bool
    has_decoder: bool
    calibration: Calibration
    def __init__(self, name: _Optional[str] = ..., dim: _Optional[int] = ..., hop_samples: _Optional[int] = ..., has_logvar: _Optional[bool] = ..., has_decoder: _Optional[bool] = ..., calibration: _Optional[_Union[Calibration, _Mapping]] = ...) -> None: ...

class Calibration(_message.Message):
    __slots__ = ("score", "threshold", "n_ref", "fpr", "window_frames")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    N_REF_FIELD_NUMBER: _ClassVar[int]
    FPR_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FRAMES_FIELD_NUMBER: _ClassVar[int]
    score: str
    threshold: float
    n_ref: int
    fpr: float
    window_frames: int
    def __init__(self, score: _Optional[str] = ..., threshold: _Optional[float] = ..., n_ref: _Optional[int] = ..., fpr: _Optional[float] = ..., window_frames: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_message_bytes", "max_streams", "max_stream_seconds", "idle_timeout_seconds")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAM_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_streams: int
    max_stream_seconds: float
    idle_timeout_seconds: float
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_streams: _Optional[int] = ..., max_stream_seconds: _Optional[float] = ..., idle_timeout_seconds: _Optional[float] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model", "method", "levels", "sample_rate", "hop", "receptive_field", "lookahead", "versions", "limits", "providers")
    class VersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    HOP_FIELD_NUMBER: _ClassVar[int]
    RECEPTIVE_FIELD_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    method: str
    levels: _containers.RepeatedCompositeFieldContainer[LevelInfo]
    sample_rate: int
    hop: int
    receptive_field: int
    lookahead: int
    versions: _containers.ScalarMap[str, str]
    limits: Limits
    providers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., method: _Optional[str] = ..., levels: _Optional[_Iterable[_Union[LevelInfo, _Mapping]]] = ..., sample_rate: _Optional[int] = ..., hop: _Optional[int] = ..., receptive_field: _Optional[int] = ..., lookahead: _Optional[int] = ..., versions: _Optional[_Mapping[str, str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., providers: _Optional[_Iterable[str]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("level", "num_frames", "latents")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    level: str
    num_frames: int
    latents: bytes
    def __init__(self, level: _Optional[str] = ..., num_frames: _Optional[int] = ..., latents: _Optional[bytes] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("sample_rate", "audio")
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    sample_rate: int
    audio: bytes
    def __init__(self, sample_rate: _Optional[int] = ..., audio: _Optional[bytes] = ...) -> None: ...
