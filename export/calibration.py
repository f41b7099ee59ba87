"""OOD calibration on held-out in-distribution audio (numpy; the encoder runs in torch).

Per level:
- a Gaussian (mean, Ledoit-Wolf shrunk covariance) fitted on the frames of half of the reference
  clips; its whitening matrix is baked into the graphs as the `maha` score;
- reference scores on the frames of the OTHER half (so the Gaussian is not scored on its own
  fitting data): `maha` for every level, `kl` (to N(0, I)) for SIM's conv levels;
- the threshold at false-positive rate fpr: the (1 - fpr) quantile of the reference scores;
  p-values come from serve.scoring.p_value over the stored sorted reference.

The primary score of a level is "kl" for SIM's conv levels (the posterior's distance to the prior,
docs/method.md) and "maha" for everything else (GIM and CPC have no trained variance; the GRU has none).
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

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


def score_stats(scores: np.ndarray, fpr: float) -> dict:
    """Threshold at fpr and a sorted reference of at most MAX_STORED scores (evenly spaced order statistics)."""
    s = np.sort(np.asarray(scores, np.float64))
    if s.size == 0:
        raise ValueError("no reference scores")
    stored = s if s.size <= MAX_STORED else s[np.round(np.linspace(0, s.size - 1, MAX_STORED)).astype(int)]
    return {
        "n_ref": int(s.size),
        "reference": [float(f"{v:.8g}") for v in stored],
        "threshold": float(np.quantile(s, 1.0 - fpr)),
        "mean": float(s.mean()),
        "std": float(s.std()),
        "quantiles": {str(q): float(np.quantile(s, q)) for q in (0.01, 0.05, 0.5, 0.95, 0.99)},
    }


def split_halves(n: int) -> tuple[list[int], list[int]]:
    """Alternate clips between the fitting half and the scoring half."""
    idx = list(range(n))
    return idx[0::2], idx[1::2]


def calibrate(levels_per_clip: Iterable[dict[str, np.ndarray]], levels: tuple[str, ...], variational: bool,
              fpr: float, seed: int = 0) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """Fit and score. levels_per_clip: per clip, export.offline.offline_levels output (mu_L, kl_L).

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
        held = np.concatenate([clips[i][f"mu_{level}"] for i in score_idx], axis=0)
        stats = {"maha": score_stats(mahalanobis(held, mean, whitening), fpr)}
        if variational and level != "ar":
            stats["kl"] = score_stats(np.concatenate([clips[i][f"kl_{level}"] for i in score_idx]), fpr)
        primary = "kl" if "kl" in stats else "maha"
        other = {name: st for name, st in stats.items() if name != primary}
        result[level] = {"score": primary, **stats[primary], "other": other, "gaussian": info,
                         "n_clips_fit": len(fit_idx), "n_clips_ref": len(score_idx)}
    return gaussians, {"fpr": fpr, "levels": result}
