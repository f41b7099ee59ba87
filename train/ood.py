"""Out-of-distribution separation: does a trained encoder's score tell speech it knows from audio it doesn't?

The service flags anomalies from a per-frame score; this measures, offline, how well the
per-utterance mean of that score separates in-distribution audio (held-out test words of the
training voices) from:
  - white noise at several levels, pure tones, time-reversed test words (should separate: AUROC near 1);
  - words of the held-out voice (same language, new voice: should NOT separate much).

Scores per level:
  kl    KL(N(mu, sigma^2) || N(0, I)) per frame, summed over channels (SIM levels only);
  maha  squared Mahalanobis distance of mu under a Gaussian fitted on frames of training words, with
        the estimator the export calibrates the served score with (train.gaussian: Ledoit-Wolf
        shrinkage, floored eigenvalues); every method is served with it.
The "all" row averages each level's utterance score after standardising it by the mean and std
of the in-distribution reference (training words), so levels with large scores do not dominate.

AUROC = P(score of an OOD utterance > score of a test word), ties counted half.
"""
from __future__ import annotations

import numpy as np
import torch

from train.audio import SAMPLE_RATE
from train.gaussian import fit_gaussian, mahalanobis
from train.model import Encoder, fold_batch_norm, kl_to_standard_normal

CLIP_SAMPLES = 9_600  # 0.6 s, the length of a typical corpus word
NOISE_RMS = (0.01, 0.03, 0.1)
TONE_HZ = (150.0, 300.0, 440.0, 1000.0, 2000.0, 4000.0)
TONE_PEAK = (0.05, 0.3)


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve for "positive scores higher", from all pairs (ties count half)."""
    pos, neg = np.asarray(positive, float)[:, None], np.asarray(negative, float)[None, :]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def synthetic_signals(n_per_kind: int, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """White noise at each of NOISE_RMS and pure tones over TONE_HZ x TONE_PEAK, 0.6 s each."""
    rng = np.random.default_rng(seed)
    t = np.arange(CLIP_SAMPLES) / SAMPLE_RATE
    noise = [(NOISE_RMS[i % len(NOISE_RMS)] * rng.standard_normal(CLIP_SAMPLES)).astype(np.float32)
             for i in range(n_per_kind)]
    tones = []
    for i in range(n_per_kind):
        hz, peak = TONE_HZ[i % len(TONE_HZ)], TONE_PEAK[(i // len(TONE_HZ)) % len(TONE_PEAK)]
        tones.append((peak * np.sin(2 * np.pi * hz * t + rng.uniform(0, 2 * np.pi))).astype(np.float32))
    return {"white noise": noise, "pure tone": tones}


@torch.no_grad()
def posterior_frames(encoder: Encoder, audio: np.ndarray, device) -> dict[str, dict[str, torch.Tensor]]:
    """level -> {"mu": (T, C), "kl": (T,) if variational} for one waveform."""
    out = encoder.forward(torch.from_numpy(np.ascontiguousarray(audio, np.float32))[None].to(device))
    res = {}
    for level, o in out.items():
        res[level] = {"mu": o.mu[0].float()}
        if o.logvar is not None:
            res[level]["kl"] = kl_to_standard_normal(o.mu[0], o.logvar[0]).float()
    return res


class GaussianScore:
    """Squared Mahalanobis distance under a Gaussian fitted on reference frames: the estimator the
    export calibrates the served `maha` score with (train.gaussian), so these AUROCs are the service's."""

    def __init__(self, frames: torch.Tensor):
        self.mean, self.whitening, _ = fit_gaussian(frames.numpy())

    def __call__(self, frames: torch.Tensor) -> np.ndarray:
        return mahalanobis(frames.numpy(), self.mean, self.whitening)


def utterance_scores(frames: list[dict], gaussians: dict[str, GaussianScore]) -> dict[str, dict[str, np.ndarray]]:
    """score kind -> level -> (N,) mean per-frame score of each utterance's posterior_frames."""
    scores: dict[str, dict[str, list[float]]] = {"kl": {}, "maha": {}}
    for per_level in frames:
        for level, f in per_level.items():
            scores["maha"].setdefault(level, []).append(float(gaussians[level](f["mu"].cpu()).mean()))
            if "kl" in f:
                scores["kl"].setdefault(level, []).append(float(f["kl"].mean()))
    return {kind: {lv: np.array(v) for lv, v in per.items()} for kind, per in scores.items() if per}


def ood_separation(encoder: Encoder, utterances: dict[str, list], *, n_synthetic: int = 60, device="cpu",
                   seed: int = 0) -> dict:
    """AUROC per score kind, level and signal type against the held-out test words.

    utterances: {"train": [...], "test": [...], "test_voice": [...]} corpus Utterances; train
    words fit the Mahalanobis Gaussians and the standardisation, test words are the negatives."""
    from train.audio import load_audio

    def load(utts) -> list[np.ndarray]:
        return [load_audio(u.path) for u in utts]

    def encode(audios) -> list[dict]:
        return [posterior_frames(encoder, a, device) for a in audios]

    encoder = fold_batch_norm(encoder).eval().to(device)
    test = load(utterances["test"])
    train_frames = encode(load(utterances["train"]))  # encoded once: fits the Gaussians and the standardisation
    gaussians = {lv: GaussianScore(torch.cat([f[lv]["mu"].cpu() for f in train_frames])) for lv in train_frames[0]}
    signals = {"time-reversed words": [a[::-1].copy() for a in test], **synthetic_signals(n_synthetic, seed),
               "held-out voice words": load(utterances["test_voice"])}
    reference = utterance_scores(train_frames, gaussians)
    negative = utterance_scores(encode(test), gaussians)
    result: dict = {"n": {"train": len(train_frames), "test": len(test), **{k: len(v) for k, v in signals.items()}},
                    "auroc": {}, "mean_score": {}}
    for name, audios in signals.items():
        positive = utterance_scores(encode(audios), gaussians)
        for kind, per_level in positive.items():
            table = result["auroc"].setdefault(kind, {})
            means = result["mean_score"].setdefault(kind, {})
            z_pos, z_neg = [], []
            for level, pos in per_level.items():
                neg = negative[kind][level]
                table.setdefault(level, {})[name] = auroc(pos, neg)
                means.setdefault(level, {})[name] = float(pos.mean())
                means[level]["test words"] = float(neg.mean())
                ref = reference[kind][level]
                mu, sd = ref.mean(), ref.std() + 1e-12
                z_pos.append((pos - mu) / sd)
                z_neg.append((neg - mu) / sd)
            table.setdefault("all", {})[name] = auroc(np.mean(z_pos, 0), np.mean(z_neg, 0))
    return result


def format_tables(result: dict) -> list[str]:
    """Markdown tables, one per score kind: rows are levels, columns signal types."""
    lines = []
    for kind, per_level in result["auroc"].items():
        signals = list(next(iter(per_level.values())))
        lines += [f"AUROC, score `{kind}` (utterance mean; test words = negatives)", "",
                  "| level | " + " | ".join(signals) + " |", "|---" * (len(signals) + 1) + "|"]
        for level, row in per_level.items():
            lines.append(f"| {level} | " + " | ".join(f"{row[s]:.3f}" for s in signals) + " |")
        lines.append("")
    return lines
