"""Linear probes on frozen features (paper §4.2): vowel (3 classes) and syllable (9 classes).

Task definition. Every word is cut into its three syllables with the corpus boundaries; each
syllable crop is centred in zeros to one common length (the longest training syllable, whole
10 ms hops). One example per syllable crop: the syllable target is its syllable (ba ... gu, 9
classes), the vowel target is that syllable's vowel (a, i, u). This follows the paper: its
vowel probe classifies "the vowel corresponding to a syllable's latent representation" (§4.3.1).

Features: the time average of a level's frames over the padded crop. GRU output (ar, 256-d, with
bias) for the headline numbers; a conv module's mu (m1/m2/m3, 512-d) without bias for the weight
analysis (train.concentration).

Protocol: cross-entropy, Adam lr 1e-3, 50 epochs, batch 64 (the paper's). Probe train = the
corpus "train" split, probe test = the "test" split: disjoint by word, and the encoder never saw
test words (the authors' code let them leak). "test_voice" = the held-out voice(s). Mean and
sample standard deviation (ddof=1) over seeds; a seed fixes the probe's initialisation and
batch order (and, for the baselines, the encoder's initialisation and training).

Baselines on the same split and crops: a randomly initialised encoder of the same dims (frozen,
probed like the others), and a supervised encoder (train.model.Encoder, same dims) trained end to
end with cross-entropy through a linear head on its time-averaged GRU output. The supervised one
is trained for --supervised-epochs (default 10: cheap on a CPU, far from converged there;
raise it on a GPU) with Adam 2e-4 and batch 64.

CLI: python -m train.probe --checkpoint PATH [--corpus DIR] [--seeds 3] [--level ar] [--out X.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from train.audio import AR, LEVELS
from train.features import Syllables, encode_levels, syllable_crops, syllable_length
from train.model import Encoder, ModelSpec

TASKS = {"vowel": 3, "syllable": 9}
EVAL_SPLITS = ("val", "test", "test_voice")
VAL_FRACTION = 0.15  # of the training words, held out of the probes' training to choose configurations on
PAPER = {  # paper Table 2 (their single-speaker corpus): accuracy %, mean and std
    "cpc": {"vowel": (96.86, 0.85), "syllable": (49.84, 5.33)},
    "gim": {"vowel": (95.24, 0.60), "syllable": (50.0, 1.55)},
    "sim": {"vowel": (92.58, 2.06), "syllable": (44.53, 1.77)},
    "supervised": {"vowel": (91.19, 1.56), "syllable": (83.32, 2.06)},
    "random": {"vowel": (32.44, 4.44), "syllable": (9.88, 2.12)},
}


# ----------------------------------------------------------------------------------------------
# The probe itself
# ----------------------------------------------------------------------------------------------

def train_linear_probes(x: torch.Tensor, y: torch.Tensor, n_classes: int, seeds, *, bias: bool = True,
                        epochs: int = 50, lr: float = 1e-3, batch: int = 64
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fit G independent linear classifiers at once: cross-entropy, Adam, mini-batches.

    x: features (N, D), shared by all, or (G, N, D), one set per classifier; y: labels (N,);
    seeds: G seeds, one per classifier, each fixing its initialisation (that of nn.Linear under
    torch.manual_seed(seed)) and its batch order. The summed loss gives every classifier exactly
    its own gradient and Adam works per element, so the result is that of G separate runs, for
    the price of about one. Returns weights (G, K, D) and biases (G, K) (None without bias)."""
    seeds = list(seeds)
    G = len(seeds)
    if x.dim() == 2:
        x = x.unsqueeze(0).expand(G, -1, -1)
    if x.shape[0] != G or x.shape[1] != y.shape[0]:
        raise ValueError(f"features {tuple(x.shape)} do not fit {G} seeds and {y.shape[0]} labels")
    n, d = x.shape[1], x.shape[2]
    if n == 0:
        raise ValueError("no training examples for the probe")
    inits = []
    for seed in seeds:
        torch.manual_seed(seed)
        inits.append(nn.Linear(d, n_classes, bias=bias))
    weight = nn.Parameter(torch.stack([m.weight.detach() for m in inits]).to(x.device))
    params = [weight]
    b = None
    if bias:
        b = nn.Parameter(torch.stack([m.bias.detach() for m in inits]).to(x.device))
        params.append(b)
    opt = torch.optim.Adam(params, lr=lr)
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]
    rows = torch.arange(G, device=x.device)[:, None]
    for _ in range(epochs):
        order = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(x.device)  # (G, N)
        for i in range(0, n, batch):  # the last, smaller batch is kept
            idx = order[:, i:i + batch]
            logits = torch.bmm(x[rows, idx], weight.transpose(1, 2))  # (G, B, K)
            if b is not None:
                logits = logits + b[:, None, :]
            loss = nn.functional.cross_entropy(logits.reshape(-1, n_classes), y[idx].reshape(-1),
                                               reduction="sum") / idx.shape[1]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return weight.detach(), (b.detach() if b is not None else None)


def linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding one classifier's weights (K, D) and bias (K,)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).to(weight.device)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin.eval()


def train_linear_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, *, bias: bool = True, epochs: int = 50,
                       lr: float = 1e-3, batch: int = 64, seed: int = 0) -> nn.Linear:
    """One linear classifier on features x (N, D) with labels y (N,)."""
    w, b = train_linear_probes(x, y, n_classes, [seed], bias=bias, epochs=epochs, lr=lr, batch=batch)
    return linear(w[0], None if b is None else b[0])


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Percentage of correct predictions (NaN for an empty set)."""
    if x.shape[0] == 0:
        return float("nan")
    return 100.0 * float((model(x).argmax(-1) == y).float().mean())


def summarise(values: list[float]) -> dict:
    """Mean and sample std (ddof=1; 0 for one run) of per-seed accuracies, NaNs dropped."""
    v = np.array([x for x in values if not np.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "runs": list(values)}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "runs": list(values)}


# ----------------------------------------------------------------------------------------------
# Data: syllable crops of every split, and frozen features
# ----------------------------------------------------------------------------------------------

@dataclass
class ProbeData:
    """Syllable crops per split, one common crop length: train (probe training), val (training-split
    words held out of the probes, for choosing between configurations), test (word-disjoint from
    training), test_voice (a voice never trained on)."""

    splits: dict[str, Syllables]
    length: int
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_corpus(cls, corpus_dir, max_words: int | None = None) -> ProbeData:
        from train.corpus import load_split

        utts = {s: load_split(corpus_dir, s) for s in ("train", "test", "test_voice")}
        if max_words:
            utts = {s: spread(u, max_words) for s, u in utts.items()}
        utts["train"], utts["val"] = split_validation(utts["train"])
        if not utts["train"]:
            raise ValueError(f"{corpus_dir}: the train split is empty")
        length = syllable_length(utts["train"])
        meta = {"corpus": str(corpus_dir), "crop_samples": length,
                "words": {s: len(u) for s, u in utts.items()},
                "word_overlap_train_test": len({u.word for u in utts["train"]} & {u.word for u in utts["test"]})}
        return cls({s: syllable_crops(u, length) for s, u in utts.items()}, length, meta)


def spread(utterances: list, n: int) -> list:
    """At most n utterances taken evenly through the list (sorted by id, voice by voice), so a
    subset keeps every voice instead of the first voice's first words."""
    if n >= len(utterances):
        return list(utterances)
    step = len(utterances) / n
    return [utterances[int(i * step)] for i in range(n)]


def split_validation(utterances: list, fraction: float = VAL_FRACTION, seed: int = 0) -> tuple[list, list]:
    """(train, val): a fixed random `fraction` of the distinct words, every voice of them, goes to val."""
    words = sorted({u.word for u in utterances})
    order = np.random.default_rng(seed).permutation(len(words))
    held = {words[i] for i in order[:max(1, round(fraction * len(words)))]} if len(words) > 1 else set()
    return [u for u in utterances if u.word not in held], [u for u in utterances if u.word in held]


def features(encoder: Encoder, data: ProbeData, levels, device="cpu", batch: int = 64) -> dict:
    """split -> level -> (N, C) time-averaged features."""
    return {s: encode_levels(encoder, syl.audio, levels, device=device, batch=batch, pooled=True)
            for s, syl in data.splits.items()}


def labels(data: ProbeData, split: str, task: str) -> torch.Tensor:
    return getattr(data.splits[split], task)


def probe_groups(feats: dict, data: ProbeData, groups, task: str, *, bias: bool = True, epochs: int = 50,
                 lr: float = 1e-3, batch: int = 64, device="cpu") -> list[dict]:
    """Train one probe per (level, seed) in `groups`, all at once when the levels share a width.

    Returns, per group, {"acc": {split: accuracy %}, "weight": (K, D) array}."""
    levels = [lv for lv, _ in groups]
    widths = {feats["train"][lv].shape[1] for lv in levels}
    if len(widths) > 1:  # different widths cannot share one batched model
        return [r for g in groups for r in probe_groups(feats, data, [g], task, bias=bias, epochs=epochs, lr=lr,
                                                        batch=batch, device=device)]
    x = torch.stack([feats["train"][lv] for lv in levels]).to(device)
    w, b = train_linear_probes(x, labels(data, "train", task).to(device), TASKS[task], [s for _, s in groups],
                               bias=bias, epochs=epochs, lr=lr, batch=batch)
    out = []
    for g, (lv, _) in enumerate(groups):
        probe = linear(w[g], None if b is None else b[g])
        acc = {s: accuracy(probe, feats[s][lv].to(device), labels(data, s, task).to(device)) for s in feats}
        out.append({"acc": acc, "weight": w[g].cpu().numpy()})
    return out


def probe_features(feats: dict, data: ProbeData, level: str, *, seeds, bias: bool = True, epochs: int = 50,
                   lr: float = 1e-3, batch: int = 64, tasks=tuple(TASKS), keep_weights: bool = False,
                   device="cpu") -> dict:
    """Train and score probes for each task and seed on precomputed features (all seeds at once).

    Returns {task: {split: summary, ..., "weights": [W per seed] if keep_weights}}."""
    out = {}
    for task in tasks:
        runs = probe_groups(feats, data, [(level, s) for s in seeds], task, bias=bias, epochs=epochs, lr=lr,
                            batch=batch, device=device)
        out[task] = {s: summarise([r["acc"][s] for r in runs]) for s in ("train",) + EVAL_SPLITS}
        if keep_weights:
            out[task]["weights"] = [r["weight"] for r in runs]
    return out


def evaluate_encoder(encoder: Encoder, data: ProbeData, *, level: str = "ar", seeds=(0, 1, 2), bias: bool = True,
                     epochs: int = 50, device="cpu", keep_weights: bool = False) -> dict:
    feats = features(encoder, data, (level,), device=device)
    return probe_features(feats, data, level, seeds=seeds, bias=bias, epochs=epochs, keep_weights=keep_weights,
                          device=device)


# ----------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------

def random_init_baseline(dims: ModelSpec, data: ProbeData, *, level: str = "ar", seeds=(0, 1, 2),
                         epochs: int = 50, device="cpu", progress: bool = False) -> dict:
    """A fresh randomly initialised encoder per seed, frozen and probed like a trained one."""
    from tqdm import tqdm

    feats: dict = {s: {} for s in data.splits}
    for seed in tqdm(seeds, desc="random-init baseline", disable=not progress, leave=False):
        torch.manual_seed(1000 + seed)
        enc = Encoder(dims).to(device).eval()
        for split, f in features(enc, data, (level,), device=device).items():
            feats[split][f"{level}@{seed}"] = f[level]
    out = {}
    for task in TASKS:  # all seeds' probes in one batched fit, each on its own encoder's features
        runs = probe_groups(feats, data, [(f"{level}@{s}", s) for s in seeds], task, epochs=epochs, device=device)
        out[task] = {s: summarise([r["acc"][s] for r in runs]) for s in ("train",) + EVAL_SPLITS}
    return out


class Supervised(nn.Module):
    """The encoder plus a linear head on its time-averaged GRU output, trained end to end."""

    def __init__(self, dims: ModelSpec, n_classes: int):
        super().__init__()
        self.encoder = Encoder(ModelSpec("cpc", dims.channels, dims.hidden))  # no gradient cuts
        self.head = nn.Linear(dims.hidden, n_classes)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(audio)["ar"].mu.mean(1))


def train_supervised(dims: ModelSpec, data: ProbeData, task: str, *, epochs: int = 10, lr: float = 2e-4,
                     batch: int = 64, seed: int = 0, device="cpu", progress: bool = False) -> Supervised:
    from tqdm import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Supervised(dims, TASKS[task]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = data.splits["train"].audio, labels(data, "train", task)
    for _ in tqdm(range(epochs), desc=f"supervised {task} seed {seed}", disable=not progress, leave=False):
        model.train()
        order = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], batch):
            idx = order[i:i + batch]
            loss = nn.functional.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def _batched_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device, batch: int = 64) -> float:
    if x.shape[0] == 0:
        return float("nan")
    pred = torch.cat([model(x[i:i + batch].to(device)).argmax(-1).cpu() for i in range(0, x.shape[0], batch)])
    return 100.0 * float((pred == y).float().mean())


def supervised_baseline(dims: ModelSpec, data: ProbeData, *, seeds=(0, 1, 2), epochs: int = 10, device="cpu",
                        progress: bool = False) -> dict:
    """The "supervised" row of Table 2: the same architecture trained end to end per task and seed."""
    out = {}
    for task in TASKS:
        res = {s: [] for s in ("train",) + EVAL_SPLITS}
        for seed in seeds:
            model = train_supervised(dims, data, task, epochs=epochs, seed=seed, device=device, progress=progress)
            for s in res:
                res[s].append(_batched_accuracy(model, data.splits[s].audio, labels(data, s, task), device))
        out[task] = {s: summarise(v) for s, v in res.items()}
    out["epochs"] = epochs
    return out


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def format_table(results: dict, title: str = "") -> str:
    rows = [f"{title}" if title else "", "| task | train % | test % | test_voice % |", "|---|---|---|---|"]
    for task in TASKS:
        if task in results:
            r = results[task]
            rows.append(f"| {task} | " + " | ".join(fmt(r[s]) for s in ("train",) + EVAL_SPLITS) + " |")
    return "\n".join(x for x in rows if x)


def fmt(summary: dict) -> str:
    if summary is None or np.isnan(summary["mean"]):
        return "n/a"
    return f"{summary['mean']:.2f} ± {summary['std']:.2f}"


def main(argv: list[str] | None = None) -> int:
    from train.checkpoint import CheckpointError, load_encoder, trained_corpus
    from train.cli import add_corpus_arg, add_device_arg, fail, positive_int, select_device
    from train.corpus import find_corpus

    ap = argparse.ArgumentParser(prog="python -m train.probe", description=(
        "Vowel (3-way) and syllable (9-way) linear probes on time-averaged frozen features of syllable crops. "
        "Probe train = corpus train split; scored on the word-disjoint test split and the held-out-voice split."))
    ap.add_argument("--checkpoint", required=True, help="encoder checkpoint written by python -m train.sim")
    add_corpus_arg(ap)
    ap.add_argument("--seeds", type=positive_int, default=3, help="probe seeds; mean ± std over them (default 3)")
    ap.add_argument("--level", default=AR, choices=LEVELS,
                    help="features: ar = GRU output (default), m1/m2/m3 = a conv module's mu")
    ap.add_argument("--no-bias", action="store_true", help="bias-free probe (the weight analysis uses this)")
    ap.add_argument("--epochs", type=positive_int, default=50, help="probe epochs (paper: 50)")
    ap.add_argument("--baselines", action="store_true",
                    help="also run the random-init and supervised baselines (same dims, same split)")
    ap.add_argument("--supervised-epochs", type=positive_int, default=10, help="epochs for the supervised baseline")
    ap.add_argument("--max-words", type=positive_int, default=None,
                    help="use at most this many words per split (smoke runs)")
    add_device_arg(ap)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    try:
        encoder, ckpt = load_encoder(args.checkpoint)
        corpus = find_corpus(args.corpus, trained_corpus(ckpt))
        data = ProbeData.from_corpus(corpus, args.max_words)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        return fail(str(exc))
    device = select_device(args.device)
    encoder.to(device)
    seeds = tuple(range(args.seeds))
    result = {"checkpoint": str(args.checkpoint), "method": ckpt["dims"]["method"], "level": args.level,
              "bias": not args.no_bias, "seeds": list(seeds), "epochs": args.epochs, "data": data.meta,
              "probe": evaluate_encoder(encoder, data, level=args.level, seeds=seeds, bias=not args.no_bias,
                                        epochs=args.epochs, device=device)}
    print(format_table(result["probe"], f"{result['method']} {args.level} probe (accuracy %, mean ± std over "
                                        f"{len(seeds)} seeds)"))
    if args.baselines:
        dims = ModelSpec(**ckpt["dims"])
        result["random"] = random_init_baseline(dims, data, level=args.level, seeds=seeds, epochs=args.epochs,
                                                device=device, progress=True)
        result["supervised"] = supervised_baseline(dims, data, seeds=seeds, epochs=args.supervised_epochs,
                                                   device=device, progress=True)
        print(format_table(result["random"], "random-init encoder"))
        print(format_table(result["supervised"], f"supervised encoder ({args.supervised_epochs} epochs)"))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
