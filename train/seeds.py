"""`python -m train.seeds`: one table of several training seeds per setting, from train.report outputs.

A report's own ± is the spread over probe seeds of one trained model. Comparing two settings needs the
spread over training seeds too: give each setting the reports of its seeds, and this writes, per
measure, the mean ± sample standard deviation over those runs (each run contributing its probe-seed
mean), with the number of runs.

    python -m train.seeds --setting "β constant=reports/w0_s0,reports/w0_s1,reports/w0_s2" \\
                          --setting "warm-up 100=reports/w100_s0,..." --out seeds.md
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

from train.cli import fail

Measure = tuple[str, Callable[[dict], float]]


def _probe(task: str, split: str) -> Callable[[dict], float]:
    return lambda run: run["probe"][task][split]["mean"]


def _module(key: str, level: str) -> Callable[[dict], float]:
    if key == "accuracy":
        return lambda run: run["concentration"][level]["accuracy"]["test"]["mean"]
    return lambda run: run["concentration"][level][key]["mean"]


def _entanglement(level: str, k: int) -> Callable[[dict], float]:
    def get(run: dict) -> float:
        e = run["entanglement"][level]
        return 100.0 * e["mean"][e["ks"].index(k)]
    return get


def _decoder(level: str) -> Callable[[dict], float]:
    return lambda run: run["decoders"][level]["test_relative_mse"]


def _ood(score: str, case: str) -> Callable[[dict], float]:
    return lambda run: run["ood"]["auroc"][score]["all"][case]


MEASURES: list[Measure] = [
    ("vowel test, GRU", _probe("vowel", "test")),
    ("syllable test, GRU", _probe("syllable", "test")),
    ("vowel val, GRU", _probe("vowel", "val")),
    ("syllable val, GRU", _probe("syllable", "val")),
    ("vowel held-out voice, GRU", _probe("vowel", "test_voice")),
    ("syllable held-out voice, GRU", _probe("syllable", "test_voice")),
    *[(f"bias-free vowel {lv}", _module("accuracy", lv)) for lv in ("m1", "m2", "m3")],
    *[(f"near-0 share {lv}", _module("near_zero", lv)) for lv in ("m1", "m2", "m3")],
    *[(f"rel. error k = 8 {lv} %", _entanglement(lv, 8)) for lv in ("m1", "m2", "m3")],
    *[(f"decoder test rel. MSE {lv}", _decoder(lv)) for lv in ("m1", "m2", "m3")],
    *[(f"OOD maha all: {case}", _ood("maha", case))
      for case in ("time-reversed words", "white noise", "pure tone", "held-out voice words")],
]


def runs_of(report_dir: Path) -> list[dict]:
    path = report_dir / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{report_dir}: no results.json (run python -m train.report first)")
    return list(json.loads(path.read_text())["runs"].values())


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return m, s


def summarise(settings: dict[str, list[dict]]) -> dict[str, dict[str, dict]]:
    """{measure: {setting: {"mean", "std", "n", "runs"}}}; a measure a run lacks is left out for it."""
    table: dict[str, dict[str, dict]] = {}
    for label, get in MEASURES:
        row = {}
        for setting, runs in settings.items():
            values = []
            for run in runs:
                try:
                    values.append(float(get(run)))
                except (KeyError, ValueError, TypeError):
                    continue
            if values:
                m, s = mean_std(values)
                row[setting] = {"mean": m, "std": s, "n": len(values), "runs": values}
        if row:
            table[label] = row
    return table


def _cell(stats: dict | None) -> str:
    if stats is None:
        return "–"
    digits = 3 if abs(stats["mean"]) < 10 else 1
    spread = "" if math.isnan(stats["std"]) else f" ± {stats['std']:.{digits}f}"
    return f"{stats['mean']:.{digits}f}{spread}"


def to_markdown(table: dict[str, dict[str, dict]], settings: list[str], n_runs: dict[str, int]) -> str:
    head = "| measure | " + " | ".join(f"{s} (n = {n_runs[s]})" for s in settings) + " |"
    lines = [head, "|---|" + "---|" * len(settings)]
    for label, row in table.items():
        lines.append(f"| {label} | " + " | ".join(_cell(row.get(s)) for s in settings) + " |")
    return "\n".join(lines) + "\n"


def parse_setting(text: str) -> tuple[str, list[Path]]:
    label, sep, dirs = text.rpartition("=")  # the last "=": a label may hold one ("N = 100")
    if not sep or not label.strip() or not dirs.strip():
        raise argparse.ArgumentTypeError(f"expected LABEL=REPORT_DIR[,REPORT_DIR...], got {text!r}")
    return label.strip(), [Path(d) for d in dirs.split(",") if d]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.seeds", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", type=parse_setting, action="append", required=True,
                    metavar="LABEL=REPORT_DIR[,...]", help="a setting and the report folders of its training seeds")
    ap.add_argument("--out", type=Path, help="write the markdown table (and OUT with .json) here; default stdout")
    args = ap.parse_args(argv)
    settings: dict[str, list[dict]] = {}
    try:
        for label, dirs in args.setting:
            settings[label] = [run for d in dirs for run in runs_of(d)]
    except FileNotFoundError as exc:
        return fail(str(exc))
    table = summarise(settings)
    text = to_markdown(table, list(settings), {k: len(v) for k, v in settings.items()})
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
