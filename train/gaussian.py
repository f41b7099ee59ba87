"""The Gaussian that out-of-distribution scores are measured under (numpy).

One estimator for the service and the study: export/calibration.py fits it on held-out words and
bakes its whitening into the graphs as the `maha` score; train/ood.py fits it on training words to
measure offline how well that score separates unknown audio. Mean and Ledoit-Wolf shrunk covariance,
its eigenvalues floored, so the whitening stays bounded when frames fill only a subspace.
"""
from __future__ import annotations

import numpy as np

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
