"""Checkpoints: atomic writes, safe loads (weights_only=True), one format for every consumer.

A checkpoint is a dict:
  format       "sim-checkpoint/1"
  dims         ModelSpec as a dict (method, channels, hidden)
  model        Encoder.state_dict()
  loss         SimLoss.state_dict() (InfoNCE predictors), needed to resume
  optimizer    optimiser state, needed to resume
  rng          RNG states (torch CPU, CUDA if any, data sampler), needed to resume exactly
  epoch        completed epochs
  step         optimiser steps taken
  config       the full training configuration (a plain dict)
  code_version git revision of the code that wrote it, or "unknown"
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from train.model import Encoder, ModelSpec

FORMAT = "sim-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message says which file and why."""


def code_version() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=5)
        if rev.returncode == 0:
            return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def save_atomic(obj: dict, path: str | Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target: a crash or
    a full disk at any moment leaves the previous file whole. A failed write raises CheckpointError
    naming the file (the temporary file is removed); a successful one removes the temporary files of
    earlier saves that were killed mid-write (one writer per checkpoint path is assumed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a checkpoint is an ordinary file
        os.replace(tmp, path)
        for stale in path.parent.glob(path.name + ".*.tmp"):  # left by saves killed mid-write
            stale.unlink(missing_ok=True)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, (OSError, RuntimeError)):  # torch reports a failed write as a RuntimeError
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
            free = shutil.disk_usage(path.parent).free / 2**20
            kept = f"; the previous {path.name} is kept" if path.exists() else ""
            raise CheckpointError(f"{path}: could not be written ({why}; {free:.0f} MiB free on its disk, or a "
                                  f"file-size limit){kept}") from exc
        raise


def load(path: str | Path, map_location: str | torch.device = "cpu", *, fmt: str = FORMAT,
         required: tuple[str, ...] = ("dims", "model", "config"), what: str = "checkpoint") -> dict:
    """Load and validate a saved dict of format `fmt`. Raises CheckpointError with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such {what} file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable {what} ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        raise CheckpointError(f"{path}: not a {fmt} file")
    for key in required:
        if key not in ckpt:
            raise CheckpointError(f"{path}: {what} lacks {key!r}")
    return ckpt


def load_encoder(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Encoder, dict]:
    """The trained encoder in eval mode, and the checkpoint dict it came from."""
    ckpt = load(path, map_location)
    try:
        encoder = Encoder(ModelSpec(**ckpt["dims"]))
        encoder.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: weights do not fit the model ({exc})") from None
    return encoder.eval(), ckpt


def trained_corpus(ckpt: dict) -> str | None:
    """The corpus folder a checkpoint's run trained on, as recorded in its config (None if not recorded)."""
    return (ckpt.get("config") or {}).get("corpus_dir")


def encoder_checkpoint(encoder: Encoder, config: dict | None = None, **extra) -> dict:
    """A minimal valid checkpoint for an encoder (tests, untrained baselines)."""
    return {"format": FORMAT, "dims": encoder.dims.to_dict(), "model": encoder.state_dict(),
            "config": dict(config or {}), "epoch": 0, "step": 0, "code_version": code_version(), **extra}
