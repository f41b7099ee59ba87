"""Turn one audio message of a stream into float32 samples, or say exactly why not."""
from __future__ import annotations

import grpc
import numpy as np

from protos.sim.v2 import codec
from protos.sim.v2 import sim_pb2 as pb
from serve.errors import StreamError


def encoding_name(encoding: int) -> str:
    try:
        return pb.AudioEncoding.Name(encoding)
    except ValueError:
        return str(encoding)


def check_encoding(encoding: int) -> None:
    if encoding not in codec.SAMPLE_DTYPES:
        raise StreamError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"config.encoding {encoding_name(encoding)} is not supported; use LINEAR16 or FLOAT32")


def check_length(data: bytes, encoding: int) -> int:
    """Samples in one audio message; StreamError if its byte count does not fit the encoding."""
    size = codec.SAMPLE_DTYPES[encoding].itemsize
    if len(data) % size:
        raise StreamError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{encoding_name(encoding)} audio message has {len(data)} bytes, not a multiple of {size}")
    return len(data) // size


def decode_audio(data: bytes, encoding: int, first_sample: int = 0) -> np.ndarray:
    """Samples as float32. Raises StreamError. `first_sample`: where in the stream the data starts
    (for the error message)."""
    check_length(data, encoding)
    samples = codec.decode_samples(data, encoding)
    if encoding == pb.FLOAT32 and not np.isfinite(samples).all():
        bad = first_sample + int(np.flatnonzero(~np.isfinite(samples))[0])
        raise StreamError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"FLOAT32 audio contains NaN or infinite samples (first at sample {bad} of the stream)")
    return samples
