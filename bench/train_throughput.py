"""Training throughput: clips/s of full training steps (three conv modules + GRU, 10240-sample clips).

    python bench/train_throughput.py [--device auto|cpu|cuda] [--batch-sizes 8 32] [--steps 5]
    python bench/train_throughput.py --compare [--rounds 5] [--batch-sizes 8]
    python bench/train_throughput.py --profile [--batch-sizes 8]

Times the trainer's own step (train.step.Step: forward with posterior samples, InfoNCE + KL for every
module, backward, Adam) on random clips, after warm-up steps.
- default: a table of clips/s per batch size for the new step (--autocast / --compile as given).
- --compare: the step before the lean InfoNCE (scoring "reference", no step options) and the new one
  (lean scoring and the options given), built from the same seed, timed in turns in the same process
  for --rounds rounds (the order swaps every round), so that load from other work on the machine hits
  both alike; prints each round and the ratio's median, min and max, of wall-clock clips/s and of the
  process's CPU seconds per clip (the steadier of the two on a shared machine: other work slows the
  wall clock, much less the CPU time this process needs; with --threads 1 it counts no idle spinning).
  --baseline lean compares against the lean step without options instead, to time one option alone
  (e.g. --compare --baseline lean --compile).
- --no-onednn: the new step runs with oneDNN (mkldnn) kernels switched off, so --compare --baseline lean
  --no-onednn times torch's oneDNN convolutions against its native ones.
- --profile: one profiled run of each step, then the operators that take the most time.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from train.audio import CROP_SAMPLES
from train.cli import device_name, select_device
from train.loss import SimLoss
from train.model import METHODS, Encoder, ModelSpec
from train.step import AUTOCASTS, Objective, Step, StepOptions


def build_step(method: str, channels: int, scoring: str, options: StepOptions, device: torch.device,
               fused: bool) -> Step:
    torch.manual_seed(0)
    dims = ModelSpec(method, channels=channels, batch_norm=True)
    objective = Objective(Encoder(dims), SimLoss(dims, scoring=scoring)).to(device)
    optimizer = torch.optim.Adam(objective.parameters(), lr=2e-4, fused=fused or None)
    return Step(objective, optimizer, options)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class WithoutOneDNN:
    """A step run with torch's oneDNN (mkldnn) kernels switched off."""

    def __init__(self, step: Step):
        self.step = step

    def __call__(self, clips: torch.Tensor):
        with torch.backends.mkldnn.flags(enabled=False):
            return self.step(clips)


def timed(step, clips: torch.Tensor, steps: int) -> tuple[float, float]:
    """(clips per wall-clock second, process CPU seconds per clip) over `steps` steps."""
    sync(clips.device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step(clips)
    sync(clips.device)
    n = len(clips) * steps
    return n / (time.perf_counter() - t0), (time.process_time() - c0) / n


def steps_to_run(a, device: torch.device) -> dict:
    new = StepOptions(autocast=a.autocast, compile=a.compile)
    fused = a.fused if a.fused is not None else device.type == "cuda"
    steps = {"new": build_step(a.method, a.channels, "lean", new, device, fused)}
    if a.no_onednn:
        steps["new"] = WithoutOneDNN(steps["new"])
    if a.compare or a.profile:
        scoring = "reference" if a.baseline == "old" else "lean"
        steps = {"old": build_step(a.method, a.channels, scoring, StepOptions(), device, False), **steps}
    return steps


def compare(steps: dict[str, Step], clips: torch.Tensor, a) -> None:
    base = a.baseline
    print(f"| round | {base} clips/s | new clips/s | speed-up (wall) | {base} CPU s/clip | new CPU s/clip "
          "| speed-up (CPU) |\n|---|---|---|---|---|---|---|")
    wall, cpu = [], []
    for r in range(a.rounds):
        order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
        m = {name: timed(steps[name], clips, a.steps) for name in order}
        wall.append(m["new"][0] / m["old"][0])
        cpu.append(m["old"][1] / m["new"][1])
        print(f"| {r + 1} | {m['old'][0]:.2f} | {m['new'][0]:.2f} | {wall[-1]:.3f} | {m['old'][1]:.3f} | "
              f"{m['new'][1]:.3f} | {cpu[-1]:.3f} |", flush=True)
    for what, ratios in (("wall clock", wall), ("CPU time", cpu)):
        print(f"new / {base} speed ({what}) over {a.rounds} rounds: median {statistics.median(ratios):.3f}, "
              f"min {min(ratios):.3f}, max {max(ratios):.3f}")


def profile(steps: dict[str, Step], clips: torch.Tensor, a) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if clips.device.type == "cuda" else [])
    key = "self_cuda_time_total" if clips.device.type == "cuda" else "self_cpu_time_total"
    for name, step in steps.items():
        with torch_profile(activities=activities) as prof:
            for _ in range(a.steps):
                step(clips)
            sync(clips.device)
        print(f"\n## {name} step: {a.steps} steps of batch {len(clips)}, operators by self time")
        print(prof.key_averages().table(sort_by=key, row_limit=a.top))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", type=device_name)
    p.add_argument("--method", default="sim", choices=METHODS)
    p.add_argument("--channels", type=int, default=512, help="conv width (the paper's 512)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--autocast", choices=list(AUTOCASTS), default="off", help="the new step's autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the new step's forward and loss")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="fused Adam in the new step (default: on CUDA)")
    p.add_argument("--compare", action="store_true", help="old and new step in turns, ratio with its spread")
    p.add_argument("--rounds", type=int, default=5, help="--compare: rounds of (old, new)")
    p.add_argument("--baseline", choices=("old", "lean"), default="old",
                   help="--compare/--profile: the step the new one is set against: old = reference InfoNCE "
                        "scoring, lean = lean scoring without the options (times the options alone)")
    p.add_argument("--no-onednn", action="store_true", help="the new step with oneDNN (mkldnn) kernels off")
    p.add_argument("--profile", action="store_true", help="where each step's time goes (torch.profiler)")
    p.add_argument("--top", type=int, default=15, help="--profile: operators shown")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = select_device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# {a.method.upper()} training step, {a.channels} channels, torch {torch.__version__}, {name}; "
          f"new step: lean InfoNCE, autocast {a.autocast}, compile {a.compile}, oneDNN {not a.no_onednn}"
          + (f"; baseline: {a.baseline}" if a.compare or a.profile else ""))
    steps = steps_to_run(a, device)
    if not (a.compare or a.profile):
        print("| batch | clips/s |\n|---|---|")
    for b in a.batch_sizes:
        clips = torch.randn(b, CROP_SAMPLES, device=device) * 0.1
        for step in steps.values():
            for _ in range(a.warmup):
                step(clips)
        if a.compare:
            print(f"\n### batch {b}")
            compare(steps, clips, a)
        if a.profile:
            profile(steps, clips, a)
        if not (a.compare or a.profile):
            print(f"| {b} | {timed(steps['new'], clips, a.steps)[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
