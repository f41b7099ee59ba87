"""The packed arrays of the sim.v2 wire format (sim.proto), for the server and the clients alike.

Audio samples: LINEAR16 is signed 16-bit little-endian PCM, sample = value / 32768; FLOAT32 is
float32 little-endian. LevelFrames: float32 little-endian arrays of `count` rows (mu and logvar
count x dim, the scores count), uint8 flags, every one row-major. numpy only (no torch).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protos.sim.v2 import sim_pb2 as pb

FLOAT = np.dtype("<f4")
FLAG = np.dtype("u1")
LINEAR16_SCALE = 32768.0  # LINEAR16 value of a sample of 1.0
SAMPLE_DTYPES = {pb.LINEAR16: np.dtype("<i2"), pb.FLOAT32: FLOAT}


def encode_samples(samples: np.ndarray, encoding: int) -> bytes:
    """Float samples (nominally in [-1, 1]) as the bytes of an audio message; LINEAR16 rounds and clips."""
    samples = np.asarray(samples, dtype=np.float32)
    if encoding == pb.LINEAR16:
        return np.clip(np.round(samples * LINEAR16_SCALE), -32768, 32767).astype("<i2").tobytes()
    return samples.astype(FLOAT, copy=False).tobytes()


def decode_samples(data: bytes, encoding: int) -> np.ndarray:
    """An audio message's bytes as float32 samples (a new array). The byte count must fit the encoding."""
    raw = np.frombuffer(data, dtype=SAMPLE_DTYPES[encoding])
    if encoding == pb.LINEAR16:
        return raw.astype(np.float32) * np.float32(1.0 / LINEAR16_SCALE)
    return raw.astype(np.float32)


def pack(array: np.ndarray, dtype: np.dtype = FLOAT) -> bytes:
    """An array's values as little-endian bytes, row-major."""
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def unpack(data: bytes, rows: int, dim: int | None = None, dtype: np.dtype = FLOAT) -> np.ndarray:
    """Bytes of `rows` (x dim) values back to a read-only array; ValueError if the size does not fit."""
    shape = (rows,) if dim is None else (rows, dim)
    n = rows * (1 if dim is None else dim)
    if len(data) != n * dtype.itemsize:
        raise ValueError(f"{len(data)} bytes do not hold {'x'.join(map(str, shape))} values of {dtype.itemsize} bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def level_frames(level: str, first_index: int, mu: np.ndarray, maha: np.ndarray, ood_score: np.ndarray,
                 ood: np.ndarray, logvar: np.ndarray | None = None, kl: np.ndarray | None = None,
                 p_value: np.ndarray | None = None, window_score: np.ndarray | None = None) -> pb.LevelFrames:
    """One LevelFrames message from arrays of the same number of frames (mu: frames x dim)."""
    count, dim = mu.shape
    return pb.LevelFrames(level=level, first_index=first_index, count=count, dim=dim, mu=pack(mu),
                          logvar=b"" if logvar is None else pack(logvar), kl=b"" if kl is None else pack(kl),
                          maha=pack(maha), ood_score=pack(ood_score),
                          p_value=b"" if p_value is None else pack(p_value), ood=pack(ood, FLAG),
                          window_score=b"" if window_score is None else pack(window_score))


@dataclass(frozen=True)
class Frames:
    """A LevelFrames message as arrays (views of its bytes; None for what was not sent)."""

    level: str
    first_index: int
    mu: np.ndarray  # count x dim
    maha: np.ndarray
    ood_score: np.ndarray  # the per-frame score the flag is built on
    ood: np.ndarray  # bool, decided on window_score
    logvar: np.ndarray | None
    kl: np.ndarray | None
    p_value: np.ndarray | None
    window_score: np.ndarray | None = None  # the rolling mean of ood_score (None: no calibration)

    @property
    def count(self) -> int:
        return self.mu.shape[0]

    @property
    def index(self) -> np.ndarray:
        """Each frame's index at its level's own rate."""
        return np.arange(self.first_index, self.first_index + self.count, dtype=np.int64)


def frames_of(msg: pb.LevelFrames) -> Frames:
    """The arrays of one LevelFrames message; ValueError when a field's size does not fit count x dim."""
    n, dim = msg.count, msg.dim

    def opt(data: bytes, d: int | None = None) -> np.ndarray | None:
        return unpack(data, n, d) if data else None

    return Frames(level=msg.level, first_index=msg.first_index, mu=unpack(msg.mu, n, dim), maha=unpack(msg.maha, n),
                  ood_score=unpack(msg.ood_score, n), ood=unpack(msg.ood, n, dtype=FLAG).astype(bool),
                  logvar=opt(msg.logvar, dim), kl=opt(msg.kl), p_value=opt(msg.p_value),
                  window_score=opt(msg.window_score))
