"""Turn one audio message of a stream into float32 samples, or say exactly why not."""
from __future__ import annotations

import grpc
import numpy as np

from protos.sim.v1 import sim_pb2 as pb
from serve.errors import StreamError

SUPPORTED = {pb.LINEAR16: ("LINEAR16", np.dtype("<i2")), pb.FLOAT32: ("FLOAT32", np.dtype("<f4"))}


def encoding_name(encoding: int) -> str:
    try:
        return pb.AudioEncoding.Name(encoding)
    except ValueError:
        return str(encoding)


def check_encoding(encoding: int) -> None:
    if encoding not in SUPPORTED:
        raise StreamError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"config.encoding {encoding_name(encoding)} is not supported; use LINEAR16 or FLOAT32")


def check_length(data: bytes, encoding: int) -> int:
    """Samples in one audio message; StreamError if its byte count does not fit the encoding."""
    name, dtype = SUPPORTED[encoding]
    if len(data) % dtype.itemsize:
        raise StreamError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{name} audio message has {len(data)} bytes, not a multiple of {dtype.itemsize}")
    return len(data) // dtype.itemsize


def decode_audio(data: bytes, encoding: int, first_sample: int = 0) -> np.ndarray:
    """Samples as float32 (LINEAR16 scaled by 1/32768). Raises StreamError. `first_sample`: where in
    the stream the data starts (for the error message)."""
    check_length(data, encoding)
    raw = np.frombuffer(data, dtype=SUPPORTED[encoding][1])
    if encoding == pb.LINEAR16:
        return raw.astype(np.float32) * np.float32(1.0 / 32768.0)
    samples = raw.astype(np.float32)  # native byte order, and a writable copy
    if not np.isfinite(samples).all():
        bad = first_sample + int(np.flatnonzero(~np.isfinite(samples))[0])
        raise StreamError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"FLOAT32 audio contains NaN or infinite samples (first at sample {bad} of the stream)")
    return samples
