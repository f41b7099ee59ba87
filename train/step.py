"""One optimiser step of the trainer, and the options that make it faster without changing what it trains.

StepOptions (flags of `python -m train.sim`, measured in docs/benchmarks.md; on only where measured faster):
- autocast "bf16": the forward pass and the loss under torch.autocast in bfloat16 (weights, gradients
  and Adam stay float32). "auto" (the trainer's default) resolves to bf16 where the device multiplies
  bfloat16 natively (a CUDA GPU with bf16, a CPU with AMX tiles) and to "off" elsewhere: emulated bf16
  on a CPU without those units is several times slower than float32.
- compile: torch.compile of the forward pass and loss, static shapes (one graph per frame count: the
  first steps pay for the compilation).
The loss itself is train.loss.SimLoss with its lean scoring.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from train.cli import native_bf16
from train.loss import SimLoss
from train.model import Encoder

AUTOCASTS = {"off": None, "bf16": torch.bfloat16}


def resolve_autocast(name: str, device: torch.device) -> str:
    """The autocast a run uses: `name` itself, or for "auto" bf16 where `device` computes it natively."""
    if name == "auto":
        return "bf16" if native_bf16(device) else "off"
    if name not in AUTOCASTS:
        raise ValueError(f"autocast must be auto or one of {tuple(AUTOCASTS)}, got {name!r}")
    return name


@dataclass(frozen=True)
class StepOptions:
    autocast: str = "off"  # a key of AUTOCASTS
    compile: bool = False

    def __post_init__(self):
        if self.autocast not in AUTOCASTS:
            raise ValueError(f"autocast must be one of {tuple(AUTOCASTS)}, got {self.autocast!r}")


class Objective(nn.Module):
    """The encoder and its loss as one module: clips in, (loss, detached statistics) out. This is what
    DistributedDataParallel wraps, so that the InfoNCE predictors' gradients are averaged too."""

    def __init__(self, encoder: Encoder, criterion: SimLoss):
        super().__init__()
        self.encoder, self.criterion = encoder, criterion

    def forward(self, clips: torch.Tensor, shard=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.criterion(self.encoder(clips, sample=True, shard=shard), shard=shard)


class Step:
    """A training step: forward (with posterior samples), loss, backward, optimiser step; returns the
    detached loss statistics. `model` is an Objective, or a DistributedDataParallel around one."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, options: StepOptions = StepOptions()):
        self.model, self.optimizer, self.options = model, optimizer, options
        self.forward = torch.compile(model, dynamic=False) if options.compile else model

    def __call__(self, clips: torch.Tensor, shard=None) -> dict[str, torch.Tensor]:
        dtype = AUTOCASTS[self.options.autocast]
        with torch.autocast(clips.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, stats = self.forward(clips, shard)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return stats
