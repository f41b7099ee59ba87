"""Audio constants (with units) and audio loading. Torch-free: serve/ and clients/ import it.

Every number that describes the encoder's time geometry is defined here once; the rest of
the project (model, streaming export, service) derives from these.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000  # Hz; the only rate the encoder accepts

# The five convolutions of the encoder: (kernel, stride, padding), each in frames of its own input.
CONV_LAYERS: tuple[tuple[int, int, int], ...] = (
    (10, 5, 2),
    (8, 4, 2),
    (4, 2, 2),
    (4, 2, 2),
    (4, 2, 1),
)

# Output levels. The conv layers are grouped into modules, each named by the level its output is:
# SIM and GIM train three modules greedily; CPC trains one module of all five layers end to end, and its
# output is level m3. The GRU ("ar") reads the last module's output, one frame per HOP.
GREEDY_MODULES: tuple[tuple[str, tuple[int, ...]], ...] = (("m1", (0, 1)), ("m2", (2, 3)), ("m3", (4,)))
END_TO_END_MODULES: tuple[tuple[str, tuple[int, ...]], ...] = (("m3", (0, 1, 2, 3, 4)),)
END_TO_END_METHODS = ("cpc",)
AR = "ar"
CONV_LEVELS: tuple[str, ...] = tuple(name for name, _ in GREEDY_MODULES)  # m1 m2 m3
LEVELS: tuple[str, ...] = CONV_LEVELS + (AR,)  # every level, in order: m1 m2 m3 ar

CROP_SAMPLES = 10_240  # samples per training clip (640 ms), as in the paper


def _layer_strides() -> list[int]:
    """Input-sample stride of each layer's input frames (1 for the first layer)."""
    strides, s = [], 1
    for _, stride, _ in CONV_LAYERS:
        strides.append(s)
        s *= stride
    return strides


HOP = math.prod(s for _, s, _ in CONV_LAYERS)  # samples per top-level frame: 160 (10 ms)
RECEPTIVE_FIELD = 1 + sum((k - 1) * j for (k, _, _), j in zip(CONV_LAYERS, _layer_strides()))  # 465 samples
LEFT_REACH = sum(p * j for (_, _, p), j in zip(CONV_LAYERS, _layer_strides()))  # 212: frame f starts at HOP*f - 212
LOOKAHEAD = RECEPTIVE_FIELD - LEFT_REACH - HOP  # 93 samples beyond a frame's own hop


def conv_modules(method: str = "sim") -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The conv modules of a method, (level name, layer ids) in order."""
    return END_TO_END_MODULES if method in END_TO_END_METHODS else GREEDY_MODULES


def levels(method: str = "sim") -> tuple[str, ...]:
    """A method's output levels in order: its conv modules, then the GRU (SIM/GIM: m1 m2 m3 ar; CPC: m3 ar)."""
    return tuple(name for name, _ in conv_modules(method)) + (AR,)


def level_layers(method: str = "sim") -> dict[str, int]:
    """The conv layer whose output each conv level is (the GRU follows the last one)."""
    return {name: layers[-1] for name, layers in conv_modules(method)}


def level_hops() -> dict[str, int]:
    """Samples per frame at each output level (m1: 20, m2: 80, m3 and ar: 160)."""
    strides = [s for _, s, _ in CONV_LAYERS]
    hops = {name: math.prod(strides[: last + 1]) for name, last in level_layers().items()}
    hops[AR] = HOP
    return hops


def conv_out_len(n: int, kernel: int, stride: int, padding: int) -> int:
    """Frames a Conv1d emits for n input frames (floor, as torch does); 0 when it emits none."""
    return max(0, (n + 2 * padding - kernel) // stride + 1)


def frames_per_layer(n_samples: int) -> list[int]:
    """Offline frame count after each conv layer for a waveform of n_samples."""
    counts, n = [], n_samples
    for k, s, p in CONV_LAYERS:
        n = conv_out_len(n, k, s, p)
        counts.append(n)
    return counts


def level_frames(n_samples: int) -> dict[str, int]:
    """Offline frame count of each level (m1, m2, m3, ar) for a waveform of n_samples."""
    counts = frames_per_layer(n_samples)
    out = {name: counts[last] for name, last in level_layers().items()}
    out[AR] = counts[-1]
    return out


class AudioError(ValueError):
    """An audio file that cannot be used as it is; the message names the file and the problem."""


def load_audio(path: str | Path, *, allow_resample: bool = False, mixdown: bool = False) -> np.ndarray:
    """Read a file into float32 mono samples at SAMPLE_RATE.

    By default a file at another rate or with several channels is an error (training data
    must be what the model expects); clients pass allow_resample/mixdown to convert.
    """
    import soundfile as sf

    path = Path(path)
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types; all mean "cannot read"
        raise AudioError(f"{path}: cannot read audio ({exc})") from None
    if audio.shape[1] != 1:
        if not mixdown:
            raise AudioError(f"{path}: has {audio.shape[1]} channels; mono is required")
        audio = audio.mean(axis=1, keepdims=True)
    audio = audio[:, 0]
    if rate != SAMPLE_RATE:
        if not allow_resample:
            raise AudioError(f"{path}: sample rate is {rate} Hz; {SAMPLE_RATE} Hz is required")
        import soxr

        audio = soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)
    if not np.all(np.isfinite(audio)):
        raise AudioError(f"{path}: contains NaN or infinite samples")
    return np.ascontiguousarray(audio, dtype=np.float32)


assert HOP == 160 and RECEPTIVE_FIELD == 465 and LEFT_REACH == 212 and LOOKAHEAD == 93
