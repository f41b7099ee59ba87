"""Turn one audio message of a stream into float32 samples, or say exactly why not."""
from __future__ import annotations

import grpc
import numpy as np

from protos.sim.v2 import codec
from protos.sim.v2 import sim_pb2 as pb
from serve.errors import StreamError

# FLOAT32 samples are nominally in [-1, 1]. Larger ones, up to this (20 dB over full scale), are
# encoded as they are; much larger ones drive the scores out of float32's range (the KL's
# exp(logvar) first: inf at m1 from about 30x full scale on a trained model, docs/reliability.md),
# so such audio is refused rather than answered with scores that mean nothing.
MAX_SAMPLE_MAGNITUDE = 10.0


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
    """Samples as float32. Raises StreamError (INVALID_ARGUMENT) for a byte count that does not fit
    the encoding and for FLOAT32 samples that are NaN, infinite or larger than MAX_SAMPLE_MAGNITUDE.
    `first_sample`: where in the stream the data starts (for the error message)."""
    check_length(data, encoding)
    samples = codec.decode_samples(data, encoding)
    if encoding == pb.FLOAT32 and samples.size:
        peak = float(np.max(np.abs(samples)))  # NaN if any sample is NaN
        if not peak <= MAX_SAMPLE_MAGNITUDE:
            bad_mask = ~np.isfinite(samples)
            what = "NaN or infinite samples"
            if not bad_mask.any():
                bad_mask = np.abs(samples) > MAX_SAMPLE_MAGNITUDE
                what = (f"samples of magnitude {peak:.3g}, above the limit of {MAX_SAMPLE_MAGNITUDE:g} (audio is "
                        "nominally in [-1, 1]; scale it)")
            bad = first_sample + int(np.flatnonzero(bad_mask)[0])
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"FLOAT32 audio contains {what} (first at sample {bad} of the stream)")
    return samples
