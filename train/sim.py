"""Train SIM (or its baselines GIM and CPC) greedily: `python -m train.sim`.

With no flags it trains SIM on the embedded corpus (synthesised on first use) for a run that
fits in about 15 minutes on a 2-core CPU. `--preset paper` follows the paper's schedule
(Adam 2e-4, batch 8, 680,000 clips seen) and is meant for a GPU.

Nothing is lost on a crash: a checkpoint is written atomically after every epoch, at the end,
and on Ctrl-C (mid-epoch, with the position in the epoch); `--resume` continues exactly where
it stopped (on CPU with a fixed seed the resumed run's weights equal an uninterrupted run's).
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch

from train.audio import CROP_SAMPLES, HOP
from train.checkpoint import FORMAT, CheckpointError, code_version, load, save_atomic
from train.cli import device_name, select_device
from train.loss import SimLoss
from train.model import METHODS, Encoder, ModelDims

PAPER_CLIPS_SEEN = 1000 * 680  # the paper: 1000 epochs over 680 training clips
PRESETS = {
    # The paper's schedule: Adam 2e-4, batch 8, as many clips seen as its 1000 epochs x 680 clips.
    "paper": {"batch_size": 8, "lr": 2e-4, "clips_seen": PAPER_CLIPS_SEEN},
    # The default: about 15 minutes on a 2-core CPU (see docs/benchmarks.md for the rate it assumes).
    "cpu": {"batch_size": 8, "lr": 2e-4, "clips_seen": 4_600},
}
DEFAULTS = {
    "method": "sim", "beta": 0.0033, "epochs": None, "batch_size": None, "lr": None, "data": "corpus",
    "corpus_dir": None, "out": None, "device": "auto", "seed": 0, "max_clips": None, "crop": CROP_SAMPLES,
    "preset": "cpu", "channels": 512, "hidden": 256, "threads": None, "workers": 0,
    "beta_warmup": 0, "batch_norm": False, "negatives": "sequence",
}


def parse_args(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m train.sim",
        description="Train Smooth InfoMax (SIM), or the GIM / CPC baselines, on the embedded speech corpus "
                    "or on your own audio. Checkpoints go to OUT/checkpoint.pt, TensorBoard logs to OUT/tb.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", choices=METHODS, default="sim",
                   help="sim: KL-regularised greedy modules; gim: greedy, no KL; cpc: one end-to-end module")
    p.add_argument("--beta", type=float, default=0.0033,
                   help="KL weight, with KL summed over time and channels / (batch * channels) (see train/loss.py)")
    p.add_argument("--beta-warmup", type=int, default=0, metavar="STEPS",
                   help="raise the KL weight linearly from 0 to --beta over the first STEPS optimiser steps "
                        "(0 = the full weight from the start, as in the paper)")
    p.add_argument("--batch-norm", action="store_true",
                   help="BatchNorm1d between each conv and its ReLU (the authors' code default); folded into "
                        "the convs at export")
    p.add_argument("--negatives", choices=["sequence", "window"], default="sequence",
                   help="where InfoNCE draws its negatives: every position of the batch's sequences (the "
                        "authors' way) or only the 128-frame window of the predictions")
    p.add_argument("--channels", type=int, default=512, help="conv and latent width (the paper: 512)")
    p.add_argument("--hidden", type=int, default=256, help="GRU width (the paper: 256)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="schedule: cpu = ~15 min on 2 cores; paper = Adam 2e-4, batch 8, 680,000 clips (GPU)")
    p.add_argument("--epochs", type=int, help="epochs (default: from the preset's number of clips seen)")
    p.add_argument("--batch-size", type=int, help="clips per step (default: from the preset)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default: from the preset)")
    p.add_argument("--data", default="corpus",
                   help="'corpus' (embedded, synthesised on first use) or a folder of 16 kHz mono wav/flac "
                        "(searched recursively; the LibriSpeech layout works)")
    p.add_argument("--corpus-dir", help="where the embedded corpus is cached (default: $SIM_CACHE_DIR or "
                                        "~/.cache/sim-service)")
    p.add_argument("--crop", type=int, default=CROP_SAMPLES, help="samples per training clip (multiple of 160)")
    p.add_argument("--max-clips", type=int, help="use at most this many training clips (smoke runs)")
    p.add_argument("--out", help="run folder (default: runs/<method>)")
    p.add_argument("--device", default="auto", type=device_name, help="cpu, cuda (or cuda:N) or auto = cuda when present")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    a = p.parse_args(argv)
    cfg = {k: getattr(a, k) for k in DEFAULTS}
    cfg["resume"] = a.resume
    if cfg["beta_warmup"] < 0:
        p.error("--beta-warmup must be 0 or more steps")
    if cfg["crop"] % HOP or cfg["crop"] < 8 * HOP:
        p.error(f"--crop must be a multiple of {HOP} and at least {8 * HOP} samples")
    for key in ("epochs", "batch_size", "max_clips", "lr", "channels", "hidden"):
        if cfg[key] is not None and cfg[key] <= 0:
            p.error(f"--{key.replace('_', '-')} must be positive")
    return cfg


class Subset(torch.utils.data.Dataset):
    """The first clips of a dataset (or any index list), keeping set_epoch (crops depend on it)."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.dataset[self.indices[i]]

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


class StopFlag:
    """Ctrl-C or SIGTERM asks training to stop after the current batch (then it saves);
    a second Ctrl-C aborts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print("\nstopping after this batch (Ctrl-C again to abort without saving)", file=sys.stderr)

        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def build_datasets(cfg: dict):
    """(train, validation) datasets. Validation: the corpus test split, or a held-out tenth of a folder."""
    from train import data

    if cfg["data"] == "corpus":
        from train.corpus import ensure_corpus

        corpus = ensure_corpus(cfg["corpus_dir"], seed=0)
        cfg["corpus_dir"] = str(corpus)
        train_ds = data.corpus_dataset(corpus, "train", crop=cfg["crop"])
        val_ds = data.corpus_dataset(corpus, "test", crop=cfg["crop"])
    else:
        full = data.folder_dataset(cfg["data"], crop=cfg["crop"], seed=cfg["seed"])
        n_val = max(1, len(full) // 10) if len(full) > 1 else 0
        train_ds, val_ds = Subset(full, range(n_val, len(full))), (Subset(full, range(n_val)) if n_val else None)
    if cfg["max_clips"]:
        train_ds = Subset(train_ds, range(min(cfg["max_clips"], len(train_ds))))
        if val_ds is not None:
            val_ds = Subset(val_ds, range(min(max(cfg["max_clips"] // 4, 8), len(val_ds))))
    return train_ds, val_ds


def resolve_schedule(cfg: dict, n_train: int) -> None:
    preset = PRESETS[cfg["preset"]]
    cfg["batch_size"] = cfg["batch_size"] or preset["batch_size"]
    cfg["lr"] = cfg["lr"] or preset["lr"]
    if cfg["epochs"] is None:
        cfg["epochs"] = max(1, math.ceil(preset["clips_seen"] / max(1, n_train)))


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The clip order of an epoch: a function of (seed, epoch) only, so a resumed run sees the same."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def batches(dataset, order: torch.Tensor, batch_size: int, start: int, workers: int):
    """Yield (batch_index, clips) from batch `start` on; the last partial batch is kept."""
    idx_batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if workers:
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=idx_batches[start:], num_workers=workers)
        yield from enumerate(loader, start)
    else:
        for b in range(start, len(idx_batches)):
            yield b, torch.stack([dataset[i] for i in idx_batches[b]])


@torch.no_grad()
def validate(encoder: Encoder, criterion: SimLoss, dataset, cfg: dict, device: torch.device) -> dict[str, float]:
    """Mean losses on the validation set: eval mode, no gradients, every clip (no dropped batch), and a
    fixed RNG for the posterior samples and negatives so it neither varies nor disturbs training."""
    from tqdm import tqdm

    encoder.eval()
    totals: dict[str, float] = {}
    n = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg["seed"] + 12345)
        with tqdm(total=len(dataset), desc="validation", unit="clip", dynamic_ncols=True, leave=False,
                  mininterval=0.5 if sys.stderr.isatty() else 30) as bar:
            for _, clips in batches(dataset, torch.arange(len(dataset)), cfg["batch_size"], 0, 0):
                clips = clips.to(device)
                _, stats = criterion(encoder(clips, sample=True))
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + float(v) * len(clips)
                n += len(clips)
                bar.update(len(clips))
    encoder.train()
    return {k: v / n for k, v in totals.items()}


def beta_at(step: int, beta: float, warmup: int) -> float:
    """The KL weight for optimiser step `step` (0-based): linear from 0 to beta over `warmup` steps."""
    return beta if warmup <= 0 else beta * min(1.0, step / warmup)


def train_step(encoder: Encoder, criterion: SimLoss, optimizer: torch.optim.Optimizer, clips: torch.Tensor
               ) -> dict[str, torch.Tensor]:
    """One optimiser step on a batch of clips (B, samples); returns the detached loss statistics."""
    loss, stats = criterion(encoder(clips, sample=True))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return stats


def make_checkpoint(encoder, criterion, optimizer, cfg, device, epoch, batch, step) -> dict:
    return {"format": FORMAT, "dims": encoder.dims.to_dict(), "model": encoder.state_dict(),
            "loss": criterion.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(device),
            "epoch": epoch, "batch": batch, "step": step, "config": cfg, "code_version": code_version()}


def train(cfg: dict) -> Path:
    """Run (or resume) training as configured; returns the checkpoint path."""
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = select_device(cfg["device"])
    out = Path(cfg["out"] or f"runs/{cfg['method']}")
    ckpt_path = out / "checkpoint.pt"

    resumed = None
    if cfg["resume"]:
        if not ckpt_path.exists():
            raise SystemExit(f"error: --resume: no checkpoint at {ckpt_path}")
        resumed = load(ckpt_path, map_location=device)
        saved = {"negatives": "window", **resumed["config"]}  # runs from before the option drew from the window
        for key in ("method", "beta", "seed", "data", "crop", "channels", "hidden", "max_clips", "preset",
                    "beta_warmup", "batch_norm", "negatives"):
            if saved.get(key) != cfg.get(key) and cfg.get(key) != DEFAULTS.get(key):
                print(f"warning: --{key.replace('_', '-')} {cfg[key]} differs from the checkpoint's "
                      f"{saved.get(key)}; using the checkpoint's", file=sys.stderr)
        epochs = cfg["epochs"]
        cfg = {**DEFAULTS, **saved, "resume": True, "device": cfg["device"], "out": str(out), "workers": cfg["workers"],
               "threads": cfg["threads"]}
        if epochs:  # the one thing a resume may change: train for longer
            cfg["epochs"] = epochs

    torch.manual_seed(cfg["seed"])
    train_ds, val_ds = build_datasets(cfg)
    if not resumed:
        resolve_schedule(cfg, len(train_ds))
    cfg["out"] = str(out)
    dims = ModelDims(cfg["method"], cfg["channels"], cfg["hidden"], cfg["batch_norm"])
    encoder = Encoder(dims).to(device)
    criterion = SimLoss(dims, beta=cfg["beta"], negatives_from=cfg["negatives"]).to(device)
    params = list(encoder.parameters()) + list(criterion.parameters())
    optimizer = torch.optim.Adam(params, lr=cfg["lr"])
    start_epoch, start_batch, step = 0, 0, 0
    if resumed:
        encoder.load_state_dict(resumed["model"])
        criterion.load_state_dict(resumed["loss"])
        optimizer.load_state_dict(resumed["optimizer"])
        set_rng_state(resumed["rng"], device)
        start_epoch, start_batch, step = resumed["epoch"], resumed.get("batch", 0), resumed["step"]
        if start_epoch >= cfg["epochs"]:
            print(f"{ckpt_path}: already trained for {start_epoch} epochs (asked: {cfg['epochs']}); nothing to do")
            return ckpt_path

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    writer = SummaryWriter(str(out / "tb"), purge_step=step or None)
    n_batches = math.ceil(len(train_ds) / cfg["batch_size"])
    print(f"training {dims.method.upper()} on {device}: {len(train_ds)} clips x {cfg['epochs']} epochs, "
          f"batch {cfg['batch_size']}, lr {cfg['lr']}, beta {cfg['beta']}; run folder {out}")
    encoder.train()
    with StopFlag() as stop:
        for epoch in range(start_epoch, cfg["epochs"]):
            train_ds.set_epoch(epoch)
            order = epoch_order(cfg["seed"], epoch, len(train_ds))
            bar = tqdm(total=n_batches, initial=start_batch, desc=f"epoch {epoch + 1}/{cfg['epochs']}",
                       unit="batch", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)
            t0, seen = time.perf_counter(), 0
            for b, clips in batches(train_ds, order, cfg["batch_size"], start_batch, cfg["workers"]):
                clips = clips.to(device, non_blocking=True)
                criterion.beta = beta_at(step, cfg["beta"], cfg["beta_warmup"])
                stats = train_step(encoder, criterion, optimizer, clips)
                step += 1
                seen += len(clips)
                rate = seen / (time.perf_counter() - t0)
                stats = {k: float(v) for k, v in stats.items()}
                for k, v in stats.items():
                    writer.add_scalar(f"train/{k}", v, step)
                writer.add_scalar("train/clips_per_s", rate, step)
                writer.add_scalar("train/beta", criterion.beta, step)
                writer.add_scalar("train/clips_seen", step * cfg["batch_size"], step)
                bar.set_postfix({**{k: f"{v:.3g}" for k, v in stats.items() if k.startswith(("nce", "acc"))},
                                 "clips/s": f"{rate:.1f}"}, refresh=False)
                bar.update(1)
                if stop.requested and b + 1 < n_batches:
                    bar.close()
                    save_atomic(make_checkpoint(encoder, criterion, optimizer, cfg, device, epoch, b + 1, step),
                                ckpt_path)
                    writer.close()
                    print(f"interrupted: saved {ckpt_path} at epoch {epoch + 1}, batch {b + 1}/{n_batches}; "
                          f"continue with: python -m train.sim --resume --out {out}", file=sys.stderr)
                    raise SystemExit(130)
            bar.close()
            start_batch = 0
            if val_ds is not None:
                val = validate(encoder, criterion, val_ds, cfg, device)
                for k, v in val.items():
                    writer.add_scalar(f"val/{k}", v, step)
                print(f"epoch {epoch + 1}: validation " + ", ".join(f"{k} {v:.4g}" for k, v in val.items()))
            save_atomic(make_checkpoint(encoder, criterion, optimizer, cfg, device, epoch + 1, 0, step), ckpt_path)
            if stop.requested:
                writer.close()
                print(f"interrupted: saved {ckpt_path} after epoch {epoch + 1}; continue with: "
                      f"python -m train.sim --resume --out {out}", file=sys.stderr)
                raise SystemExit(130)
    writer.close()
    print(f"done: {ckpt_path}")
    return ckpt_path


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        train(cfg)
    except CheckpointError as exc:
        raise SystemExit(f"error: {exc}")
    except ValueError as exc:  # DataError and AudioError are ValueErrors with a specific message
        if type(exc).__name__ in ("DataError", "AudioError"):
            raise SystemExit(f"error: {exc}")
        raise


if __name__ == "__main__":
    main()
