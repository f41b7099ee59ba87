"""Figures for the evaluation (matplotlib, headless Agg backend) and WAV writing."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from train.audio import SAMPLE_RATE  # noqa: E402


def write_wav(path: str | Path, audio, rate: int = SAMPLE_RATE) -> Path:
    """16-bit PCM WAV; values clipped to [-1, 1]."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0), rate, subtype="PCM_16")
    return path


def spectrogram(audio, n_fft: int = 512, hop: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frequencies Hz, times s, power dB (F, T)) of a mono waveform, Hann window."""
    x = np.asarray(audio, dtype=np.float64)
    if len(x) < n_fft:
        x = np.pad(x, (0, n_fft - len(x)))
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop] * np.hanning(n_fft)
    power = np.abs(np.fft.rfft(frames, axis=1)).T ** 2
    db = 10 * np.log10(power + 1e-10)
    freqs = np.fft.rfftfreq(n_fft, 1 / SAMPLE_RATE)
    times = (np.arange(frames.shape[0]) * hop + n_fft / 2) / SAMPLE_RATE
    return freqs, times, db


def _spec_axes(ax, audio, vmin=None, vmax=None):
    f, t, db = spectrogram(audio)
    top = db.max() if vmax is None else vmax
    ax.pcolormesh(t, f / 1000, db, shading="auto", vmin=top - 80 if vmin is None else vmin, vmax=top,
                  cmap="magma")
    ax.set_ylabel("kHz")


def plot_waves_and_spectrograms(audios, labels, path: str | Path, title: str = "") -> Path:
    """One row per waveform: the waveform left, its spectrogram right."""
    n = len(audios)
    fig, axes = plt.subplots(n, 2, figsize=(11, 1.6 * n + 0.8), squeeze=False, sharex="col")
    top = max(spectrogram(a)[2].max() for a in audios)
    for i, (a, lab) in enumerate(zip(audios, labels)):
        t = np.arange(len(a)) / SAMPLE_RATE
        axes[i, 0].plot(t, a, lw=0.5, color="k")
        axes[i, 0].set_ylabel(lab, rotation=0, ha="right", va="center", fontsize=8)
        _spec_axes(axes[i, 1], a, vmax=top)
    axes[-1, 0].set_xlabel("s")
    axes[-1, 1].set_xlabel("s")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_spectrogram_grid(grid, row_labels, col_labels, path: str | Path, title: str = "") -> Path:
    """grid[r][c] is a waveform; a spectrogram per cell, shared colour scale."""
    rows, cols = len(grid), len(grid[0])
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols + 0.8, 1.5 * rows + 0.8), squeeze=False,
                             sharex=True, sharey=True)
    top = max(spectrogram(a)[2].max() for row in grid for a in row)
    for r in range(rows):
        for c in range(cols):
            _spec_axes(axes[r, c], grid[r][c], vmax=top)
            axes[r, c].set_ylabel(row_labels[r] if c == 0 else "", fontsize=8)
            if r == 0:
                axes[r, c].set_title(col_labels[c], fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_weight_histograms(values: dict, path: str | Path, title: str = "") -> Path:
    """values[level][method] = 1-d array of scaled weights; one panel per level, methods overlaid."""
    levels = list(values)
    fig, axes = plt.subplots(1, len(levels), figsize=(4.2 * len(levels), 3.4), squeeze=False)
    bins = np.linspace(-1, 1, 41)
    for ax, lv in zip(axes[0], levels):
        for method, v in values[lv].items():
            ax.hist(np.asarray(v).ravel(), bins=bins, histtype="step", density=True, lw=1.4, label=method)
        ax.set_title(lv)
        ax.set_xlabel("weight / max |weight|")
        ax.legend(fontsize=8)
    axes[0, 0].set_ylabel("density")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_relative_errors(curves: dict, path: str | Path, title: str = "") -> Path:
    """curves[level][method] = (ks, mean relative error %); one panel per level, log2 k axis."""
    levels = list(curves)
    fig, axes = plt.subplots(1, len(levels), figsize=(4.2 * len(levels), 3.4), squeeze=False, sharey=True)
    for ax, lv in zip(axes[0], levels):
        for method, (ks, err) in curves[lv].items():
            ax.plot(ks, err, marker="o", ms=3, label=method)
        ax.set_xscale("log", base=2)
        ax.set_title(lv)
        ax.set_xlabel("k (dims copied)")
        ax.legend(fontsize=8)
    axes[0, 0].set_ylabel("relative error %")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
