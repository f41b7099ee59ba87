"""Training curves from a run's TensorBoard log: per-module InfoNCE, how often the positive ranks
first, and KL per channel per frame, against clips seen.

    python -m train.curves --run sim=runs/sim --run gim=runs/gim --out curves.png

train.sim logs train/nce_<m>, train/acc_<m> and train/klf_<m> every step; the curves are a
moving average over `smooth` steps (single steps are noisy at batch 8).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

PANELS = (("nce", "InfoNCE (chance ln 11 = 2.40)"), ("acc", "positive ranked first (chance 1/11)"),
          ("klf", "KL per channel per frame (nats)"))
MODULES = ("m1", "m2", "m3", "ar")


def read_scalars(run_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """tag -> (steps, values) of every train/ scalar in RUN/tb (all event files, in step order)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = Path(run_dir) / "tb"
    if not tb.is_dir():
        raise FileNotFoundError(f"{tb}: no TensorBoard log (train.sim writes one)")
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        if tag.startswith("train/"):
            events = sorted(acc.Scalars(tag), key=lambda e: e.step)
            steps = np.array([e.step for e in events])
            # a resumed run may log a step twice: keep the last value of each step
            last = np.r_[steps[1:] != steps[:-1], True]
            out[tag[len("train/"):]] = (steps[last], np.array([e.value for e in events])[last])
    return out


def batch_size(run_dir: str | Path) -> int:
    cfg = Path(run_dir) / "config.json"
    return int(json.loads(cfg.read_text()).get("batch_size") or 8) if cfg.is_file() else 8


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or values.size < window:
        return values
    kernel = np.ones(window) / window
    head = np.cumsum(values[:window - 1]) / np.arange(1, window)  # growing window at the start
    return np.r_[head, np.convolve(values, kernel, mode="valid")]


def plot_curves(runs: dict[str, str | Path], out: str | Path, window: int = 25) -> Path:
    """One figure: rows InfoNCE / accuracy / KL, columns m1 m2 m3 ar; a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PANELS), len(MODULES), figsize=(4 * len(MODULES), 3 * len(PANELS)),
                             squeeze=False)
    for name, run_dir in runs.items():
        scalars, batch = read_scalars(run_dir), batch_size(run_dir)
        for r, (key, _) in enumerate(PANELS):
            for c, module in enumerate(MODULES):
                tag = f"{key}_{module}"
                if tag in scalars:
                    steps, values = scalars[tag]
                    axes[r][c].plot(steps * batch, smooth(values, window), label=name, lw=1)
    for r, (key, title) in enumerate(PANELS):
        for c, module in enumerate(MODULES):
            ax = axes[r][c]
            ax.set_title(f"{module}: {title}", fontsize=8)
            ax.set_xlabel("clips seen", fontsize=8)
            ax.tick_params(labelsize=7)
            if key == "nce":
                ax.axhline(math.log(11), color="grey", lw=0.6, ls=":")
            if key == "acc":
                ax.axhline(1 / 11, color="grey", lw=0.6, ls=":")
            if key == "klf" and not ax.lines:
                ax.set_visible(False)  # the GRU (and GIM/CPC modules) have no KL
            if ax.lines and r == 0 and c == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.curves", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, metavar="NAME=DIR", help="a run folder (repeatable)")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--smooth", type=int, default=25, help="moving-average window in steps")
    a = ap.parse_args(argv)
    runs = {}
    for spec in a.run:
        name, sep, directory = spec.partition("=")
        if not sep:
            print(f"error: --run {spec!r}: expected NAME=DIR", file=sys.stderr)
            return 2
        runs[name] = directory
    try:
        print(f"wrote {plot_curves(runs, a.out, a.smooth)}")
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
