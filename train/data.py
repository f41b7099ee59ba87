"""What the trainer feeds on: fixed-length clips from the corpus or from a folder of audio.

Two cropping modes:
- "first": the first `crop` samples of each file, zero-padded when shorter (the paper's choice
  for its word corpus: each clip is one word, start aligned).
- "random": a window of `crop` samples at an offset that is a multiple of HOP (160 samples,
  one top-level frame), so frame boundaries stay on the same grid as offline inference. The
  offset is a function of (seed, epoch, index) only: a resumed run that calls set_epoch(e)
  sees exactly the crops of the original run, whatever the worker count or order.

Folders are validated up front (scan_audio_dir): every unusable file is reported at once.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from train.audio import CROP_SAMPLES, HOP, SAMPLE_RATE, load_audio

AUDIO_SUFFIXES = (".wav", ".flac")
MODES = ("first", "random")


class DataError(ValueError):
    """Training audio that cannot be used. `problems` lists (path, problem) for every bad file."""

    def __init__(self, message: str, problems: Sequence[tuple[Path, str]] = ()):
        self.problems = list(problems)
        if self.problems:
            message += "".join(f"\n  {path}: {problem}" for path, problem in self.problems)
        super().__init__(message)


def scan_audio_dir(root: str | Path, min_samples: int = CROP_SAMPLES) -> list[Path]:
    """All *.wav / *.flac files under root (recursive, sorted), each checked with soundfile.info.

    A file is usable if it is readable, 16 kHz, mono and at least min_samples long. Raises
    DataError naming every unusable file and its problem, or if root holds no audio at all.
    """
    import soundfile as sf

    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{root}: no audio files ({', '.join('*' + s for s in AUDIO_SUFFIXES)}) found, recursively")
    problems: list[tuple[Path, str]] = []
    for path in files:
        try:
            info = sf.info(str(path))
        except Exception as exc:  # soundfile raises several types; all mean "cannot read"
            problems.append((path, f"unreadable ({exc})"))
            continue
        issues = []
        if info.samplerate != SAMPLE_RATE:
            issues.append(f"sample rate {info.samplerate} Hz, need {SAMPLE_RATE} Hz")
        if info.channels != 1:
            issues.append(f"{info.channels} channels, need mono")
        if info.frames < min_samples:
            issues.append(f"too short: {info.frames} samples, need at least {min_samples}")
        if issues:
            problems.append((path, "; ".join(issues)))
    if problems:
        raise DataError(
            f"{len(problems)} of {len(files)} audio files under {root} cannot be used "
            f"(convert to {SAMPLE_RATE} Hz mono, e.g. with sox or ffmpeg, or remove them):",
            problems,
        )
    return files


class ClipDataset(Dataset):
    """Fixed-length float32 clips (crop,) from a list of audio files.

    mode "first": the first `crop` samples, zero-padded if shorter. mode "random": `crop`
    samples at a HOP-aligned offset drawn from (seed, epoch, index); call set_epoch(e) once per
    epoch. Files are loaded lazily with train.audio.load_audio; with cache=True each file is
    kept in memory after its first load (only the first `crop` samples in "first" mode).
    """

    def __init__(
        self,
        items: Sequence[str | Path],
        crop: int = CROP_SAMPLES,
        mode: str = "first",
        *,
        seed: int = 0,
        cache: bool = False,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if crop <= 0:
            raise ValueError(f"crop must be positive, not {crop}")
        if not items:
            raise ValueError("ClipDataset needs at least one file")
        self.items = [Path(p) for p in items]
        self.crop = int(crop)
        self.mode = mode
        self.seed = int(seed)
        self.epoch = 0
        self.cache = cache
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Select the random crops of this epoch (no effect in "first" mode)."""
        self.epoch = int(epoch)

    def crop_offset(self, index: int, n_samples: int) -> int:
        """Start sample of the crop of item `index` (a file of n_samples) in the current epoch."""
        if self.mode == "first" or n_samples <= self.crop:
            return 0
        n_positions = (n_samples - self.crop) // HOP + 1
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return HOP * int(rng.integers(n_positions))

    def _audio(self, index: int) -> np.ndarray:
        audio = self._cache.get(index)
        if audio is None:
            audio = load_audio(self.items[index])
            if self.mode == "first":
                audio = np.ascontiguousarray(audio[: self.crop])
            if self.cache:
                self._cache[index] = audio
        return audio

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        audio = self._audio(index)
        start = self.crop_offset(index, len(audio))
        clip = audio[start : start + self.crop]
        if len(clip) < self.crop:
            clip = np.pad(clip, (0, self.crop - len(clip)))
        return torch.from_numpy(np.array(clip, dtype=np.float32))

    def stack(self) -> torch.Tensor:
        """All clips of the current epoch as one (N, crop) float32 tensor (e.g. to keep on a GPU)."""
        return torch.stack([self[i] for i in range(len(self))])


def corpus_dataset(corpus_dir: str | Path, split: str, crop: int = CROP_SAMPLES) -> ClipDataset:
    """The clips of one corpus split ("train", "test", "test_voice"): first-`crop` crops, cached."""
    from train.corpus import load_corpus

    utts = load_corpus(corpus_dir, split)
    if not utts:
        raise DataError(f"{corpus_dir}: split {split!r} is empty")
    return ClipDataset([u.path for u in utts], crop, "first", cache=True)


def folder_dataset(root: str | Path, crop: int = CROP_SAMPLES, seed: int = 0) -> ClipDataset:
    """Every usable *.wav/*.flac under root (validated up front), random HOP-aligned crops."""
    return ClipDataset(scan_audio_dir(root, min_samples=crop), crop, "random", seed=seed)
