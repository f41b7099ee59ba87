"""Offline reference: the trained Encoder over a whole waveform, any length (even too short for a frame).

train.model.Encoder.encode needs at least one frame at every layer (torch's Conv1d refuses an input
shorter than its kernel); this runs the same modules layer by layer and returns empty levels instead,
so streaming can be compared with the offline model down to a single sample.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from export.scores import Mahalanobis
from train.audio import conv_out_len
from train.model import Encoder, channels_last, fold_batch_norm, kl_to_standard_normal


@torch.no_grad()
def offline_levels(encoder: Encoder, audio: np.ndarray, scorers: dict[str, Mahalanobis] | None = None
                   ) -> dict[str, np.ndarray]:
    """1-D waveform -> {"mu_L": (n, C), "logvar_L"/"kl_L" (variational conv levels), "maha_L" (with scorers)}.

    Frame counts follow train.audio.level_frames (floor per layer over the zero-padded input). For
    fewer than 6 samples that formula gives a layer with no input a frame made of padding alone
    (e.g. m2 for 0..5 samples); torch's Conv1d refuses a zero-length input, so that case pads explicitly.
    """
    audio = np.asarray(audio, dtype=np.float32)
    encoder = fold_batch_norm(encoder)  # exact in eval mode; leaves plain conv -> ReLU layers
    dims = encoder.dims
    out: dict[str, np.ndarray] = {}
    x = torch.from_numpy(audio).reshape(1, 1, -1)
    for level, module in encoder.convs.items():
        h = x
        for conv in module.convs:
            h = torch.relu(_conv(conv, h))
        mu = _conv(module.mu, h)
        logvar = _conv(module.logvar, h) if module.logvar is not None else None
        x = mu
        mu_t = channels_last(mu)[0]  # the encoder's own layout, so that its sums round alike
        out[f"mu_{level}"] = mu_t.numpy()
        if logvar is not None:
            logvar_t = channels_last(logvar)[0]
            out[f"logvar_{level}"] = logvar_t.numpy()
            out[f"kl_{level}"] = kl_to_standard_normal(mu_t, logvar_t).numpy()
    top = torch.from_numpy(out[f"mu_{dims.levels[-2]}"]).unsqueeze(0)
    out["mu_ar"] = (encoder.gru(top)[0][0] if top.shape[1] else torch.zeros(0, dims.hidden)).numpy()
    if scorers is not None:
        for level in dims.levels:
            out[f"maha_{level}"] = scorers[level](torch.from_numpy(out[f"mu_{level}"])).numpy()
    return out


def _conv(conv: torch.nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """conv(x), also for inputs torch refuses: zero-length (padding only) or shorter than the kernel."""
    (k,), (s,), (p,) = conv.kernel_size, conv.stride, conv.padding
    n_out = conv_out_len(x.shape[2], k, s, p)
    if n_out == 0:
        return x.new_zeros(x.shape[0], conv.out_channels, 0)
    if x.shape[2] == 0:
        return F.conv1d(F.pad(x, (p, p)), conv.weight, conv.bias, stride=s)
    return conv(x)
