"""Train SIM (or its baselines GIM and CPC) greedily: `python -m train.sim`.

With no flags it trains SIM on the embedded corpus (synthesised on first use) for one epoch, a
run sized for a 2-core CPU (docs/benchmarks.md). `--preset paper` follows the paper's schedule
(Adam 2e-4, batch 8, 680,000 clips seen) and is meant for a GPU. The flags and their defaults
are train.config.TrainConfig's fields.

Nothing is lost on a crash: a checkpoint is written atomically after every epoch, at the end,
and on Ctrl-C (mid-epoch, with the position in the epoch); `--resume` continues exactly where
it stopped (on CPU with a fixed seed the resumed run's weights equal an uninterrupted run's).

Several processes, GPUs or machines: start the same command with torchrun, e.g.
`torchrun --nproc-per-node 4 -m train.sim --preset paper`; --batch-size stays the global batch
(train/distributed.py says what is shared and how; README: one GPU, N GPUs, M machines).
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from train import distributed
from train.audio import HOP, AudioError
from train.checkpoint import FORMAT, CheckpointError, code_version, load, save_atomic
from train.cli import device_name, fail, non_negative_int, positive_float, positive_int, select_device
from train.config import CPU, PRESETS, TrainConfig
from train.corpus import CorpusError
from train.data import DataError
from train.loss import SimLoss
from train.model import METHODS, Encoder, ModelSpec
from train.step import AUTOCASTS, Objective, Step, StepOptions, resolve_autocast

# Config keys that define what a run trains; a resumed run keeps its checkpoint's values for them.
RUN_DEFINING = ("method", "beta", "seed", "data", "crop", "channels", "hidden", "max_clips", "preset",
                "beta_warmup", "batch_norm", "negatives")
INTERRUPTED = 130  # exit status after Ctrl-C or SIGTERM, as a shell reports SIGINT


def crop_samples(text: str) -> int:
    """An argparse type: a clip length in samples, a whole number of hops and at least 8 of them."""
    value = non_negative_int(text)
    if value % HOP or value < 8 * HOP:
        raise argparse.ArgumentTypeError(f"must be a multiple of {HOP} and at least {8 * HOP} samples, got {value}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None (the flag's help says what happens then)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser(defaults: TrainConfig = CPU) -> argparse.ArgumentParser:
    """The command line; every default is read from `defaults` (a preset)."""
    d = defaults
    p = argparse.ArgumentParser(
        prog="python -m train.sim",
        description="Train Smooth InfoMax (SIM), or the GIM / CPC baselines, on the embedded speech corpus "
                    "or on your own audio. Checkpoints go to OUT/checkpoint.pt, TensorBoard logs to OUT/tb.",
        formatter_class=HelpFormatter)
    p.add_argument("--method", choices=METHODS, default=d.method,
                   help="sim: KL-regularised greedy modules; gim: greedy, no KL; cpc: one end-to-end module")
    p.add_argument("--beta", type=float, default=d.beta,
                   help="KL weight, with KL summed over time and channels / (batch * channels) (see train/loss.py)")
    p.add_argument("--beta-warmup", type=non_negative_int, default=d.beta_warmup, metavar="STEPS",
                   help="raise the KL weight linearly from 0 to --beta over the first STEPS optimiser steps "
                        "(0 = the full weight from the start, as in the paper)")
    p.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=d.batch_norm,
                   help="BatchNorm1d between each conv and its ReLU (the authors' code default; without it SIM's "
                        "modules stay near chance for hundreds of steps, docs/results.md); folded into the convs "
                        "at export")
    p.add_argument("--negatives", choices=["sequence", "window"], default=d.negatives,
                   help="where InfoNCE draws its negatives: every position of the batch's sequences (the "
                        "authors' way) or only the 128-frame window of the predictions")
    p.add_argument("--channels", type=positive_int, default=d.channels, help="conv and latent width (the paper: 512)")
    p.add_argument("--hidden", type=positive_int, default=d.hidden, help="GRU width (the paper: 256)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=d.preset,
                   help="schedule: cpu = one epoch of the corpus, sized for 2 CPU cores; paper = Adam 2e-4, "
                        "batch 8, 680,000 clips (GPU); the other flags' defaults are the preset's")
    p.add_argument("--epochs", type=positive_int, default=d.epochs,
                   help=f"epochs (default: enough to see the preset's {d.clips_seen:,} clips)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="clips per step")
    p.add_argument("--lr", type=positive_float, default=d.lr, help="Adam learning rate")
    p.add_argument("--data", default=d.data,
                   help="'corpus' (embedded, synthesised on first use) or a folder of 16 kHz mono wav/flac "
                        "(searched recursively; the LibriSpeech layout works)")
    p.add_argument("--corpus-dir", default=d.corpus_dir,
                   help="where the embedded corpus is cached (default: $SIM_CACHE_DIR or ~/.cache/sim-service)")
    p.add_argument("--crop", type=crop_samples, default=d.crop,
                   help=f"samples per training clip (a multiple of {HOP})")
    p.add_argument("--max-clips", type=positive_int, default=d.max_clips,
                   help="use at most this many training clips (smoke runs)")
    p.add_argument("--out", default=d.out, help="run folder (default: runs/<method>)")
    p.add_argument("--device", type=device_name, default=d.device,
                   help="cpu, cuda (or cuda:N) or auto = cuda when present")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the initialisation, clip order and crops")
    p.add_argument("--resume", action="store_true", default=d.resume, help="continue from OUT/checkpoint.pt")
    p.add_argument("--threads", type=positive_int, default=d.threads,
                   help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--workers", type=non_negative_int, default=d.workers, help="data-loader worker processes")
    p.add_argument("--autocast", choices=["auto", *AUTOCASTS], default=d.autocast,
                   help="run the forward pass and loss under torch.autocast in this dtype; weights, gradients and "
                        "Adam stay float32. auto = bf16 on a CUDA GPU with bf16 and on a CPU with AMX units, where it "
                        "is faster and trains as well (docs/benchmarks.md), off elsewhere")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=d.compile,
                   help="torch.compile the forward pass and loss (the first steps pay for the compilation)")
    p.add_argument("--module-parallel", action="store_true", default=d.module_parallel,
                   help="SIM/GIM under torchrun --nproc-per-node 4: each module (m1 m2 m3 ar) in its own process "
                        "(its own GPU when there are GPUs), trained at once as a pipeline (train/pipeline.py); "
                        "such a run cannot be resumed")
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The configuration the command line asks for: the --preset's values, overridden by the flags given."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", default=CPU.preset)
    preset = PRESETS.get(first.parse_known_args(argv)[0].preset, CPU)  # an unknown name: the full parser says so
    return replace(preset, **vars(build_parser(preset).parse_args(argv)))


class UsageError(Exception):
    """Training cannot start as asked; the message says why."""


class Interrupted(Exception):
    """Training stopped on Ctrl-C or SIGTERM after saving its checkpoint."""


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
        def handler(_signum, _frame):
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


def build_datasets(cfg: TrainConfig):
    """(train, validation) datasets. Validation: the corpus test split, or a held-out tenth of a folder."""
    from train import data

    if cfg.data == "corpus":
        from train.corpus import ensure_corpus

        corpus = ensure_corpus(cfg.corpus_dir, seed=0)
        train_ds = data.corpus_dataset(corpus, "train", crop=cfg.crop)
        val_ds = data.corpus_dataset(corpus, "test", crop=cfg.crop)
    else:
        full = data.folder_dataset(cfg.data, crop=cfg.crop, seed=cfg.seed)
        n_val = max(1, len(full) // 10) if len(full) > 1 else 0
        train_ds, val_ds = Subset(full, range(n_val, len(full))), (Subset(full, range(n_val)) if n_val else None)
    if cfg.max_clips:
        train_ds = Subset(train_ds, range(min(cfg.max_clips, len(train_ds))))
        if val_ds is not None:
            val_ds = Subset(val_ds, range(min(max(cfg.max_clips // 4, 8), len(val_ds))))
    return train_ds, val_ds


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


def batches(dataset, order: torch.Tensor, batch_size: int, start: int, workers: int, rank: int = 0, world: int = 1):
    """Yield (batch_index, clips) from batch `start` on; the last partial batch is kept. With world > 1,
    this rank's share of each batch (train.distributed.shard_of), and a last batch smaller than the
    world is skipped (some rank would have no clip)."""
    idx_batches = [order[i:i + batch_size].tensor_split(world)[rank].tolist() for i in range(0, len(order), batch_size)]
    if world > 1 and len(order) % batch_size and len(order) % batch_size < world:
        idx_batches = idx_batches[:-1]
    if workers:
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=idx_batches[start:], num_workers=workers)
        yield from enumerate(loader, start)
    else:
        for b in range(start, len(idx_batches)):
            yield b, torch.stack([dataset[i] for i in idx_batches[b]])


def progress_interval() -> float:
    """Seconds between progress-bar refreshes: often on a terminal, rarely into a log file."""
    return 0.5 if sys.stderr.isatty() else 30


@torch.no_grad()
def validate(encoder: Encoder, criterion: SimLoss, dataset, cfg: TrainConfig, device: torch.device
             ) -> dict[str, float]:
    """Mean losses on the validation set: eval mode, no gradients, every clip (no dropped batch), and a
    fixed RNG for the posterior samples and negatives so it neither varies nor disturbs training."""
    from tqdm import tqdm

    encoder.eval()
    totals: dict[str, float] = {}
    n = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + 12345)
        with tqdm(total=len(dataset), desc="validation", unit="clip", dynamic_ncols=True, leave=False,
                  mininterval=progress_interval()) as bar:
            for _, clips in batches(dataset, torch.arange(len(dataset)), cfg.batch_size, 0, 0):
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


@dataclass
class Run:
    """A training run in progress: its configuration, model, optimiser, data, and position (the next
    batch to train is batch `batch` of epoch `epoch`, after `step` optimiser steps)."""

    cfg: TrainConfig
    device: torch.device
    encoder: Encoder
    criterion: SimLoss
    optimizer: torch.optim.Optimizer
    train_ds: torch.utils.data.Dataset
    val_ds: torch.utils.data.Dataset | None
    train_step: Step
    rank: int = 0  # this process's rank in a torchrun job, and the job's size (1: no torchrun)
    world: int = 1
    epoch: int = 0
    batch: int = 0
    step: int = 0

    @property
    def lead(self) -> bool:
        """Whether this process logs, validates and saves (rank 0)."""
        return self.rank == 0

    @property
    def checkpoint_path(self) -> Path:
        return self.cfg.run_dir / "checkpoint.pt"

    @property
    def n_batches(self) -> int:
        return math.ceil(len(self.train_ds) / self.cfg.batch_size)


def resume_config(cfg: TrainConfig, device: torch.device) -> tuple[TrainConfig, dict | None]:
    """With --resume: the checkpoint's configuration, with what a resumed run may change taken from `cfg`
    (device, threads, workers, the step options and a longer --epochs; --autocast auto keeps the
    checkpoint's), and the checkpoint itself. Without --resume: cfg
    with its run folder filled in, and None."""
    out = cfg.run_dir
    if not cfg.resume:
        return replace(cfg, out=str(out)), None
    path = out / "checkpoint.pt"
    if not path.exists():
        raise UsageError(f"--resume: no checkpoint at {path}")
    ckpt = load(path, map_location=device)
    saved = TrainConfig.from_dict(ckpt["config"])
    for key in RUN_DEFINING:
        asked = getattr(cfg, key)
        if asked != getattr(saved, key) and asked != getattr(CPU, key):
            print(f"warning: --{key.replace('_', '-')} {asked} differs from the checkpoint's "
                  f"{getattr(saved, key)}; using the checkpoint's", file=sys.stderr)
    autocast = saved.autocast if cfg.autocast == "auto" else cfg.autocast  # auto: go on as it trained
    merged = replace(saved, resume=True, device=cfg.device, out=str(out), workers=cfg.workers, threads=cfg.threads,
                     autocast=autocast, compile=cfg.compile,
                     epochs=cfg.epochs or saved.epochs)  # the one thing a resume may change: train for longer
    return merged, ckpt


def build_run(cfg: TrainConfig, device: torch.device, resumed: dict | None, rank: int = 0, world: int = 1) -> Run:
    """Data, model, loss and optimiser as configured, restored to the checkpoint's state when resuming.
    The returned run's config names the corpus it trains on and its number of epochs. With world > 1
    (a torchrun job, process group joined) the model is wrapped in DistributedDataParallel."""
    torch.manual_seed(cfg.seed)
    if cfg.data == "corpus":
        from train.corpus import ensure_corpus

        cfg = replace(cfg, corpus_dir=str(ensure_corpus(cfg.corpus_dir, seed=0)))
    train_ds, val_ds = build_datasets(cfg)
    cfg = replace(cfg, epochs=cfg.epochs_for(len(train_ds)), autocast=resolve_autocast(cfg.autocast, device))
    dims = ModelSpec(cfg.method, cfg.channels, cfg.hidden, cfg.batch_norm)
    encoder = Encoder(dims).to(device)
    criterion = SimLoss(dims, beta=cfg.beta, negatives_from=cfg.negatives).to(device)
    optimizer = torch.optim.Adam(list(encoder.parameters()) + list(criterion.parameters()), lr=cfg.lr,
                                 fused=True if device.type == "cuda" else None)  # one kernel per step on a GPU
    model = Objective(encoder, criterion)
    if world > 1:
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    step = Step(model, optimizer, StepOptions(cfg.autocast, cfg.compile))
    run = Run(cfg, device, encoder, criterion, optimizer, train_ds, val_ds, step, rank, world)
    if resumed:
        encoder.load_state_dict(resumed["model"])
        criterion.load_state_dict(resumed["loss"])
        optimizer.load_state_dict(resumed["optimizer"])
        set_rng_state(resumed["rng"], device)
        run.epoch, run.batch, run.step = resumed["epoch"], resumed.get("batch", 0), resumed["step"]
    return run


def run_epoch(run: Run, writer, stop: StopFlag) -> bool:
    """Train the rest of the current epoch from run.batch on, or until a stop is requested; returns
    whether the epoch's last batch was trained. The run's position follows every batch."""
    from tqdm import tqdm

    cfg = run.cfg
    run.train_ds.set_epoch(run.epoch)
    n = len(run.train_ds)
    order = epoch_order(cfg.seed, run.epoch, n)
    t0, seen = time.perf_counter(), 0
    with tqdm(total=run.n_batches, initial=run.batch, desc=f"epoch {run.epoch + 1}/{cfg.epochs}", unit="batch",
              dynamic_ncols=True, mininterval=progress_interval(), disable=not run.lead) as bar:
        for b, clips in batches(run.train_ds, order, cfg.batch_size, run.batch, cfg.workers, run.rank, run.world):
            clips = clips.to(run.device, non_blocking=True)
            run.criterion.beta = beta_at(run.step, cfg.beta, cfg.beta_warmup)
            global_batch = min(cfg.batch_size, n - b * cfg.batch_size)
            shard = distributed.shard_of(global_batch, run.rank, run.world) if run.world > 1 else None
            stats = run.train_step(clips, shard)
            run.batch, run.step = b + 1, run.step + 1
            seen += global_batch
            rate = seen / (time.perf_counter() - t0)
            stats = {k: float(v) for k, v in stats.items()}
            for k, v in stats.items():
                writer.add_scalar(f"train/{k}", v, run.step)
            writer.add_scalar("train/clips_per_s", rate, run.step)
            writer.add_scalar("train/beta", run.criterion.beta, run.step)
            writer.add_scalar("train/clips_seen", run.step * cfg.batch_size, run.step)
            bar.set_postfix({**{k: f"{v:.3g}" for k, v in stats.items() if k.startswith(("nce", "acc"))},
                             "clips/s": f"{rate:.1f}"}, refresh=False)
            bar.update(1)
            if stopping(run, stop) and run.batch < run.n_batches:
                return False
    return True


def stopping(run: Run, stop: StopFlag) -> bool:
    """Whether to stop: asked for in this process, or (in a torchrun job) in any; every rank calls this
    after the same batch, so all of them stop together."""
    if run.world > 1:
        stop.requested = distributed.any_rank(stop.requested, run.device)
    return stop.requested


def end_epoch(run: Run, writer) -> None:
    """Validate the epoch just trained (when there is validation data; rank 0) and move to the next epoch."""
    if run.val_ds is not None and run.lead:
        val = validate(run.encoder, run.criterion, run.val_ds, run.cfg, run.device)
        for k, v in val.items():
            writer.add_scalar(f"val/{k}", v, run.step)
        print(f"epoch {run.epoch + 1}: validation " + ", ".join(f"{k} {v:.4g}" for k, v in val.items()))
    run.epoch, run.batch = run.epoch + 1, 0


def save(run: Run) -> Path:
    """Write the run's checkpoint (atomically) at its current position (rank 0 alone in a torchrun job)."""
    if not run.lead:
        return run.checkpoint_path
    ckpt = {"format": FORMAT, "dims": run.encoder.dims.to_dict(), "model": run.encoder.state_dict(),
            "loss": run.criterion.state_dict(), "optimizer": run.optimizer.state_dict(),
            "rng": rng_state(run.device), "epoch": run.epoch, "batch": run.batch, "step": run.step,
            "config": run.cfg.to_dict(), "code_version": code_version()}
    save_atomic(ckpt, run.checkpoint_path)
    return run.checkpoint_path


class NoWriter:
    """What ranks other than 0 log to: nothing."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training as configured; returns the checkpoint path. On Ctrl-C or SIGTERM it
    saves the checkpoint at the batch reached and raises Interrupted. Started by torchrun with more
    than one process, it joins the job first (train/distributed.py) and leaves it at the end."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = select_device(cfg.device)
    if not distributed.launched():
        if cfg.module_parallel:
            raise UsageError("--module-parallel runs one process per module: start it with "
                             "torchrun --standalone --nproc-per-node 4 -m train.sim --module-parallel ...")
        return train_process(cfg, device)
    rank, world, local_rank = distributed.init(device.type)
    try:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
        if cfg.batch_size < world:
            raise UsageError(f"--batch-size {cfg.batch_size} is the global batch; it must be at least the "
                             f"number of processes ({world})")
        if cfg.data == "corpus":  # rank 0 synthesises a missing corpus, the others wait for it
            from train.corpus import ensure_corpus

            if rank == 0:
                ensure_corpus(cfg.corpus_dir, seed=0)
            torch.distributed.barrier()
        if cfg.module_parallel:
            return train_module_parallel(cfg, device, rank, world)
        return train_process(cfg, device, rank, world)
    finally:
        distributed.shutdown()


def train_module_parallel(cfg: TrainConfig, device: torch.device, rank: int, world: int) -> Path:
    """train() with --module-parallel: this process trains module `rank` (train/pipeline.py)."""
    from train import pipeline

    if cfg.resume:
        raise UsageError("a --module-parallel run cannot be resumed (each rank holds its module's optimiser state)")
    if cfg.data == "corpus":
        from train.corpus import ensure_corpus

        cfg = replace(cfg, corpus_dir=str(ensure_corpus(cfg.corpus_dir, seed=0)))
    if cfg.autocast == "bf16":
        raise UsageError("--module-parallel trains in float32: --autocast bf16 is not available there")
    cfg = replace(cfg, out=str(cfg.run_dir), autocast="off")
    torch.manual_seed(cfg.seed)
    train_ds, _ = build_datasets(cfg)
    cfg = replace(cfg, epochs=cfg.epochs_for(len(train_ds)))
    if rank == 0:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
        print(f"training {cfg.method.upper()} module-parallel on {device} x {world} processes: {len(train_ds)} clips "
              f"x {cfg.epochs} epochs, batch {cfg.batch_size}; run folder {cfg.run_dir}")
    try:
        with StopFlag() as stop:
            path = pipeline.run(cfg, device, rank, world, train_ds, stop)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if stop.requested:
        raise Interrupted(f"interrupted: rank 0 saved the modules as trained so far in {path}")
    return path


def train_process(cfg: TrainConfig, device: torch.device, rank: int = 0, world: int = 1) -> Path:
    """train() in this process: the whole run, or rank `rank` of a torchrun job of `world` processes."""
    cfg, resumed = resume_config(cfg, device)
    run = build_run(cfg, device, resumed, rank, world)
    cfg, out = run.cfg, run.cfg.run_dir
    if run.epoch >= cfg.epochs:
        if run.lead:
            print(f"{run.checkpoint_path}: already trained for {run.epoch} epochs (asked: {cfg.epochs}); "
                  "nothing to do")
        return run.checkpoint_path

    writer = NoWriter()
    if run.lead:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"), purge_step=run.step or None)
        processes = f" x {world} processes" if world > 1 else ""
        print(f"training {cfg.method.upper()} on {device}{processes}: {len(run.train_ds)} clips x {cfg.epochs} "
              f"epochs, batch {cfg.batch_size}, lr {cfg.lr}, beta {cfg.beta}"
              f"{', bf16 autocast' if cfg.autocast == 'bf16' else ''}; run folder {out}")
    run.encoder.train()
    try:
        with StopFlag() as stop:
            while run.epoch < cfg.epochs and not stopping(run, stop):
                if run_epoch(run, writer, stop):
                    end_epoch(run, writer)
                save(run)
    finally:
        writer.close()
    if stop.requested:
        where = (f"after epoch {run.epoch}" if run.batch == 0 else
                 f"at epoch {run.epoch + 1}, batch {run.batch}/{run.n_batches}")
        raise Interrupted(f"interrupted: saved {run.checkpoint_path} {where}; continue with: "
                          f"python -m train.sim --resume --out {out}")
    if run.lead:
        print(f"done: {run.checkpoint_path}")
    return run.checkpoint_path


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        train(cfg)
    except Interrupted as exc:
        print(exc, file=sys.stderr)
        return INTERRUPTED
    except (UsageError, CheckpointError, CorpusError, DataError, AudioError) as exc:
        return fail(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
