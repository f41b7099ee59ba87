"""Encode a whole file offline: `python -m train.encode AUDIO --checkpoint PATH --out X.npz`.

Deterministic (posterior means). Saves m1, m2, m3 (frames x 512), ar (frames x 256) and, for SIM,
kl_m1, kl_m2, kl_m3 (per-frame KL to N(0, I), nats). The streaming service must reproduce these.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from train.audio import AudioError, load_audio
from train.checkpoint import CheckpointError, load_encoder
from train.cli import fail
from train.model import Encoder


def encode_array(encoder: Encoder, audio: np.ndarray) -> dict[str, np.ndarray]:
    """Offline encoding of one mono 16 kHz waveform: level -> (frames, C), kl_level -> (frames,)."""
    with torch.no_grad():
        out = encoder.encode(torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))[None])
    return {name: t[0].cpu().numpy().astype(np.float32) for name, t in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.encode", description=__doc__.split("\n\n")[0])
    p.add_argument("audio", help="16 kHz mono wav/flac (other rates and stereo are converted with --convert)")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by python -m train.sim")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--convert", action="store_true", help="resample to 16 kHz and mix down to mono if needed")
    a = p.parse_args(argv)
    try:
        encoder, _ = load_encoder(a.checkpoint)
        audio = load_audio(a.audio, allow_resample=a.convert, mixdown=a.convert)
    except (CheckpointError, AudioError) as exc:
        return fail(str(exc))
    arrays = encode_array(encoder, audio)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(a.out, **arrays)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items())
    print(f"{a.audio}: {len(audio)} samples -> {a.out}: {shapes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
