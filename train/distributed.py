"""Training across processes and machines with torchrun (DistributedDataParallel).

`torchrun --nproc-per-node N -m train.sim ...` starts N copies of the trainer; torchrun sets RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous, and `init` joins them (NCCL on CUDA, gloo on CPU).

What a distributed run computes is what one process computes for the same --batch-size:
- --batch-size is the global batch (clips per optimiser step); each rank trains its contiguous share
  of every batch (Shard), so the schedule and the checkpoint's position do not depend on the world
  size and --resume works from any number of processes.
- InfoNCE draws its negatives from the whole global batch: the targets are gathered from every rank
  (gather_rows, with gradients flowing back to their rank); the random draws (window start, negative
  indices, posterior noise) are drawn for the global batch with the same seed on every rank, and each
  rank keeps its rows. Gradients are averaged by DDP with each rank's loss weighted by its share.
- BatchNorm: SyncBatchNorm on CUDA; on CPU torch has no SyncBatchNorm, so each rank normalises its own
  clips (the one way a CPU run differs from one process).
- Rank 0 alone logs, validates and writes checkpoints. A stop (Ctrl-C, SIGTERM) seen by any rank is
  agreed on after each batch, so every rank stops after the same batch and rank 0 saves.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

_side_group = None  # a second process group for the collectives the loss and the stop flag need


def launched() -> bool:
    """Whether this process was started by torchrun with more than one process in the job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_type: str) -> tuple[int, int, int]:
    """Join the torchrun job: (rank, world size, local rank). NCCL for CUDA, gloo otherwise."""
    global _side_group
    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    _side_group = dist.new_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), local_rank


def shutdown() -> None:
    global _side_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _side_group = None


@dataclass(frozen=True)
class Shard:
    """This rank's rows of a global batch: rows [start, stop) of `total`, and every rank's row count."""

    rank: int
    sizes: tuple[int, ...]

    @property
    def start(self) -> int:
        return sum(self.sizes[:self.rank])

    @property
    def stop(self) -> int:
        return self.start + self.sizes[self.rank]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def weight(self) -> float:
        """The factor on this rank's batch-mean loss that makes DDP's average of the ranks' gradients the
        gradient of the global batch-mean loss (1 when the ranks hold equal shares)."""
        return self.sizes[self.rank] * len(self.sizes) / self.total


def shard_of(n: int, rank: int, world: int) -> Shard:
    """How a global batch of n clips splits over `world` ranks (the first ranks take one more if uneven)."""
    return Shard(rank, tuple(len(part) for part in torch.arange(n).tensor_split(world)))


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shard: Shard) -> torch.Tensor:
        ctx.shard = shard
        padded = x.new_zeros((max(shard.sizes), *x.shape[1:]))
        padded[:len(x)] = x
        parts = [torch.empty_like(padded) for _ in shard.sizes]
        dist.all_gather(parts, padded.contiguous(), group=_side_group)
        return torch.cat([part[:n] for part, n in zip(parts, shard.sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=_side_group)  # every rank's loss may have scored these rows
        shard = ctx.shard
        return grad[shard.start:shard.stop], None


def gather_rows(x: torch.Tensor, shard: Shard) -> torch.Tensor:
    """The global batch from every rank's rows (B_rank, ...): (B_total, ...) in rank order; the gradient
    of each row returns to its rank, summed over the ranks whose loss used it."""
    return _GatherRows.apply(x, shard)


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is true on any rank (every rank must call this at the same point)."""
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_side_group)
    return bool(t.item())
