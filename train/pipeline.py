"""--module-parallel: the greedy modules trained at once, one process per module, as a pipeline.

    torchrun --standalone --nproc-per-node 4 -m train.sim --module-parallel [--method sim|gim] ...

Greedy training never sends gradients between modules: each module learns from its own loss on the
detached output of the module below. So module r can run in process r (on GPU r when there are GPUs):
rank 0 reads batch t, trains m1 on it and sends m1's output on (torch.distributed point-to-point);
rank 1 trains m2 on what it received, sends m2's output on, and so on to the GRU. Each rank has its
module, its InfoNCE head and its own Adam, and all of them work at the same time.

The pipeline's delay: batch s reaches rank r one tick per stage later, at tick s + r. By then rank r
has made exactly s updates and its input was computed by rank r - 1 after its own s updates, which is
what the sequential step computes for batch s. So, with the delay accounted for (each rank trains on
batch t - r at tick t), the pipeline makes the sequential step's updates; `train_sequential` runs
the same stages one after another in one process, the reference the tests compare with. Random draws
(posterior noise, InfoNCE window and negatives) come from one generator per module, seeded from
--seed and the module, so both orders draw the same numbers; they differ from `python -m train.sim`'s
one global stream, so a module-parallel run is not bit-equal to a plain run, only equal in law.

Scope: SIM and GIM (CPC is one end-to-end module); the world size must equal the number of modules
(4); rank 0 writes the checkpoint at the end of training or on Ctrl-C / SIGTERM, with the model and
InfoNCE heads a plain run writes, but a module-parallel run cannot be resumed (its optimiser state is
spread over the ranks).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from train.loss import InfoNCE, kl_term
from train.model import Encoder, ModelSpec

STOP = 0  # a batch size of 0 in the header: no more batches


@dataclass
class Stage:
    """One greedy module, its InfoNCE head, its Adam and its random generator."""

    name: str
    module: nn.Module  # ConvModule for m1..m3, nn.GRU for ar
    head: InfoNCE
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    beta: float = 0.0
    updates: int = 0

    def train_on(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """One optimiser step of this module on its input x (B, C_in, T), channels first; returns its
        detached output for the next module (B, C, T) and its loss."""
        if isinstance(self.module, nn.GRU):
            targets = x.transpose(1, 2)
            context, _ = self.module(targets)
            loss, _ = self.head(context, targets, self.generator)
            out = context.detach().transpose(1, 2)
        else:
            mu, logvar = self.module(x)
            z = ctx = mu
            if logvar is not None:
                std = torch.exp(0.5 * logvar)
                z = mu + torch.randn(std.shape, generator=self.generator, device=std.device) * std
                ctx = mu + torch.randn(std.shape, generator=self.generator, device=std.device) * std
            loss, _ = self.head(ctx.transpose(1, 2), z.transpose(1, 2), self.generator)
            if logvar is not None:
                loss = loss + self.beta * kl_term(mu.transpose(1, 2), logvar.transpose(1, 2))
            out = z.detach()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.updates += 1
        return out, float(loss.detach())


def build_stages(dims: ModelSpec, seed: int, lr: float, beta: float, negatives: str,
                 device: torch.device) -> list[Stage]:
    """The stages of a greedy model, initialised as Encoder(dims) with torch.manual_seed(seed) is."""
    if not dims.greedy:
        raise ValueError(f"--module-parallel needs a greedy method (sim, gim), not {dims.method}")
    torch.manual_seed(seed)
    encoder = Encoder(dims)
    heads = {name: InfoNCE(dims.channels, dims.channels, negatives_from=negatives) for name, _ in dims.modules}
    heads["ar"] = InfoNCE(dims.hidden, dims.channels, negatives_from=negatives)
    modules = {**dict(encoder.convs.items()), "ar": encoder.gru}
    stages = []
    for i, (name, module) in enumerate(modules.items()):
        module, head = module.to(device), heads[name].to(device)
        optimizer = torch.optim.Adam([*module.parameters(), *head.parameters()], lr=lr)
        generator = torch.Generator(device).manual_seed(seed * 1_000_003 + 7919 * (i + 1))
        stages.append(Stage(name, module, head, optimizer, generator, beta if dims.variational else 0.0))
    return stages


def train_sequential(stages: list[Stage], batches) -> None:
    """The reference: every batch through every stage in turn, in this process."""
    for clips in batches:
        x = clips.unsqueeze(1)
        for stage in stages:
            x, _ = stage.train_on(x)


def _send(x: torch.Tensor | None, dst: int) -> None:
    header = torch.tensor(list(x.shape) if x is not None else [STOP, 0, 0], dtype=torch.long)
    dist.send(header, dst)
    if x is not None:
        dist.send(x.contiguous(), dst)


def _recv(src: int, device: torch.device) -> torch.Tensor | None:
    header = torch.zeros(3, dtype=torch.long)
    dist.recv(header, src)
    if int(header[0]) == STOP:
        return None
    x = torch.empty(tuple(header.tolist()), device=device)
    dist.recv(x, src)
    return x


def train_stage(stage: Stage, rank: int, world: int, batches, device: torch.device, log=None) -> None:
    """This rank's part of the pipeline: rank 0 reads `batches`, the others receive from rank - 1;
    every rank but the last sends its output on. Ends when the stream of batches ends (or stops)."""
    while True:
        if rank == 0:
            clips = next(batches, None)
            x = None if clips is None else clips.to(device).unsqueeze(1)
        else:
            x = _recv(rank - 1, device)
        if x is None:
            if rank < world - 1:
                _send(None, rank + 1)
            return
        out, loss = stage.train_on(x)
        if rank < world - 1:
            _send(out, rank + 1)
        if log is not None:
            log(stage, loss)


def state_dicts(stages: list[Stage]) -> tuple[dict, dict]:
    """(Encoder state_dict, SimLoss state_dict) assembled from the stages' modules and heads."""
    model, loss = {}, {}
    for stage in stages:
        prefix = "gru." if stage.name == "ar" else f"convs.{stage.name}."
        model.update({prefix + k: v.cpu() for k, v in stage.module.state_dict().items()})
        loss.update({f"nce.{stage.name}.{k}": v.cpu() for k, v in stage.head.state_dict().items()})
    return model, loss


def run(cfg, device: torch.device, rank: int, world: int, train_ds, stop) -> Path:
    """Train cfg's model module-parallel (this process: stage `rank`); rank 0 saves the checkpoint."""
    from train.checkpoint import FORMAT, code_version, save_atomic
    from train.sim import batches, epoch_order

    dims = ModelSpec(cfg.method, cfg.channels, cfg.hidden, cfg.batch_norm)
    stages = build_stages(dims, cfg.seed, cfg.lr, cfg.beta, cfg.negatives, device)
    if world != len(stages):
        raise ValueError(f"--module-parallel runs one process per module: start {len(stages)} processes "
                         f"(torchrun --nproc-per-node {len(stages)}), not {world}")
    stage = stages[rank]
    path = cfg.run_dir / "checkpoint.pt"
    t0 = time.perf_counter()

    def feed():
        for epoch in range(cfg.epochs):
            train_ds.set_epoch(epoch)
            order = epoch_order(cfg.seed, epoch, len(train_ds))
            for _, clips in batches(train_ds, order, cfg.batch_size, 0, cfg.workers):
                if stop.requested:
                    return
                yield clips

    def log(stage: Stage, loss: float) -> None:
        if stage.updates % 10 == 0 or stage.updates == 1:
            rate = stage.updates * cfg.batch_size / (time.perf_counter() - t0)
            print(f"{stage.name}: step {stage.updates}, loss {loss:.4g}, {rate:.1f} clips/s", file=sys.stderr)

    train_stage(stage, rank, world, feed(), device, log)
    parts = [None] * world if rank == 0 else None
    dist.gather_object((stage.updates, *state_dicts([stage])), parts, dst=0)
    if rank == 0:
        model = {k: v for _, m, _ in parts for k, v in m.items()}
        loss = {k: v for _, _, h in parts for k, v in h.items()}
        steps = parts[0][0]
        epochs_done = steps // math.ceil(len(train_ds) / cfg.batch_size)
        save_atomic({"format": FORMAT, "dims": dims.to_dict(), "model": model, "loss": loss,
                     "epoch": epochs_done, "step": steps, "config": cfg.to_dict(), "code_version": code_version()},
                    path)
        print(f"module-parallel: {steps} steps per module in {time.perf_counter() - t0:.1f} s; saved {path}")
    return path
