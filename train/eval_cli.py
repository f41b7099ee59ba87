"""Small pieces shared by the evaluation commands (probe, decoder, report, ...): error exits,
device choice, and finding the corpus a checkpoint was trained on."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def fail(message: str) -> int:
    """Print a user error (no traceback) and return exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def add_corpus_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--corpus", default=None, help=(
        "corpus folder (default: the checkpoint's corpus_dir if it exists, else the embedded corpus, "
        "synthesised on first use)"))


def corpus_dir(explicit: str | None, ckpt: dict | None = None) -> Path:
    """The corpus folder to evaluate on: --corpus, else the one the checkpoint was trained on, else the
    embedded default (built if missing)."""
    from train.corpus import ensure_corpus

    if explicit:
        path = Path(explicit)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such corpus folder")
        return path
    cfg = (ckpt or {}).get("config", {}) or {}
    if cfg.get("corpus_dir") and Path(cfg["corpus_dir"]).is_dir():
        return Path(cfg["corpus_dir"])
    return Path(ensure_corpus(None, seed=0))


def load_split(directory: str | Path, split: str) -> list:
    """Utterances of one split, in a fixed order (by id)."""
    from train.corpus import load_corpus

    return sorted(load_corpus(directory, split=split), key=lambda u: u.id)
