"""OOD calibration on held-out in-distribution audio (numpy; the encoder runs in torch).

Per level:
- a Gaussian (mean, Ledoit-Wolf shrunk covariance) fitted on the frames of half of the reference
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

SCORE = "maha"  # the per-frame score OOD flags are built on (see the module docstring)
WINDOW_SECONDS = 0.3  # default length of the rolling mean the flag is decided on
MAX_STORED = 4096  # reference scores kept in the manifest per level and score
MAX_FIT_FRAMES = 60_000  # frames used to fit a Gaussian (m1 has 8 frames per 10 ms)
# Smallest covariance eigenvalue kept, relative to the largest: bounds the whitening's gain (and
# so float32 round-off in maha) to 1/sqrt(EIG_FLOOR) = 316 times the top direction's.
EIG_FLOOR = 1e-5


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean, shrunk covariance and shrinkage of the rows of x (n, d), Ledoit & Wolf (2004)."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"need at least 2 frames to fit a Gaussian, got {n}")
    mean = x.mean(axis=0)
    xc = x - mean
    emp = xc.T @ xc / n
    mu = np.trace(emp) / d
    x2 = xc ** 2
    beta_ = np.sum(x2.T @ x2)
    delta_ = np.sum(emp ** 2)  # = sum((X^T X)^2) / n^2
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * np.trace(emp) + d * mu ** 2) / d
    beta = min(beta, delta)
    shrinkage = 0.0 if delta <= 0 else beta / delta
    cov = (1.0 - shrinkage) * emp + shrinkage * mu * np.eye(d)
    return mean, cov, float(shrinkage)


def fit_gaussian(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mean (d,), whitening W (d, d) with W^T W = cov^-1, info) for frames (n, d)."""
    mean, cov, shrinkage = ledoit_wolf(frames)
    eigval, eigvec = np.linalg.eigh(cov)
    top = float(eigval.max()) if eigval.size else 0.0
    if top <= 0.0:  # all frames identical: fall back to unit variance around the mean
        eigval = np.ones_like(eigval)
        top = 1.0
    floor = EIG_FLOOR * top
    eigval = np.maximum(eigval, floor)
    whitening = (eigvec / np.sqrt(eigval)).T
    info = {"n_fit": int(frames.shape[0]), "shrinkage": shrinkage, "eig_max": top, "eig_floor": floor}
    return mean.astype(np.float32), whitening.astype(np.float32), info


def mahalanobis(frames: np.ndarray, mean: np.ndarray, whitening: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each row, in float64."""
    y = (np.asarray(frames, np.float64) - mean) @ np.asarray(whitening, np.float64).T
    return np.sum(y * y, axis=1)


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
