"""One command for the whole evaluation (paper §4): python -m train.report --run sim=DIR ... --out DIR.

For each run (a folder holding checkpoint.pt written by train.sim, and optionally decoders in
DIR/decoders/decoder_<level>.pt; missing decoders are trained and saved there):
  - linear probes on the GRU output: vowel and syllable accuracy (paper Table 2), test split
    and held-out-voice split, mean ± std over seeds; plus the random-init and supervised
    baselines (same dims as the first run, same split);
  - bias-free vowel probes per conv module: weight histogram (Fig. 2) and concentration numbers;
  - a decoder per conv module: reconstruction error on the test words, WAV reconstructions;
  - entanglement: relative error for k = 2 ... C per module (Table 3);
  - interpolation between a "bidi..." and a "baga..." word, and a latent traversal.
Writes OUT/index.md (tables next to the paper's numbers), OUT/results.json, PNGs and WAVs.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from train.audio import LEVELS
from train.decoder import (
    DECODER_LEVELS,
    decoder_path,
    fit_and_save,
    load_decoder,
    reconstruction_error,
    write_reconstructions,
)
from train.probe import PAPER as PAPER_TABLE2
from train.probe import fmt, spread

PAPER_KS = (2, 4, 8, 16, 32, 64, 128, 256, 512)
PAPER_TABLE3 = {  # relative error %, paper Table 3 (module -> method -> values at PAPER_KS)
    "m1": {"cpc": (98.1, 96.81, 95.04, 92.52, 89.24, 84.68, 75.9, 54.1, 0),
           "gim": (99.32, 98.71, 97.6, 95.46, 91.2, 82.35, 62.96, 24.33, 0),
           "sim": (84.01, 62.5, 37.42, 29.45, 23.64, 17.96, 11.97, 5.66, 0)},
    "m2": {"cpc": (98.69, 97.59, 95.54, 91.83, 85.43, 74.39, 55.42, 24.5, 0),
           "gim": (98.86, 97.91, 96.17, 93.07, 87.58, 77.8, 59.81, 27.46, 0),
           "sim": (89.89, 81.78, 65.96, 39.26, 28.04, 20.98, 14.0, 6.97, 0)},
    "m3": {"cpc": (98.61, 97.58, 95.86, 93.07, 88.74, 82.18, 70.74, 44.3, 0),
           "gim": (99.01, 98.16, 96.59, 93.9, 89.29, 81.09, 65.23, 31.76, 0),
           "sim": (92.74, 87.44, 77.56, 59.27, 39.89, 27.96, 17.55, 7.73, 0)},
}
PAPER_CONCENTRATION_ACC = {  # bias-free vowel probe test accuracy %, paper §4.3.1
    "cpc": {"m1": 70.31, "m2": 92.81, "m3": 97.19},
    "gim": {"m1": 95.94, "m2": 92.81, "m3": 94.06},
    "sim": {"m1": 87.5, "m2": 93.44, "m3": 91.87},
}
TARGETS = {"vowel": 92.6, "syllable": 44.5}  # the paper's SIM accuracies %, here on our word-disjoint test split


def parse_runs(specs: list[str]) -> list[tuple[str, Path]]:
    runs, seen = [], set()
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise ValueError(f"--run {spec!r}: expected NAME=DIR, e.g. sim=runs/sim")
        if name in seen:
            raise ValueError(f"--run {name}: given twice")
        seen.add(name)
        path = Path(directory)
        if not (path / "checkpoint.pt").is_file():
            raise FileNotFoundError(f"--run {name}: {path / 'checkpoint.pt'} does not exist")
        runs.append((name, path))
    return runs


_T0 = time.time()


def log(msg: str) -> None:
    print(f"[report {time.time() - _T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Per-run evaluation
# ----------------------------------------------------------------------------------------------

def ensure_decoders(name, run_dir: Path, encoder, ckpt, train_utts, out: Path, *, epochs: int, loss: str,
                    retrain: bool, device, lr: float = 2e-4, batch: int = 64) -> dict:
    """level -> decoder path: reuse RUN/decoders/decoder_<level>.pt, else train and save it there (or
    under OUT/<name>/decoders when the run folder is not writable)."""
    paths = {}
    for level in DECODER_LEVELS:
        path = decoder_path(run_dir / "decoders", level)
        if path.is_file() and not retrain:
            log(f"{name}: using {path}")
        else:
            log(f"{name}: training the {level} decoder ({epochs} epochs, {len(train_utts)} words)")
            fit = dict(epochs=epochs, loss=loss, lr=lr, batch=batch, device=device,
                       checkpoint=str(run_dir / "checkpoint.pt"))
            try:
                path = fit_and_save(encoder, ckpt["dims"], train_utts, level, run_dir / "decoders", **fit)
            except OSError:
                path = fit_and_save(encoder, ckpt["dims"], train_utts, level, out / name / "decoders", **fit)
        paths[level] = path
    return paths


def evaluate_run(name: str, run_dir: Path, data, splits: dict, out: Path, args, device) -> dict:
    from train.checkpoint import load_encoder
    from train.concentration import vowel_concentration
    from train.entanglement import default_ks, relative_errors, sample_pairs
    from train.features import encode_levels, load_batch
    from train.interpolate import pick_words, write_interpolation
    from train.probe import features, probe_features
    from train.traverse import write_traversal

    encoder, ckpt = load_encoder(run_dir / "checkpoint.pt")
    encoder.to(device)
    method = ckpt["dims"]["method"]
    seeds = tuple(range(args.seeds))
    res: dict = {"name": name, "dir": str(run_dir), "method": method, "dims": ckpt["dims"],
                 "epoch": ckpt.get("epoch"), "step": ckpt.get("step"), "beta": ckpt["config"].get("beta"),
                 "code_version": ckpt.get("code_version")}
    t0 = time.time()
    log(f"{name}: features of {sum(len(s.vowel) for s in data.splits.values())} syllable crops")
    feats = features(encoder, data, LEVELS, device=device)
    log(f"{name}: probes on the GRU output ({len(seeds)} seeds, {args.probe_epochs} epochs)")
    res["probe"] = probe_features(feats, data, "ar", seeds=seeds, epochs=args.probe_epochs, device=device)
    log(f"{name}: bias-free vowel probes per module")
    res["concentration"] = vowel_concentration(encoder, data, seeds=seeds, epochs=args.probe_epochs, device=device,
                                               feats=feats)
    del feats

    run_out = out / name
    dec_paths = ensure_decoders(name, run_dir, encoder, ckpt, splits["decoder_train"], out,
                                epochs=args.decoder_epochs, loss=args.decoder_loss, lr=args.decoder_lr,
                                batch=args.decoder_batch, retrain=args.retrain_decoders, device=device)
    test = splits["test"]
    res["decoders"], res["entanglement"] = {}, {}
    pairs = sample_pairs(len(test), args.pairs, seed=0, groups=[u.voice for u in test]) if len(test) >= 2 else None
    for level, path in dec_paths.items():
        decoder, meta = load_decoder(path)
        decoder.to(device)
        res["decoders"][level] = {
            "path": str(path), "epochs": meta["config"].get("epochs"), "loss": meta["config"].get("loss"),
            "lr": meta["config"].get("lr"), "batch": meta["config"].get("batch"),
            "train_words": meta["config"].get("train_items"),
            "final_train_loss": meta["history"][-1] if meta["history"] else None,
            "test_relative_mse": reconstruction_error(decoder, encoder, test[:args.recon_words], level, device),
            "wavs": [str(p.relative_to(out)) for p in write_reconstructions(
                decoder, encoder, test[:args.examples], run_out / "reconstructions", level, device=device)]}
        if pairs is not None:
            log(f"{name}: entanglement {level} ({len(pairs)} pairs)")
            involved = np.unique(pairs)
            remap = {int(w): i for i, w in enumerate(involved)}
            z = encode_levels(encoder, load_batch([test[i] for i in involved]), (level,), device=device)[level]
            local = np.vectorize(remap.get)(pairs)
            ent = relative_errors(decoder, z, local, default_ks(z.shape[-1]), n_samples=None,
                                  batch=args.batch, device=device, progress=True)
            res["entanglement"][level] = {"ks": ent["ks"], "mean": ent["mean"].tolist(), "std": ent["std"].tolist(),
                                          "pairs": len(pairs)}
    viz = args.viz_level
    decoder, meta = load_decoder(dec_paths[viz])
    decoder.to(device)
    pool = test + splits["train"]
    if len(pool) >= 2:
        a, b = pick_words(pool)
        interp = write_interpolation(encoder, decoder, viz, a, b, run_out, steps=args.interp_steps, device=device,
                                     tag=name)
        res["interpolation"] = {"png": str(interp["png"].relative_to(out)), "words": list(interp["words"]),
                                "wavs": [str(p.relative_to(out)) for p in interp["wavs"]]}
        trav = write_traversal(encoder, decoder, viz, a, pool[:args.recon_words], run_out, top=args.traverse_dims,
                               steps=args.traverse_steps, device=device, tag=name)
        res["traversal"] = {"png": str(trav["png"].relative_to(out)), "dims": trav["dims"], "word": a.word,
                            "top": [(int(d), float(trav["scores"][d])) for d in trav["ranking"][:10]],
                            "wavs": len(trav["wavs"])}
    if args.ood_words:
        from train.ood import ood_separation

        log(f"{name}: out-of-distribution separation ({args.ood_words} words per split)")
        n = args.ood_words
        res["ood"] = ood_separation(encoder, {"train": splits["train"][:n], "test": test[:n],
                                              "test_voice": splits["test_voice"][:n]}, device=device)
    res["train_config"] = {k: ckpt["config"].get(k) for k in ("batch_norm", "beta_warmup", "negatives", "channels",
                                                           "hidden", "lr", "batch_size")}
    res["seconds"] = round(time.time() - t0, 1)
    return res


# ----------------------------------------------------------------------------------------------
# index.md
# ----------------------------------------------------------------------------------------------

def paper_cell(method: str, task: str) -> str:
    p = PAPER_TABLE2.get(method, {}).get(task)
    return f"{p[0]:.2f} ± {p[1]:.2f}" if p else "–"


def write_index(out: Path, results: dict, command: str) -> Path:
    runs, base, setup = results["runs"], results.get("baselines", {}), results["setup"]
    L = ["# Evaluation report", "",
         f"Command: `{command}`  ", f"Written {setup['date']}; {setup['seconds']:.0f} s on {setup['device']}.", "",
         "## Setup", "",
         f"- Corpus `{setup['corpus']}`: words per split {setup['words']}; train/test words shared: "
         f"{setup['word_overlap_train_test']} (must be 0). Probe examples are syllable crops "
         f"({setup['crop_samples']} samples, centred in zeros); the vowel target is the syllable's vowel.",
         f"- Probes: Adam 1e-3, batch 64, {setup['probe_epochs']} epochs, {setup['seeds']} seeds "
         "(mean ± sample std). Probe train = train split; test = word-disjoint test split; "
         "test_voice = held-out voice.",
         f"- Decoders: {setup['decoder_epochs']} epochs (paper 200), Adam {setup.get('decoder_lr', 2e-4):g} "
         f"(paper 2e-4), batch {setup.get('decoder_batch', 64)} (paper 64), loss {setup['decoder_loss']}, trained on "
         f"{setup['decoder_train_words']} train words. Entanglement: up to {setup['pairs']} same-voice pairs "
         "of different test words.",
         f"- Supervised baseline: {setup['supervised_epochs']} epochs end to end (Adam 2e-4, batch 64).", "",
         "| run | method | checkpoint | epoch | step | beta | β warm-up | BatchNorm | negatives | dims |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs.values():
        d, c = r["dims"], r.get("train_config", {})
        L.append(f"| {r['name']} | {r['method']} | `{r['dir']}/checkpoint.pt` | {r['epoch']} | {r['step']} | "
                 f"{r['beta']} | {c.get('beta_warmup') or 0} | {'yes' if d.get('batch_norm') else 'no'} | "
                 f"{c.get('negatives') or 'window'} | {d['channels']}/{d['hidden']} |")
    L += ["", "## Classification (paper Table 2)", "",
          "Accuracy % of linear probes on the time-averaged GRU output (256-d, with bias); paper = their "
          "single-speaker recorded corpus.", "",
          "| method | vowel (test) | paper | syllable (test) | paper | vowel (held-out voice) | "
          "syllable (held-out voice) | vowel (val) | syllable (val) | vowel (train) | syllable (train) |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]

    def row(label, method, pr):
        return (f"| {label} | {fmt(pr['vowel']['test'])} | {paper_cell(method, 'vowel')} | "
                f"{fmt(pr['syllable']['test'])} | {paper_cell(method, 'syllable')} | {fmt(pr['vowel']['test_voice'])} "
                f"| {fmt(pr['syllable']['test_voice'])} | {fmt(pr['vowel']['val'])} | {fmt(pr['syllable']['val'])} | "
                f"{fmt(pr['vowel']['train'])} | {fmt(pr['syllable']['train'])} |")

    for r in runs.values():
        L.append(row(f"{r['name']} ({r['method']})", r["method"], r["probe"]))
    if "supervised" in base:
        L.append(row(f"supervised ({base['supervised']['epochs']} epochs)", "supervised", base["supervised"]))
    if "random" in base:
        L.append(row("random init", "random", base["random"]))

    L += ["", "## Vowel concentration (paper Fig. 2)", "", "![vowel probe weights](concentration.png)", "",
          "Bias-free vowel probes on each module's time-averaged mu (CPC: the equivalent conv layers). "
          "top-10 % share: share of the |weight| mass carried by the 10 % of dims with the most (0.10 = even "
          "spread); near 0: share of scaled weights with |w| < 0.1.", "",
          "| method | module | vowel acc % (test) | paper acc % | top-10 % share | near 0 |",
          "|---|---|---|---|---|---|"]
    for r in runs.values():
        for lv, c in r["concentration"].items():
            paper = PAPER_CONCENTRATION_ACC.get(r["method"], {}).get(lv)
            L.append(f"| {r['name']} | {lv} | {fmt(c['accuracy']['test'])} | {paper if paper else '–'} | "
                     f"{c['top10_share']['mean']:.3f} ± {c['top10_share']['std']:.3f} | "
                     f"{c['near_zero']['mean']:.3f} ± {c['near_zero']['std']:.3f} |")

    L += ["", "## Entanglement (paper Table 3)", "", "![relative error](entanglement.png)", "",
          "Relative error % = MSE(D(z1'), D(z2)) / MSE(D(z1), D(z2)) after copying the k dims of z2 whose time "
          "means differ most from z1's; mean over pairs. Lower at small k = less entangled. Paper rows in italics.",
          ""]
    for lv in DECODER_LEVELS:
        have = [r for r in runs.values() if lv in r.get("entanglement", {})]
        if not have:
            continue
        ks = have[0]["entanglement"][lv]["ks"]
        L += [f"**{lv}**", "", "| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
        for r in have:
            e = r["entanglement"][lv]
            L.append(f"| {r['name']} | " + " | ".join(f"{100 * m:.2f}" for m in e["mean"]) + " |")
            paper = PAPER_TABLE3[lv].get(r["method"])
            if paper and tuple(e["ks"]) == PAPER_KS:
                L.append(f"| *paper {r['method']}* | " + " | ".join(f"*{v}*" for v in paper) + " |")
        L.append("")

    L += ["## Paper targets", ""] + [f"- {t}" for t in results.get("targets", [])] + [""]

    L += ["## Decoders", "", "Test relative MSE = MSE(decoded, original) / mean power of the original "
          "(0 = perfect, 1 = as bad as silence).", "",
          "| run | module | epochs | loss | final train loss | test relative MSE | WAVs (original, decoded) |",
          "|---|---|---|---|---|---|---|"]
    for r in runs.values():
        for lv, d in r["decoders"].items():
            wavs = " ".join(f"[{Path(w).stem}]({w})" for w in d["wavs"][:4])
            ftl = f"{d['final_train_loss']:.4g}" if d["final_train_loss"] is not None else "–"
            L.append(f"| {r['name']} | {lv} | {d['epochs']} | {d['loss']} | {ftl} | "
                     f"{d['test_relative_mse']:.3f} | {wavs} |")
    if any("ood" in r for r in runs.values()):
        from train.ood import format_tables

        L += ["", "## Out-of-distribution separation", "",
              "Per-utterance mean score; AUROC against held-out test words of the training voices (1 = every "
              "OOD utterance scores above every test word, 0.5 = no separation). `kl`: KL of the posterior to "
              "N(0, I) (SIM only); `maha`: Mahalanobis distance of mu under a Gaussian fitted on training words; "
              "`all`: the levels' standardised scores averaged.", ""]
        for r in runs.values():
            if "ood" in r:
                L += [f"**{r['name']}** ({r['ood']['n']})", ""] + format_tables(r["ood"])
    if results.get("curves"):
        L += ["## Training curves", "", f"![training curves]({results['curves']})", ""]
    L += ["", "## Interpolation (paper Fig. 3)", ""]
    for r in runs.values():
        if "interpolation" in r:
            i = r["interpolation"]
            L += [f"**{r['name']}**: {i['words'][0]} → {i['words'][1]}", "", f"![interpolation]({i['png']})", "",
                  "WAVs: " + " ".join(f"[{Path(w).stem}]({w})" for w in i["wavs"]), ""]
    L += ["## Latent traversal", "", "Each row sweeps one dim over −3 … +3 standard deviations (per-dim statistics "
          "of the test words) with the other dims held; dims ranked by how much they change the decoded output.", ""]
    for r in runs.values():
        if "traversal" in r:
            t = r["traversal"]
            top = ", ".join(f"{d} ({s:.3g})" for d, s in t["top"])
            L += [f"**{r['name']}** ({t['word']}): top dims {top}", "", f"![traversal]({t['png']})", ""]
    path = out / "index.md"
    path.write_text("\n".join(L) + "\n")
    return path


def targets(results: dict) -> list[str]:
    """The paper targets (its SIM accuracies; SIM at most half as entangled as GIM at k = 8), checked on
    whatever SIM and GIM runs are present."""
    lines = []
    by_method = {}
    for r in results["runs"].values():
        by_method.setdefault(r["method"], r)
    sim, gim = by_method.get("sim"), by_method.get("gim")
    if sim is None:
        return ["no SIM run: targets not checked"]
    for task, goal in TARGETS.items():
        m = sim["probe"][task]["test"]["mean"]
        lines.append(f"SIM {task} accuracy ≥ {goal} %: {m:.2f} % — {'met' if m >= goal else 'NOT met'}")
    if gim is None:
        lines.append("no GIM run: the k = 8 comparison is not checked")
        return lines
    for lv in DECODER_LEVELS:
        es, eg = sim.get("entanglement", {}).get(lv), gim.get("entanglement", {}).get(lv)
        if not es or not eg or 8 not in es["ks"] or 8 not in eg["ks"]:
            lines.append(f"{lv}: relative error at k = 8 not available")
            continue
        s, g = es["mean"][es["ks"].index(8)], eg["mean"][eg["ks"].index(8)]
        lines.append(f"{lv}: SIM relative error at k = 8 ≤ ½ GIM's: {100 * s:.2f} % vs {100 * g:.2f} % "
                     f"(half: {50 * g:.2f} %) — {'met' if s <= g / 2 else 'NOT met'}")
    return lines


def make_plots(out: Path, results: dict) -> None:
    from train.plots import plot_relative_errors, plot_weight_histograms

    runs = results["runs"].values()
    levels = [lv for lv in DECODER_LEVELS if any(lv in r["concentration"] for r in runs)]
    plot_weight_histograms({lv: {r["name"]: r["concentration"][lv]["scaled"] for r in runs} for lv in levels},
                           out / "concentration.png", "bias-free vowel probe weights, scaled by the largest")
    curves = {lv: {r["name"]: (r["entanglement"][lv]["ks"], 100 * np.asarray(r["entanglement"][lv]["mean"]))
                   for r in runs if lv in r.get("entanglement", {})} for lv in DECODER_LEVELS}
    plot_relative_errors({lv: c for lv, c in curves.items() if c} or {"none": {}}, out / "entanglement.png",
                         "relative error vs dims copied")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def main(argv: list[str] | None = None) -> int:
    from train.checkpoint import CheckpointError, load, trained_corpus
    from train.cli import (
        add_device_arg,
        fail,
        int_at_least,
        non_negative_int,
        positive_float,
        positive_int,
        select_device,
    )
    from train.corpus import find_corpus, load_split
    from train.model import ModelSpec
    from train.probe import ProbeData, random_init_baseline, supervised_baseline

    ap = argparse.ArgumentParser(prog="python -m train.report", description=(
        "The paper's evaluation in one command: probes (Table 2) with baselines, vowel concentration (Fig. 2), "
        "decoders, entanglement (Table 3), interpolation and traversal. Writes OUT/index.md, results.json, "
        "PNGs and WAVs."), formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--run", action="append", required=True, metavar="NAME=DIR",
                    help="a run folder holding checkpoint.pt (and optionally decoders/); repeat per method")
    ap.add_argument("--out", required=True, help="report folder")
    ap.add_argument("--corpus", default=None, help="corpus folder (default: the first run's, else the embedded one)")
    ap.add_argument("--seeds", type=positive_int, default=3, help="probe seeds")
    ap.add_argument("--probe-epochs", type=positive_int, default=50, help="probe epochs (paper 50)")
    ap.add_argument("--supervised-epochs", type=positive_int, default=10, help="epochs of the supervised baseline")
    ap.add_argument("--no-baselines", action="store_true", help="skip the random-init and supervised baselines")
    ap.add_argument("--decoder-epochs", type=positive_int, default=200, help="epochs for decoders that must be trained")
    ap.add_argument("--decoder-loss", choices=("mse", "mse+logmel"), default="mse", help="decoder loss")
    ap.add_argument("--decoder-lr", type=positive_float, default=2e-4,
                    help="Adam learning rate of decoders that must be trained (paper 2e-4; a CPU budget of a few "
                         "epochs needs a larger one, docs/results.md)")
    ap.add_argument("--decoder-batch", type=positive_int, default=64, help="decoder training batch (paper 64)")
    ap.add_argument("--decoder-words", type=positive_int, default=None,
                    help="train decoders on at most this many train-split words (default all)")
    ap.add_argument("--retrain-decoders", action="store_true", help="train decoders even if RUN/decoders has them")
    ap.add_argument("--pairs", type=positive_int, default=200, help="word pairs for the entanglement score")
    ap.add_argument("--viz-level", choices=DECODER_LEVELS, default="m3", help="module for interpolation/traversal")
    ap.add_argument("--interp-steps", type=int_at_least(2), default=6, help="interpolation steps from a = 0 to 1")
    ap.add_argument("--traverse-dims", type=positive_int, default=6, help="top-ranked dims shown in the traversal")
    ap.add_argument("--traverse-steps", type=int_at_least(2), default=7, help="values per traversed dim")
    ap.add_argument("--examples", type=non_negative_int, default=3, help="test words reconstructed as WAV per module")
    ap.add_argument("--recon-words", type=positive_int, default=64, help="test words for the reconstruction error")
    ap.add_argument("--max-words", type=positive_int, default=None,
                    help="at most this many words per split (smoke runs)")
    ap.add_argument("--batch", type=positive_int, default=64, help="decoder batch for entanglement")
    ap.add_argument("--ood-words", type=non_negative_int, default=150,
                    help="words per split for the out-of-distribution separation (0 = skip it)")
    add_device_arg(ap)
    args = ap.parse_args(argv)
    t0 = time.time()
    out = Path(args.out)
    try:
        runs = parse_runs(args.run)
        first = load(runs[0][1] / "checkpoint.pt")
        corpus = find_corpus(args.corpus, trained_corpus(first))
        data = ProbeData.from_corpus(corpus, args.max_words)
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        return fail(str(exc))
    device = select_device(args.device)
    out.mkdir(parents=True, exist_ok=True)
    cut = (lambda u: spread(u, args.max_words)) if args.max_words else (lambda u: u)
    train_utts = cut(load_split(corpus, "train"))
    splits = {"train": train_utts, "test": cut(load_split(corpus, "test")),
              "test_voice": cut(load_split(corpus, "test_voice")),
              "decoder_train": train_utts[:args.decoder_words] if args.decoder_words else train_utts}
    results: dict = {"runs": {}, "baselines": {}}
    for name, run_dir in runs:
        try:
            results["runs"][name] = evaluate_run(name, run_dir, data, splits, out, args, device)
        except CheckpointError as exc:
            return fail(str(exc))
    if not args.no_baselines:
        dims = ModelSpec(**first["dims"])
        seeds = tuple(range(args.seeds))
        log("baseline: random-init encoder")
        results["baselines"]["random"] = random_init_baseline(dims, data, seeds=seeds, epochs=args.probe_epochs,
                                                              device=device, progress=True)
        log(f"baseline: supervised encoder ({args.supervised_epochs} epochs)")
        results["baselines"]["supervised"] = supervised_baseline(dims, data, seeds=seeds,
                                                                 epochs=args.supervised_epochs, device=device,
                                                                 progress=True)
    results["targets"] = targets(results)
    results["setup"] = {**data.meta, "probe_epochs": args.probe_epochs, "seeds": args.seeds,
                        "decoder_epochs": args.decoder_epochs, "decoder_loss": args.decoder_loss,
                        "decoder_lr": args.decoder_lr, "decoder_batch": args.decoder_batch,
                        "decoder_train_words": len(splits["decoder_train"]), "pairs": args.pairs,
                        "supervised_epochs": args.supervised_epochs, "device": str(device),
                        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": time.time() - t0}
    make_plots(out, results)
    with_logs = {name: run_dir for name, run_dir in runs if (run_dir / "tb").is_dir()}
    if with_logs:
        from train.curves import plot_curves

        results["curves"] = plot_curves(with_logs, out / "curves.png").name
    command = "python -m train.report " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    index = write_index(out, results, command)
    for r in results["runs"].values():
        for c in r["concentration"].values():
            c.pop("scaled")
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=2))
    for line in results["targets"]:
        print(line)
    print(f"wrote {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
