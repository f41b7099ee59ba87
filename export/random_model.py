"""Randomly initialised encoders exported like trained ones, for the tests and the benchmarks
(where the graphs' shapes and the plumbing matter, not what a model has learnt).

    export_random_model(out, corpus, ModelSpec("sim", 512, 256), int8=True)

writes the checkpoint (and decoders) next to `out` and runs `python -m export.onnx` on them once:
a directory that already holds a manifest is reused.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from serve.model_dir import MANIFEST
from train.checkpoint import encoder_checkpoint, save_atomic
from train.decoder import Decoder, save_decoder
from train.model import Encoder, ModelSpec

ROOT = Path(__file__).resolve().parent.parent


def write_checkpoint(path: Path, dims: ModelSpec, seed: int | None = 0) -> Encoder:
    """A random encoder of these dims saved as a training checkpoint; seed None continues torch's generator."""
    if seed is not None:
        torch.manual_seed(seed)
    encoder = Encoder(dims).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(encoder_checkpoint(encoder, {"method": dims.method, "beta": 0.0033}), path)
    return encoder


def write_decoders(directory: Path, levels, dims: ModelSpec, seed: int | None = None) -> Path:
    """Random decoders for these levels, saved as directory/decoder_<level>.pt (seed None continues
    torch's generator)."""
    if seed is not None:
        torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for level in levels:
        save_decoder(Decoder(level, dims.channels), directory / f"decoder_{level}.pt", dims.to_dict())
    return directory


def checkpoint_of(out: Path) -> Path:
    """Where export_random_model keeps the checkpoint of the model it exported to out."""
    return out.with_name(out.name + ".pt")


def decoders_of(out: Path) -> Path:
    """Where export_random_model keeps the decoders (decoder_<level>.pt) of the model it exported to out."""
    return out.with_name(out.name + "_decoders")


def export_random_model(out: Path, corpus: Path, dims: ModelSpec, *, decoders=(), int8: bool = False,
                        seed: int = 0, calibration_clips: int = 10, timeout: float | None = None) -> Path:
    """out: the exported directory of a random encoder (and decoders for those levels), calibrated on
    `calibration_clips` clips of corpus's test split, without the verification (the tests verify
    exports themselves). The checkpoint and decoders go next to it (checkpoint_of, decoders_of).
    Reused when out already holds a manifest."""
    out = Path(out)
    if (out / MANIFEST).is_file():
        return out
    ckpt = checkpoint_of(out)
    write_checkpoint(ckpt, dims, seed)
    args = [sys.executable, "-m", "export.onnx", str(ckpt), "--out", str(out), "--corpus", str(corpus),
            "--calibration-clips", str(calibration_clips), "--skip-verify"]
    if decoders:
        args += ["--decoders", str(write_decoders(decoders_of(out), decoders, dims))]
    if int8:
        args.append("--int8")
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"exporting a random {dims.method} encoder to {out} failed:\n{proc.stderr[-3000:]}")
    return out
