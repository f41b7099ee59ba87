"""Frozen encoder features for the evaluation: audio batches, per-level latents, syllable crops.

Levels. For SIM and GIM, m1/m2/m3 are the posterior means (mu) of the three conv modules and ar
is the GRU output. CPC has a single conv module; as in the paper (§4.3.1, §4.3.3) its m1 and m2
are "the equivalent layers": the ReLU outputs of conv layers 2 and 4 of that module (the layers
where SIM's m1 and m2 end); its m3 is its mu.

Syllable crops (the probes' inputs, paper §4.2): each word is cut into its three syllables with
the corpus boundaries, and each syllable is zero-padded at both ends (centred) to one common
length. Features are the time average of a level over all frames of the padded crop, as in the
paper's average pooling.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from train.audio import CROP_SAMPLES, HOP, LEVELS, level_layers, load_audio
from train.model import Encoder


def fit_length(audio: np.ndarray, n: int, centre: bool = False) -> np.ndarray:
    """Zero-pad or crop to n samples; at the end, or symmetrically when centre is set."""
    if len(audio) >= n:
        start = (len(audio) - n) // 2 if centre else 0
        return audio[start:start + n]
    left = (n - len(audio)) // 2 if centre else 0
    out = np.zeros(n, dtype=np.float32)
    out[left:left + len(audio)] = audio
    return out


def load_batch(utterances, n_samples: int = CROP_SAMPLES) -> torch.Tensor:
    """Whole words, zero-padded or cropped at the end to n_samples (default: the paper's 640 ms crop)."""
    if not utterances:
        return torch.zeros(0, n_samples)
    return torch.from_numpy(np.stack([fit_length(load_audio(u.path), n_samples) for u in utterances]))


def syllable_length(utterances) -> int:
    """Longest syllable among the utterances, rounded up to a whole number of 10 ms hops."""
    longest = max(int(e - s) for u in utterances for s, e in u.bounds)
    return -(-longest // HOP) * HOP


@dataclass
class Syllables:
    audio: torch.Tensor  # (3N, length), each syllable centred in zeros
    vowel: torch.Tensor  # (3N,) index into corpus.VOWELS
    syllable: torch.Tensor  # (3N,) index into corpus.SYLLABLES
    word: list[str]  # (3N,) the word each crop came from


def syllable_crops(utterances, length: int) -> Syllables:
    from train.corpus import SYLLABLES, VOWELS

    crops, vowels, syls, words = [], [], [], []
    for u in utterances:
        audio = load_audio(u.path)
        for (s, e), syl, v in zip(u.bounds, u.syllables, u.vowels):
            crops.append(fit_length(audio[int(s):int(e)], length, centre=True))
            vowels.append(VOWELS.index(v))
            syls.append(SYLLABLES.index(syl))
            words.append(u.word)
    audio_t = torch.from_numpy(np.stack(crops)) if crops else torch.zeros(0, length)
    return Syllables(audio_t, torch.tensor(vowels, dtype=torch.long), torch.tensor(syls, dtype=torch.long), words)


def level_outputs(encoder: Encoder, audio: torch.Tensor, levels) -> dict[str, torch.Tensor]:
    """Deterministic latents (B, T, C) channels-last for the asked levels, for any method."""
    out: dict[str, torch.Tensor] = {}
    dims = encoder.dims
    need_intermediate = [lv for lv in levels if lv not in dims.levels]
    if need_intermediate:  # CPC's m1 / m2: activations inside its single module
        module = encoder.convs["m3"]
        want = {level_layers()[lv]: lv for lv in need_intermediate}  # the layers where SIM's levels end
        for i, x in enumerate(module.layer_outputs(audio.unsqueeze(1))):
            if i in want:
                out[want[i]] = x.transpose(1, 2)
    if any(lv in dims.levels for lv in levels):
        enc = encoder.encode(audio)
        for lv in levels:
            if lv in dims.levels:
                out[lv] = enc[lv]
    return {lv: out[lv] for lv in levels}


@torch.no_grad()
def encode_levels(encoder: Encoder, audio: torch.Tensor, levels, *, device: str | torch.device = "cpu",
                  batch: int = 64, pooled: bool = False) -> dict[str, torch.Tensor]:
    """Latents of a whole batch of audio (N, S), computed in chunks; returns CPU float32 tensors,
    (N, T, C) per level, or (N, C) time averages when pooled."""
    for lv in levels:
        if lv not in LEVELS:
            raise ValueError(f"unknown level {lv!r}; choose from {LEVELS}")
    was_training = encoder.training
    encoder.eval()
    parts: dict[str, list[torch.Tensor]] = {lv: [] for lv in levels}
    for i in range(0, audio.shape[0], batch):
        res = level_outputs(encoder, audio[i:i + batch].to(device), levels)
        for lv, t in res.items():
            parts[lv].append((t.mean(1) if pooled else t).float().cpu())
    encoder.train(was_training)
    return {lv: torch.cat(p) if p else torch.zeros(0) for lv, p in parts.items()}
