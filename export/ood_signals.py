"""Audio an OOD flag should (or should not) fire on, made here so checks need no download.

- anomalies (should be flagged): white noise at several levels, pure tones, time-reversed words;
- edge cases (reported, no expectation): silence, words clipped hard (x20 gain into [-1, 1]);
- in-distribution: the words themselves (held-out corpus words: should mostly not be flagged).

The tone generator is train.ood's (the training study's OOD separation uses it too).
"""
from __future__ import annotations

import numpy as np

from train.ood import CLIP_SAMPLES, TONE_HZ, TONE_PEAK, synthetic_signals

NOISE_LEVELS = (0.003, 0.01, 0.03, 0.1, 0.3)  # RMS of the white noise (full scale 1.0)
ANOMALIES = ("white noise", "pure tone", "time-reversed words")
CLIP_GAIN = 20.0  # "clipped words": the words times this, clipped to [-1, 1]


def white_noise(rms: float, n: int, seed: int = 0, samples: int = CLIP_SAMPLES) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rms * rng.standard_normal(samples)).astype(np.float32) for _ in range(n)]


def signal_set(words: list[np.ndarray], n_per_kind: int, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """{signal name: clips}: white noise per level of NOISE_LEVELS, pure tones over TONE_HZ x TONE_PEAK,
    the words time-reversed and clipped, and silence. `words`: in-distribution clips to transform."""
    out: dict[str, list[np.ndarray]] = {}
    for i, rms in enumerate(NOISE_LEVELS):
        out[f"white noise, RMS {rms:g}"] = white_noise(rms, n_per_kind, seed + i)
    out["pure tone"] = synthetic_signals(max(n_per_kind, len(TONE_HZ) * len(TONE_PEAK)), seed)["pure tone"]
    out["time-reversed words"] = [w[::-1].copy() for w in words[:n_per_kind]]
    out["clipped words"] = [np.clip(CLIP_GAIN * w, -1.0, 1.0).astype(np.float32) for w in words[:n_per_kind]]
    out["silence"] = [np.zeros(CLIP_SAMPLES, np.float32) for _ in range(max(1, n_per_kind // 10))]
    return out


def is_anomaly(name: str) -> bool:
    """Whether a signal of signal_set should be flagged."""
    return name.startswith(ANOMALIES)


__all__ = ["ANOMALIES", "CLIP_GAIN", "NOISE_LEVELS", "TONE_HZ", "TONE_PEAK", "is_anomaly", "signal_set", "white_noise"]
