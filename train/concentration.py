"""Vowel concentration (paper §4.3.1, Fig. 2): where a bias-free vowel probe puts its weight.

For each conv module (m1, m2, m3; CPC: the equivalent layers, see train.features) a bias-free
linear vowel probe (3 x C weights) is trained on time-averaged mu of syllable crops, as in
train.probe. Its weights are divided by their largest magnitude (values in [-1, 1]); the
histogram of those values is Fig. 2. More mass near 0 means the vowel is read from fewer dims.

Summary numbers per module (mean ± std over probe seeds):
  top10_share  share of the total |weight| mass (summed over the 3 classes per dim) carried by the
               10 % of dims with the most mass. 0.10 = spread evenly; 1.0 = all in those dims.
  near_zero    share of scaled weights with |w| < 0.1.
The probe's test accuracy is reported with them: the weights mean little if the probe fails.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from train.audio import CONV_LEVELS
from train.probe import EVAL_SPLITS, ProbeData, features, probe_groups, summarise


def scaled(weights: np.ndarray) -> np.ndarray:
    """Weights divided by their largest magnitude."""
    w = np.asarray(weights, dtype=np.float64)
    top = np.abs(w).max()
    return w / top if top > 0 else w


def top_share(weights: np.ndarray, fraction: float = 0.1) -> float:
    """Share of |weight| mass (summed over classes per dim) in the top `fraction` of dims."""
    mass = np.abs(np.asarray(weights, dtype=np.float64)).reshape(-1, np.shape(weights)[-1]).sum(0)
    total = mass.sum()
    if total == 0:
        return float("nan")
    n = max(1, math.ceil(fraction * mass.size))
    return float(np.sort(mass)[::-1][:n].sum() / total)


def near_zero(weights: np.ndarray, tol: float = 0.1) -> float:
    return float((np.abs(scaled(weights)) < tol).mean())


def vowel_concentration(encoder, data: ProbeData, *, levels=CONV_LEVELS, seeds=(0, 1, 2), epochs: int = 50,
                        device="cpu", feats: dict | None = None) -> dict:
    """level -> {"accuracy": summaries per split, "top10_share": summary, "near_zero": summary,
    "scaled": all seeds' scaled weights}. `feats` (from train.probe.features) saves re-encoding."""
    if feats is None:
        feats = features(encoder, data, levels, device=device)
    groups = [(lv, s) for lv in levels for s in seeds]  # every level and seed in one batched fit
    runs = probe_groups(feats, data, groups, "vowel", bias=False, epochs=epochs, device=device)
    out = {}
    for lv in levels:
        mine = [r for (glv, _), r in zip(groups, runs) if glv == lv]
        ws = [r["weight"] for r in mine]
        out[lv] = {"accuracy": {s: summarise([r["acc"][s] for r in mine]) for s in ("train",) + EVAL_SPLITS},
                   "top10_share": summarise([top_share(w) for w in ws]),
                   "near_zero": summarise([near_zero(w) for w in ws]),
                   "scaled": np.concatenate([scaled(w).ravel() for w in ws])}
    return out


def main(argv: list[str] | None = None) -> int:
    from train.checkpoint import CheckpointError, load_encoder, trained_corpus
    from train.cli import add_corpus_arg, add_device_arg, fail, positive_int, select_device
    from train.corpus import find_corpus
    from train.plots import plot_weight_histograms

    ap = argparse.ArgumentParser(prog="python -m train.concentration", description=(
        "Bias-free vowel probes on each conv module's mu: histogram of the scaled weights (paper Fig. 2) "
        "and the share of weight mass in the top 10 % of dims."))
    ap.add_argument("--checkpoint", required=True, help="encoder checkpoint written by python -m train.sim")
    add_corpus_arg(ap)
    ap.add_argument("--seeds", type=positive_int, default=3)
    ap.add_argument("--epochs", type=positive_int, default=50)
    add_device_arg(ap)
    ap.add_argument("--out", required=True, help="output folder (concentration.png, concentration.json)")
    args = ap.parse_args(argv)
    try:
        encoder, ckpt = load_encoder(args.checkpoint)
        data = ProbeData.from_corpus(find_corpus(args.corpus, trained_corpus(ckpt)))
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        return fail(str(exc))
    device = select_device(args.device)
    res = vowel_concentration(encoder.to(device), data, seeds=range(args.seeds), epochs=args.epochs, device=device)
    method = ckpt["dims"]["method"]
    out = Path(args.out)
    plot_weight_histograms({lv: {method: r["scaled"]} for lv, r in res.items()}, out / "concentration.png")
    summary = {lv: {k: v for k, v in r.items() if k != "scaled"} for lv, r in res.items()}
    (out / "concentration.json").write_text(json.dumps(summary, indent=2))
    for lv, r in summary.items():
        print(f"{lv}: vowel test acc {r['accuracy']['test']['mean']:.1f} %, top-10 % dims carry "
              f"{100 * r['top10_share']['mean']:.1f} % of the weight mass, "
              f"{100 * r['near_zero']['mean']:.1f} % of weights |w| < 0.1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
