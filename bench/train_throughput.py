"""Training throughput: clips/s of full SIM steps (three conv modules + GRU, 10240-sample clips).

    python bench/train_throughput.py [--device auto|cpu|cuda] [--batch-sizes 8 32] [--steps 5]

Times the trainer's own step (train.sim.train_step: forward with posterior samples, InfoNCE + KL
for every module, backward, Adam) on random clips, after warm-up steps, and prints a table.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from train.audio import CROP_SAMPLES
from train.cli import device_name, select_device
from train.loss import SimLoss
from train.model import Encoder, ModelSpec
from train.sim import train_step


def measure(method: str, batch: int, steps: int, warmup: int, device: torch.device) -> float:
    torch.manual_seed(0)
    dims = ModelSpec(method)
    encoder, criterion = Encoder(dims).to(device), SimLoss(dims).to(device)
    optimizer = torch.optim.Adam(list(encoder.parameters()) + list(criterion.parameters()), lr=2e-4)
    clips = torch.randn(batch, CROP_SAMPLES, device=device) * 0.1
    for _ in range(warmup):
        train_step(encoder, criterion, optimizer, clips)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(encoder, criterion, optimizer, clips)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", type=device_name)
    p.add_argument("--method", default="sim", choices=["sim", "gim", "cpc"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    device = select_device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads"
    print(f"# {a.method.upper()} training throughput, torch {torch.__version__}, {name}")
    print("| batch | clips/s |\n|---|---|")
    for b in a.batch_sizes:
        print(f"| {b} | {measure(a.method, b, a.steps, a.warmup, device):.1f} |", flush=True)


if __name__ == "__main__":
    main()
