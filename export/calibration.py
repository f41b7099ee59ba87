"""OOD calibration on held-out in-distribution audio (numpy; the encoder runs in torch).

Per level:
- a Gaussian (train.gaussian: mean, Ledoit-Wolf shrunk covariance) fitted on the frames of half of the reference
  clips; its whitening matrix is baked into the graphs as the `maha` score;
- reference scores on the clips of the OTHER half (so the Gaussian is not scored on its own
  fitting data): the per-frame score the flag is built on (SCORE), and its rolling mean over the
  level's window (serve.scoring.rolling_mean, clip by clip from each clip's start, as a stream);
- the threshold at false-positive rate fpr: the (1 - fpr) quantile of the reference WINDOW scores;
  p-values come from serve.scoring.p_value over the stored sorted reference window scores.
  The per-frame statistics (and those of the other score) are kept for the record.

The flag is built on `maha` for every level and method: on a trained SIM model the Mahalanobis
distance of the posterior means separates noise, tones and time-reversed words from held-out words
where the posterior's KL to the prior barely does (measured: docs/reliability.md).
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from serve.scoring import rolling_mean
from train.gaussian import fit_gaussian, mahalanobis

SCORE = "maha"  # the per-frame score OOD flags are built on (see the module docstring)
WINDOW_SECONDS = 0.3  # default length of the rolling mean the flag is decided on
MAX_STORED = 4096  # reference scores kept in the manifest per level and score
MAX_FIT_FRAMES = 60_000  # frames used to fit a Gaussian (m1 has 8 frames per 10 ms)


def score_stats(scores: np.ndarray, fpr: float, reference: bool = True) -> dict:
    """Threshold at fpr and (reference=True) a sorted reference of at most MAX_STORED scores (evenly
    spaced order statistics)."""
    s = np.sort(np.asarray(scores, np.float64))
    if s.size == 0:
        raise ValueError("no reference scores")
    stored = s if s.size <= MAX_STORED else s[np.round(np.linspace(0, s.size - 1, MAX_STORED)).astype(int)]
    return {
        "n_ref": int(s.size),
        **({"reference": [float(f"{v:.8g}") for v in stored]} if reference else {}),
        "threshold": float(np.quantile(s, 1.0 - fpr)),
        "mean": float(s.mean()),
        "std": float(s.std()),
        "quantiles": {str(q): float(np.quantile(s, q)) for q in (0.01, 0.05, 0.5, 0.95, 0.99)},
    }


def split_halves(n: int) -> tuple[list[int], list[int]]:
    """Alternate clips between the fitting half and the scoring half."""
    idx = list(range(n))
    return idx[0::2], idx[1::2]


def window_frames(seconds: float, level_hops: dict[str, int], sample_rate: int) -> dict[str, int]:
    """Frames per window at each level's own rate (at least 1)."""
    return {level: max(1, int(round(seconds * sample_rate / hop))) for level, hop in level_hops.items()}


def level_reference(per_clip_scores: list[np.ndarray], window: int, fpr: float) -> dict:
    """The calibration entry of one level from its per-frame scores on the reference clips: the
    window-score statistics (threshold, reference) and the per-frame ones under "frame"."""
    windows = np.concatenate([rolling_mean(s, window) for s in per_clip_scores])
    frames = np.concatenate(per_clip_scores)
    return {**score_stats(windows, fpr), "window_frames": int(window), "frame": score_stats(frames, fpr, False)}


def calibrate(levels_per_clip: Iterable[dict[str, np.ndarray]], levels: tuple[str, ...], variational: bool,
              fpr: float, windows: dict[str, int], seed: int = 0
              ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """Fit and score. levels_per_clip: per clip, export.offline.offline_levels output (mu_L, kl_L);
    windows: frames of the rolling mean per level (window_frames).

    Returns (gaussians {level: (mean, whitening)}, the manifest's "calibration" dict)."""
    clips = list(levels_per_clip)
    if len(clips) < 2:
        raise ValueError(f"calibration needs at least 2 reference clips, got {len(clips)}")
    fit_idx, score_idx = split_halves(len(clips))
    rng = np.random.default_rng(seed)
    gaussians, result = {}, {}
    for level in levels:
        fit = np.concatenate([clips[i][f"mu_{level}"] for i in fit_idx], axis=0)
        if fit.shape[0] > MAX_FIT_FRAMES:
            fit = fit[np.sort(rng.choice(fit.shape[0], MAX_FIT_FRAMES, replace=False))]
        mean, whitening, info = fit_gaussian(fit)
        gaussians[level] = (mean, whitening)
        scores = {"maha": [mahalanobis(clips[i][f"mu_{level}"], mean, whitening) for i in score_idx]}
        if variational and level != "ar":
            scores["kl"] = [clips[i][f"kl_{level}"] for i in score_idx]
        result[level] = {**reference_entry(scores, windows[level], fpr), "gaussian": info,
                         "n_clips_fit": len(fit_idx), "n_clips_ref": len(score_idx)}
    return gaussians, {"fpr": fpr, "levels": result}


def reference_entry(scores: dict[str, list[np.ndarray]], window: int, fpr: float) -> dict:
    """One level's calibration from its per-frame scores per reference clip ({"maha": [...], "kl": [...]}):
    SCORE's window statistics, the others' under "other"."""
    return {"score": SCORE, **level_reference(scores[SCORE], window, fpr),
            "other": {name: level_reference(s, window, fpr) for name, s in scores.items() if name != SCORE}}
