"""Per-frame OOD scores as torch modules, baked into the exported graphs.

maha: squared Mahalanobis distance of mu under a Gaussian fitted on reference frames,
||W (mu - mean)||^2 with W a whitening matrix (W^T W = covariance^-1); fitted by export.calibration.
kl:   KL(N(mu, exp(logvar)) || N(0, I)) summed over channels (train.model.kl_to_standard_normal).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Mahalanobis(nn.Module):
    def __init__(self, mean: np.ndarray, whitening: np.ndarray):
        super().__init__()
        mean = np.asarray(mean, dtype=np.float32)
        whitening = np.asarray(whitening, dtype=np.float32)
        if whitening.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(f"whitening matrix {whitening.shape} does not fit mean {mean.shape}")
        self.dim = int(mean.shape[0])
        self.register_buffer("whitening_t", torch.from_numpy(whitening.T.copy()))
        # W (mu - mean) = W mu - W mean: one Gemm with a bias (the shift) instead of a Sub and a MatMul
        self.register_buffer("shift", torch.from_numpy((-(whitening.astype(np.float64) @ mean.astype(np.float64)))
                                                       .astype(np.float32)))

    @classmethod
    def identity(cls, dim: int) -> Mahalanobis:
        """A standard-normal reference (mean 0, identity whitening): maha = ||mu||^2."""
        return cls(np.zeros(dim, np.float32), np.eye(dim, dtype=np.float32))

    def forward(self, mu: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        """mu: (..., C) -> (...). frames: mu's fixed number of frames, (B, frames, C), for graphs
        whose time length is fixed (the streaming ones): their reshapes then need no shape ops."""
        z = torch.addmm(self.shift, mu.reshape(-1, self.dim), self.whitening_t)  # one Gemm in ONNX
        z2 = (z * z).sum(-1)
        return z2.reshape(-1, frames) if frames is not None else z2.reshape(mu.shape[:-1])


def make_scorers(level_dims: dict[str, int], gaussians: dict[str, tuple[np.ndarray, np.ndarray]] | None
                 ) -> nn.ModuleDict:
    """One Mahalanobis module per level; identity for levels without a fitted Gaussian."""
    gaussians = gaussians or {}
    return nn.ModuleDict({
        level: Mahalanobis(*gaussians[level]) if level in gaussians else Mahalanobis.identity(dim)
        for level, dim in level_dims.items()
    })
