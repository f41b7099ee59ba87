"""Each frame's OOD score, its windowed score, p-value and flag, from the manifest's calibration.

The calibration names, per level, which of the runtime's per-frame scores (kl or maha) the OOD
decision is built on, the window (frames) its rolling mean runs over, the sorted reference window
scores behind the p-value, and the threshold on the window score at the chosen false-positive rate.

Why a window: single frames of ordinary words spike far above their neighbours, so a per-frame
threshold at a 1 % false-positive rate sits in the tail of those spikes, while noise and tones
score steadily above typical speech without reaching it. The mean over a few hundred ms follows
the steady level and ignores lone spikes (measured: docs/reliability.md).

The window score of frame t is the mean of the per-frame scores of frames max(0, t - W + 1) .. t of
the same stream: at the start of a stream it averages the frames so far. The export calibrates on
exactly this function (export.calibration), so the false-positive rate holds from a stream's start.
A non-finite per-frame score makes its windows non-finite, and a non-finite window is flagged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def p_value(reference_sorted: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """p = (1 + #{reference >= score}) / (N + 1) for each score (alibi-detect's practice).

    Small p: the score is larger than almost all in-distribution reference scores. NaN scores get
    the smallest p-value (they are flagged)."""
    ref = np.asarray(reference_sorted, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    n_ge = ref.size - np.searchsorted(ref, s, side="left")
    n_ge = np.where(np.isnan(s), 0, n_ge)
    return (1.0 + n_ge) / (ref.size + 1.0)


def rolling_mean(scores: np.ndarray, window: int, history: np.ndarray | None = None) -> np.ndarray:
    """Mean of each score with the up to window - 1 scores before it (in `history`, then in `scores`).

    history: the stream's previous per-frame scores (only the last window - 1 are used); None or
    empty at the start of a stream, where the first windows are shorter. A non-finite score makes
    every window that holds it non-finite (no running sum carries it further)."""
    if window < 1:
        raise ValueError(f"window must be at least 1 frame, got {window}")
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size == 0 or window == 1:
        return s.copy()
    h = np.zeros(0) if history is None else np.asarray(history, dtype=np.float64).ravel()[-(window - 1):]
    x = np.concatenate([np.zeros(window - 1 - h.size), h, s])
    counts = np.minimum(np.arange(h.size + 1, h.size + 1 + s.size), window)
    sums = np.lib.stride_tricks.sliding_window_view(x, window).sum(axis=1)
    return sums[-s.size:] / counts


@dataclass
class WindowHistory:
    """One stream's last per-frame scores per level: what its next windows start with."""

    scores: dict[str, np.ndarray] = field(default_factory=dict)

    def push(self, level: str, new: np.ndarray, window: int) -> np.ndarray:
        """The history before `new`; keeps the last window - 1 scores (new included) for next time."""
        before = self.scores.get(level)
        keep = window - 1
        if keep > 0:
            joined = new if before is None or before.size == 0 else np.concatenate([before, new])
            self.scores[level] = np.asarray(joined[-keep:], dtype=np.float64)
        return before


@dataclass(frozen=True)
class LevelCalibration:
    score: str  # the per-frame score the flag is built on: "kl" | "maha"
    window: int  # frames of the rolling mean (1: the per-frame score itself)
    reference: np.ndarray  # sorted reference window scores
    threshold: float  # on the window score
    fpr: float


def calibrations(manifest: dict) -> dict[str, LevelCalibration]:
    cal = manifest.get("calibration") or {}
    out = {}
    for level, c in (cal.get("levels") or {}).items():
        out[level] = LevelCalibration(score=c["score"], window=int(c.get("window_frames", 1)),
                                      reference=np.asarray(c["reference"], dtype=np.float64),
                                      threshold=float(c["threshold"]), fpr=float(cal.get("fpr", float("nan"))))
    return out


def flags(window_scores: np.ndarray, threshold: float) -> np.ndarray:
    """ood: the window score is above the threshold, or not a finite number."""
    w = np.asarray(window_scores)
    return ~(w <= threshold) | ~np.isfinite(w)


@dataclass
class ScoredFrames:
    """One level's frames of a batch (or of one response), scored."""

    level: str
    score: np.ndarray  # per frame: the calibration's score (kl or maha)
    window: np.ndarray | None  # the rolling mean the flag is decided on; None without calibration
    p_value: np.ndarray | None  # of the window score; None: the model has no calibration for this level
    ood: np.ndarray


class Scorer:
    """Scores the frames of one model's levels. Per-stream state (the window's history) is the
    caller's: one WindowHistory per stream."""

    def __init__(self, manifest: dict):
        self.cal = calibrations(manifest)

    def kind(self, level: str, frames: dict) -> str:
        cal = self.cal.get(level)
        return cal.score if cal is not None else ("kl" if "kl" in frames else "maha")

    def score(self, level: str, frames: dict, histories: list[tuple[WindowHistory, int]] | None = None
              ) -> ScoredFrames:
        """frames: the runtime's arrays of one level ("kl" where the level has a log-variance, "maha"),
        of one or more streams one after the other; histories: (the stream's WindowHistory, its
        number of frames) for each of those streams, in order (None: one stream starting now)."""
        score = np.asarray(frames[self.kind(level, frames)], dtype=np.float64)
        cal = self.cal.get(level)
        if cal is None:
            return ScoredFrames(level, score, None, None, np.zeros(score.shape, dtype=bool))
        if histories is None:
            window = rolling_mean(score, cal.window)
        else:
            parts, end = [], 0
            for history, n in histories:
                start, end = end, end + n
                new = score[start:end]
                parts.append(rolling_mean(new, cal.window, history.push(level, new, cal.window)))
            window = np.concatenate(parts) if len(parts) != 1 else parts[0]
        return ScoredFrames(level, score, window, np.asarray(p_value(cal.reference, window)),
                            flags(window, cal.threshold))
