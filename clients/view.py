"""Text rendering for the clients: sparklines, an input level meter, an OOD timeline."""
from __future__ import annotations

import math

import numpy as np

BARS = "▁▂▃▄▅▆▇█"


def sparkline(values, lo: float | None = None, hi: float | None = None) -> str:
    """One block character per value, scaled between lo and hi (default: the values' range)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return ""
    lo = float(np.nanmin(v)) if lo is None else lo
    hi = float(np.nanmax(v)) if hi is None else hi
    span = hi - lo if hi > lo else 1.0
    pos = np.clip((v - lo) / span, 0.0, 1.0)
    return "".join(BARS[int(round(p * (len(BARS) - 1)))] if np.isfinite(p) else " " for p in pos)


def dbfs(samples: np.ndarray) -> float:
    """RMS level in dB relative to full scale (-inf for silence)."""
    s = np.asarray(samples, dtype=np.float64)
    rms = math.sqrt(float(np.mean(s * s))) if s.size else 0.0
    return 20.0 * math.log10(rms) if rms > 0 else -math.inf


def level_meter(db: float, width: int = 20, floor: float = -60.0) -> str:
    """[#######.............] -23 dBFS"""
    frac = 0.0 if not math.isfinite(db) else min(1.0, max(0.0, (db - floor) / -floor))
    n = int(round(frac * width))
    label = "  -inf" if not math.isfinite(db) else f"{db:6.1f}"
    return f"[{'#' * n}{'.' * (width - n)}] {label} dBFS"


def ood_timeline(ood: np.ndarray, frames_per_char: int, width: int | None = None) -> str:
    """One character per frames_per_char frames: '.' none flagged, '!' some, '#' half or more."""
    ood = np.asarray(ood, bool)
    chars = []
    for i in range(0, ood.size, frames_per_char):
        frac = float(ood[i:i + frames_per_char].mean())
        chars.append("#" if frac >= 0.5 else "!" if frac > 0 else ".")
    text = "".join(chars)
    if width is not None and len(text) > width:
        text = text[:width - 1] + "…"
    return text
