"""Each frame's calibrated OOD score, p-value and flag, from the manifest's calibration.

The calibration names, per level, which of the runtime's per-frame scores (kl or maha) is the OOD
score, the sorted reference scores behind the p-value, and the threshold at the chosen
false-positive rate.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def p_value(reference_sorted: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """p = (1 + #{reference >= score}) / (N + 1) for each score (alibi-detect's practice).

    Small p: the score is larger than almost all in-distribution reference scores."""
    ref = np.asarray(reference_sorted, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    n_ge = ref.size - np.searchsorted(ref, s, side="left")
    return (1.0 + n_ge) / (ref.size + 1.0)


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
    p_value: np.ndarray | None  # None: the model has no calibration for this level
    ood: np.ndarray


class Scorer:
    """Scores the frames of one model's levels (holds no per-stream state)."""

    def __init__(self, manifest: dict):
        self.cal = calibrations(manifest)

    def score(self, level: str, frames: dict) -> ScoredFrames:
        """frames: the runtime's arrays of one level ("kl" where the level has a log-variance, "maha")."""
        cal = self.cal.get(level)
        kind = cal.score if cal is not None else ("kl" if "kl" in frames else "maha")
        score = np.asarray(frames[kind], dtype=np.float64)
        if cal is None:
            return ScoredFrames(level, score, None, np.zeros(score.shape, dtype=bool))
        return ScoredFrames(level, score, np.asarray(p_value(cal.reference, score)), score > cal.threshold)
