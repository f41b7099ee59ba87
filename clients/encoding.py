"""Client side of StreamEncode: send audio, collect frames into arrays.

Arrays (FrameCollector.arrays()) use train.encode's names: m1 m2 m3 ar (frames x C) and kl_<level>
(SIM conv levels), plus per level maha_<level>, score_<level> (the calibrated OOD score),
p_value_<level>, ood_<level> and, when asked for, logvar_<level>. `p_value` and `ood` are those
of the timeline level (m3 by default: 10 ms frames, the last conv module of every method).
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator

import numpy as np

from protos.sim.v1 import sim_pb2 as pb
from train.audio import HOP, SAMPLE_RATE

TIMELINE_LEVEL = "m3"


def config_request(levels: Iterable[str] = (), return_logvar: bool = False,
                   encoding: int = pb.FLOAT32) -> pb.StreamEncodeRequest:
    return pb.StreamEncodeRequest(config=pb.StreamConfig(sample_rate=SAMPLE_RATE, encoding=encoding,
                                                         levels=list(levels), return_logvar=return_logvar))


def audio_request(samples: np.ndarray, encoding: int = pb.FLOAT32) -> pb.StreamEncodeRequest:
    if encoding == pb.LINEAR16:
        data = np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2").tobytes()
    else:
        data = np.asarray(samples, dtype="<f4").tobytes()
    return pb.StreamEncodeRequest(audio=data)


def file_requests(audio: np.ndarray, chunk_samples: int, *, realtime: bool = False, levels: Iterable[str] = (),
                  return_logvar: bool = False, encoding: int = pb.FLOAT32,
                  on_send: Callable[[int, float], None] | None = None) -> Iterator[pb.StreamEncodeRequest]:
    """Config, then the audio in chunks; with realtime each chunk leaves when its last sample would
    have been recorded. on_send(samples sent so far, time.monotonic()) after each chunk."""
    yield config_request(levels, return_logvar, encoding)
    start = time.monotonic()
    for pos in range(0, len(audio), chunk_samples):
        chunk = audio[pos:pos + chunk_samples]
        if realtime:
            due = start + (pos + len(chunk)) / SAMPLE_RATE
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        yield audio_request(chunk, encoding)
        if on_send is not None:
            on_send(pos + len(chunk), time.monotonic())


class FrameCollector:
    """Accumulates the frames of one stream, level by level, checking their indices run 0, 1, 2, ..."""

    def __init__(self, timeline_level: str = TIMELINE_LEVEL):
        self.timeline_level = timeline_level
        self._cols: dict[str, dict[str, list]] = {}

    def add(self, response: pb.StreamEncodeResponse) -> list[pb.Frame]:
        for f in response.frames:
            col = self._cols.setdefault(f.level, {"mu": [], "logvar": [], "kl": [], "maha": [], "score": [],
                                                  "p_value": [], "ood": []})
            expected = len(col["mu"])
            if f.index != expected:
                raise ValueError(f"level {f.level}: frame {f.index} arrived where {expected} was expected")
            col["mu"].append(np.asarray(f.mu, dtype=np.float32))
            if len(f.logvar):
                col["logvar"].append(np.asarray(f.logvar, dtype=np.float32))
            if f.HasField("kl"):
                col["kl"].append(f.kl)
            col["maha"].append(f.maha)
            col["score"].append(f.ood_score)
            col["p_value"].append(f.p_value if f.HasField("p_value") else np.nan)
            col["ood"].append(f.ood)
        return list(response.frames)

    @property
    def levels(self) -> list[str]:
        return list(self._cols)

    def count(self, level: str) -> int:
        return len(self._cols.get(level, {}).get("mu", ()))

    def arrays(self, dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for level, col in self._cols.items():
            dim = (dims or {}).get(level, col["mu"][0].shape[0] if col["mu"] else 0)
            out[level] = np.stack(col["mu"]) if col["mu"] else np.zeros((0, dim), np.float32)
            if col["kl"]:
                out[f"kl_{level}"] = np.asarray(col["kl"], np.float32)
            if col["logvar"]:
                out[f"logvar_{level}"] = np.stack(col["logvar"])
            out[f"maha_{level}"] = np.asarray(col["maha"], np.float32)
            out[f"score_{level}"] = np.asarray(col["score"], np.float32)
            out[f"p_value_{level}"] = np.asarray(col["p_value"], np.float32)
            out[f"ood_{level}"] = np.asarray(col["ood"], bool)
        if self.timeline_level in self._cols:
            out["p_value"] = out[f"p_value_{self.timeline_level}"]
            out["ood"] = out[f"ood_{self.timeline_level}"]
        return out


def flagged_stretches(ood: np.ndarray, frame_seconds: float = HOP / SAMPLE_RATE, min_gap: int = 1
                      ) -> list[tuple[float, float]]:
    """(start s, end s) of each run of flagged frames (runs closer than min_gap frames merged)."""
    idx = np.flatnonzero(np.asarray(ood, bool))
    if idx.size == 0:
        return []
    runs, start, prev = [], idx[0], idx[0]
    for i in idx[1:]:
        if i - prev > min_gap:
            runs.append((start, prev))
            start = i
        prev = i
    runs.append((start, prev))
    return [(a * frame_seconds, (b + 1) * frame_seconds) for a, b in runs]
