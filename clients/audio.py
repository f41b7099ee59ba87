"""Audio files for the clients: any format soundfile reads, mixed down to mono and resampled."""
from __future__ import annotations

from pathlib import Path

import numpy as np


class AudioFileError(ValueError):
    """An audio file that cannot be used; the message names the file and the problem."""


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """A file's samples as float32 mono (channels averaged) and its sample rate."""
    import soundfile as sf

    path = Path(path)
    try:
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types; all mean "cannot read"
        raise AudioFileError(f"{path}: cannot read audio ({exc})") from None
    audio = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    if audio.size == 0:
        raise AudioFileError(f"{path}: contains no audio samples (an empty or truncated file)")
    if not np.all(np.isfinite(audio)):
        raise AudioFileError(f"{path}: contains NaN or infinite samples")
    return np.ascontiguousarray(audio, dtype=np.float32), int(rate)


def truncation(path: str | Path) -> str | None:
    """What is missing from a file whose header promises more audio than it holds (a recording cut
    off while being written or copied), e.g. "data : 32000 bytes in the header, 15979 in the file";
    None for a complete file. libsndfile reads such a file up to where it ends, without an error."""
    import re

    import soundfile as sf

    try:
        info = sf.info(str(path)).extra_info
    except Exception:  # unreadable: read_audio says why
        return None
    m = re.search(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", info, re.MULTILINE)
    if m is None or int(m.group(2)) >= int(m.group(1)):
        return None
    header, present = int(m.group(1)), int(m.group(2))
    return (f"{path}: truncated: its header promises {header} bytes of audio, the file holds {present} "
            f"({100.0 * present / header:.0f} %); only those are streamed")


def resample(audio: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """float32 samples at target_rate (soxr; the same array when the rates are equal)."""
    if rate == target_rate:
        return audio
    import soxr

    return np.ascontiguousarray(soxr.resample(audio, rate, target_rate), dtype=np.float32)


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """A file as float32 mono samples at sample_rate."""
    audio, rate = read_audio(path)
    out = resample(audio, rate, sample_rate)
    if out is not audio and not np.all(np.isfinite(out)):  # finite samples near the float32 limit
        raise AudioFileError(f"{path}: samples far outside [-1, 1] overflow when resampled from {rate} to "
                             f"{sample_rate} Hz")
    return out
