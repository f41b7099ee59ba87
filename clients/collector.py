"""The frames of one StreamEncode call, collected into arrays.

Arrays (FrameCollector.arrays()) use train.encode's names: m1 m2 m3 ar (frames x C) and kl_<level>
(levels with a log-variance), plus per level maha_<level>, score_<level> (the calibrated OOD
score), p_value_<level>, ood_<level> and, when asked for, logvar_<level>. `p_value` and `ood` are
those of the timeline level (m3 by default: 10 ms frames, the last conv module of every method).
"""
from __future__ import annotations

import numpy as np

from protos.sim.v2 import codec
from protos.sim.v2 import sim_pb2 as pb

TIMELINE_LEVEL = "m3"
_KEYS = ("mu", "logvar", "kl", "maha", "score", "window", "p_value", "ood")


_SMALL = ("score", "window", "p_value", "ood")  # one value per frame: kept for the timeline level with a sink


def array_name(level: str, key: str) -> str:
    """The name of a level's array in arrays() and in saved files: the level for mu, else key_level."""
    return level if key == "mu" else f"{key}_{level}"


class FrameCollector:
    """Accumulates the frames of one stream, level by level, checking their indices run 0, 1, 2, ...

    With a `sink` (clients.npz_stream.NpzStream), every array goes to the sink as it arrives and
    only the timeline level's per-frame scores and flags stay in memory (arrays() then holds
    just those): a long file's latents never have to fit in memory."""

    def __init__(self, timeline_level: str = TIMELINE_LEVEL, sink=None):
        self.timeline_level = timeline_level
        self.sink = sink
        self._columns: dict[str, dict[str, list[np.ndarray]]] = {}  # level -> key -> parts, in order
        self._counts: dict[str, int] = {}

    def add(self, response: pb.StreamEncodeResponse) -> list[codec.Frames]:
        """Take one response's frames; returns them as arrays, one Frames per LevelFrames."""
        got = [codec.frames_of(msg) for msg in response.frames]
        for f in got:
            expected = self._counts.get(f.level, 0)
            if f.first_index != expected:
                raise ValueError(f"level {f.level}: frame {f.first_index} arrived where {expected} was expected")
            col = self._columns.setdefault(f.level, {k: [] for k in _KEYS})
            for key, values in (("mu", f.mu), ("logvar", f.logvar), ("kl", f.kl), ("maha", f.maha),
                                ("score", f.ood_score), ("window", f.window_score), ("ood", f.ood),
                                ("p_value", f.p_value if f.p_value is not None
                                 else np.full(f.count, np.nan, np.float32))):
                if values is None:
                    continue
                if self.sink is not None:
                    self.sink.append(array_name(f.level, key), values)
                if self.sink is None or (f.level == self.timeline_level and key in _SMALL):
                    col[key].append(values)
            self._counts[f.level] = expected + f.count
        return got

    @property
    def levels(self) -> list[str]:
        return list(self._columns)

    def count(self, level: str) -> int:
        return self._counts.get(level, 0)

    def column(self, level: str, key: str) -> np.ndarray | None:
        """All frames' values of one key ("mu", "logvar", "kl", "maha", "score", "window", "p_value",
        "ood") of a level so far; None when none were received."""
        parts = self._columns.get(level, {}).get(key)
        if not parts:
            return None
        if len(parts) > 1:
            parts[:] = [np.concatenate(parts)]  # later calls start from the joined array
        return parts[0]

    def recent(self, level: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The scores the flags are decided on (window scores; per-frame scores from a server
        without windows) and the flags of a level's last n frames (fewer at the start)."""
        scores = self.column(level, "window")
        if scores is None:
            scores = self.column(level, "score")
        ood = self.column(level, "ood")
        if scores is None:
            return np.zeros(0, np.float32), np.zeros(0, bool)
        return scores[-n:], ood[-n:]

    def arrays(self) -> dict[str, np.ndarray]:
        """Every level's arrays so far (a level appears once its first frame has arrived)."""
        out: dict[str, np.ndarray] = {}
        for level in self._columns:
            for key in _KEYS:
                values = self.column(level, key)
                if values is not None:
                    out[array_name(level, key)] = np.array(values)
        if self.timeline_level in self._columns:
            out["p_value"] = out[f"p_value_{self.timeline_level}"]
            out["ood"] = out[f"ood_{self.timeline_level}"]
        return out


def flagged_stretches(ood: np.ndarray, frame_seconds: float, min_gap: int = 1) -> list[tuple[float, float]]:
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
