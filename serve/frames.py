"""Popped runtime frames -> StreamEncodeResponse bytes, with each level's calibrated score, p-value and flag.

The runtime gives, per level, arrays for the frames that just completed:
{"index" (n,), "mu" (n, C), "logvar" (n, C) and "kl" (n,) for variational levels, "maha" (n,)}.
The manifest's calibration names, per level, which of kl / maha is the OOD score, the sorted
reference scores behind the p-value and the threshold at the chosen false-positive rate.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from export.manifest import p_value
from serve.wire import LevelWriter
from train.audio import SAMPLE_RATE


@dataclass(frozen=True)
class LevelCalibration:
    score: str  # "kl" | "maha"
    reference: np.ndarray  # sorted reference scores
    threshold: float
    fpr: float


def calibrations(manifest: dict) -> dict[str, LevelCalibration]:
    cal = manifest.get("calibration") or {}
    out = {}
    for level, c in (cal.get("levels") or {}).items():
        out[level] = LevelCalibration(score=c["score"], reference=np.asarray(c["reference"], dtype=np.float64),
                                      threshold=float(c["threshold"]), fpr=float(cal.get("fpr", float("nan"))))
    return out


@dataclass
class ScoredFrames:
    """One level's frames of a batch (or of one response), scored."""

    level: str
    score: np.ndarray
    p_value: np.ndarray | None
    ood: np.ndarray


class FrameBuilder:
    """Builds responses for one model (shared by all streams; holds no per-stream state)."""

    def __init__(self, manifest: dict, level_hops: dict[str, int]):
        self.cal = calibrations(manifest)
        self.level_hops = dict(level_hops)
        self._writers: dict[tuple, LevelWriter] = {}

    def _writer(self, level: str, frames: dict, with_logvar: bool) -> LevelWriter:
        key = (level, with_logvar)
        w = self._writers.get(key)
        if w is None:
            w = self._writers[key] = LevelWriter(level, frames["mu"].shape[1], self.level_hops[level], SAMPLE_RATE,
                                                 with_logvar, "kl" in frames, level in self.cal)
        return w

    def score(self, level: str, frames: dict) -> ScoredFrames:
        cal = self.cal.get(level)
        kind = cal.score if cal is not None else ("kl" if "kl" in frames else "maha")
        score = np.asarray(frames[kind], dtype=np.float64)
        if cal is None:
            return ScoredFrames(level, score, None, np.zeros(score.shape, dtype=bool))
        return ScoredFrames(level, score, np.asarray(p_value(cal.reference, score)), score > cal.threshold)

    def responses(self, requests: list[tuple[dict[str, dict], tuple[str, ...], bool]]
                  ) -> tuple[list[bytes | None], dict[str, list[ScoredFrames]]]:
        """The serialised StreamEncodeResponse of each (popped frames, levels, return_logvar) of a
        batch (None where none of the stream's levels has a new frame), and the scored frames per
        level. Scoring and encoding run once per level over the frames of all streams."""
        chunks: list[list] = [[] for _ in requests]
        scored: dict[str, list[ScoredFrames]] = {}
        for level in self.level_hops:
            groups: dict[bool, list[tuple[int, dict]]] = {}
            for i, (popped, levels, return_logvar) in enumerate(requests):
                frames = popped.get(level)
                if level in levels and frames is not None and len(frames["index"]):
                    groups.setdefault(return_logvar and "logvar" in frames, []).append((i, frames))
            for with_logvar, members in groups.items():
                if len(members) == 1:
                    joined = members[0][1]
                else:  # logvar only where it is sent
                    keys = [k for k in ("index", "mu", "logvar", "kl", "maha")
                            if k in members[0][1] and (k != "logvar" or with_logvar)]
                    joined = {k: np.concatenate([f[k] for _, f in members]) for k in keys}
                sc = self.score(level, joined)
                scored.setdefault(level, []).append(sc)
                encoded = self._writer(level, joined, with_logvar).encode(
                    joined["index"], joined["mu"], joined["logvar"] if with_logvar else None, joined.get("kl"),
                    joined["maha"], sc.score, sc.p_value, sc.ood)
                end = 0
                for i, frames in members:
                    start, end = end, end + len(frames["index"])
                    chunks[i] += encoded.chunks(start, end)
        return [b"".join(c) if c else None for c in chunks], scored

    def response(self, popped: dict[str, dict], levels: tuple[str, ...], return_logvar: bool
                 ) -> tuple[bytes | None, list[ScoredFrames]]:
        """One stream's serialised StreamEncodeResponse (None if none of its levels has a new
        frame) and its scored frames."""
        (data,), scored = self.responses([(popped, levels, return_logvar)])
        return data, [sc for level in levels for sc in scored.get(level, [])]
