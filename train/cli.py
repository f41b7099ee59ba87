"""What the training and evaluation commands share: argparse value types, the error exit, device choice.

Values are checked where argparse reads them (`type=positive_int` and friends), so a bad flag is a
usage error (exit status 2, argparse's message) before any work starts. Errors found later are
printed by `fail` as `error: ...` without a traceback, also with exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

USAGE_ERROR = 2  # exit status of every user error, as argparse uses for bad flags


def fail(message: str) -> int:
    """Print a user error (no traceback) and return the exit status for it."""
    print(f"error: {message}", file=sys.stderr)
    return USAGE_ERROR


def _number(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        value = _number(text, int)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def non_negative_int_list(text: str) -> list[int]:
    """An argparse type: comma-separated integers >= 0, e.g. "3,17,40"."""
    return [non_negative_int(part) for part in text.split(",")]


def positive_float(text: str) -> float:
    """An argparse type: a finite float > 0."""
    value = _number(text, float)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def select_device(name: str = "auto") -> torch.device:
    """The torch device for a --device value: "auto" is CUDA when torch sees one, else the CPU.

    ValueError if CUDA is asked for and torch sees none, or the name is not a device."""
    import torch  # here, so that commands without a --device (train.corpus) start without torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{name} asked for, but torch sees no CUDA device")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name!r} is not a torch device (cpu, cuda, cuda:N)") from None


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware: a CUDA GPU that supports bf16, or a CPU
    with AMX tile units (Intel Sapphire Rapids and later), where oneDNN's bf16 GEMMs run several times
    faster than float32 ones."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.x: absent means unknown
        return bool(amx and amx())
    return False


def device_name(text: str) -> str:
    """An argparse type: a --device value that select_device accepts on this machine."""
    try:
        select_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_device_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default="auto", type=device_name,
                    help="cpu, cuda (or cuda:N) or auto = cuda when torch sees one (default auto)")


def add_corpus_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--corpus", default=None, help=(
        "corpus folder (default: the checkpoint's corpus_dir if it exists, else the embedded corpus, "
        "synthesised on first use)"))
