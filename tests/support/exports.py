"""Helpers for the export and streaming-runtime tests: small random models and their exports.

export_small(method, root, corpus, decoders) runs the real CLI `python -m export.onnx` (in process) on
a small randomly initialised model (ModelSpec(channels=32, hidden=16)) with the small real corpus,
once per test session and (method, decoders); conftest's `exported` fixture calls it.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from export.random_model import write_checkpoint as write_random_checkpoint
from export.random_model import write_decoders as write_random_decoders
from train.model import Encoder, ModelSpec

SMALL = dict(channels=32, hidden=16)
_EXPORTS: dict[tuple[str, bool], Path] = {}


@contextlib.contextmanager
def one_torch_thread():
    """Tiny models: one thread is fastest and does not stall when other processes load the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def small_encoder(method: str, seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(ModelSpec(method=method, **SMALL)).eval()


def write_checkpoint(path: Path, method: str, seed: int = 0) -> Path:
    write_random_checkpoint(path, ModelSpec(method=method, **SMALL), seed)
    return path


def write_decoders(directory: Path, levels=("m1", "m2", "m3"), channels: int = SMALL["channels"],
                   method: str = "sim") -> Path:
    return write_random_decoders(directory, levels, ModelSpec(method, channels, SMALL["hidden"]), seed=5)


def export_small(method: str, root: Path, corpus: Path, decoders: bool = False) -> Path:
    from export.onnx import main

    key = (method, decoders)
    if key not in _EXPORTS:
        name = method + ("_dec" if decoders else "")
        ckpt = write_checkpoint(root / f"{name}.pt", method)
        out = root / name
        args = [str(ckpt), "--out", str(out), "--corpus", str(corpus), "--calibration-clips", "20"]
        if decoders:
            levels = ("m3",) if method == "cpc" else ("m1", "m2", "m3")
            args += ["--decoders", str(write_decoders(root / f"{name}_decoders", levels, method=method))]
        with one_torch_thread():
            assert main(args) == 0
        _EXPORTS[key] = out
    return _EXPORTS[key]

