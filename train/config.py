"""The training configuration: one frozen dataclass, with the schedules as named instances.

`python -m train.sim` builds a TrainConfig from its flags, whose defaults are read from the preset
chosen with --preset (CPU or PAPER below). A checkpoint stores the config as a plain dict
(`to_dict`), and `from_dict` reads back the dicts of older runs, which lack the newer keys.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from train.audio import CROP_SAMPLES

PAPER_CLIPS_SEEN = 1000 * 680  # the paper: 1000 epochs over 680 training clips


@dataclass(frozen=True)
class TrainConfig:
    # the model and its objective
    method: str = "sim"  # sim, gim or cpc (train.model.METHODS)
    beta: float = 0.0033  # KL weight in the authors' normalisation (train/loss.py); the paper's value
    beta_warmup: int = 0  # optimiser steps over which the KL weight rises linearly from 0 to beta
    batch_norm: bool = True  # BatchNorm1d between each conv and its ReLU (SIM learns early with it)
    negatives: str = "sequence"  # InfoNCE negatives from the batch's whole sequences, or the "window"
    channels: int = 512  # conv and latent width (the paper's)
    hidden: int = 256  # GRU width (the paper's)
    # the schedule
    preset: str = "cpu"  # the name of the preset these values started from
    batch_size: int = 8
    lr: float = 2e-4  # Adam
    clips_seen: int = 4_600  # training clips to see when epochs is not given (cpu: one epoch of the corpus)
    epochs: int | None = None  # None: as many as clips_seen needs (set when training starts)
    # the data
    data: str = "corpus"  # "corpus" (embedded) or a folder of 16 kHz mono audio
    corpus_dir: str | None = None  # where the embedded corpus is cached (None: the default cache)
    crop: int = CROP_SAMPLES  # samples per training clip
    max_clips: int | None = None  # use at most this many training clips (smoke runs)
    # the run
    out: str | None = None  # run folder (None: runs/<method>)
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    threads: int | None = None  # CPU threads for torch (None: torch's choice)
    workers: int = 0  # data-loader worker processes
    # the step (train/step.py): how it runs, not what it trains
    autocast: str = "auto"  # "auto" (bf16 where native: train.cli.native_bf16), "off" or "bf16"
    compile: bool = False  # torch.compile the forward pass and loss
    module_parallel: bool = False  # one torchrun process per greedy module, trained as a pipeline (train/pipeline.py)

    @property
    def run_dir(self) -> Path:
        return Path(self.out or f"runs/{self.method}")

    def epochs_for(self, n_train: int) -> int:
        """The epochs to train on n_train clips: as given, else enough to see clips_seen clips."""
        return self.epochs or max(1, math.ceil(self.clips_seen / max(1, n_train)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> TrainConfig:
        """The config a checkpoint recorded. Keys added since an older run was saved take the value that
        was the behaviour then: no KL warm-up, no BatchNorm, negatives from the prediction window, float32, and
        the clips seen of its preset."""
        names = {f.name for f in fields(cls)}
        base = PRESETS.get(saved.get("preset"), CPU)
        before = {"negatives": "window", "batch_norm": False, "beta_warmup": 0,  # behaviour before the keys existed
                  "autocast": "off"}
        return replace(base, **{**before, **{k: v for k, v in saved.items() if k in names}})


# The default: one epoch of the embedded corpus, sized for a 2-core CPU (docs/benchmarks.md: how long it takes).
CPU = TrainConfig()
# The paper's schedule: Adam 2e-4, batch 8, as many clips seen as its 1000 epochs x 680 clips; for a GPU.
PAPER = replace(CPU, preset="paper", clips_seen=PAPER_CLIPS_SEEN)
PRESETS: dict[str, TrainConfig] = {"cpu": CPU, "paper": PAPER}
