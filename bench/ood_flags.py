"""What the served OOD flag does on anomalies and on held-out words: flag rates and AUROC per signal and level.

    python bench/ood_flags.py MODEL_DIR [--corpus DIR] [--words 150] [--per-kind 30] [--real DIR]
                              [--compare] [--json OUT]

Streams every clip through MODEL_DIR's streaming graphs (serve.runtime, as the server does) and
scores it with serve.scoring and the manifest's calibration, exactly as the server flags frames.
Signals (export.ood_signals): held-out corpus words that the export did not calibrate on (the
negatives), words of the held-out voice, white noise at several RMS levels, pure tones,
time-reversed words, hard-clipped words, silence and, with --real (default: Debian's
codec2-examples, when installed), real recorded speech.

Prints, per signal and level: the share of frames flagged, the share of clips with a flag and the
AUROC of the clip's mean per-frame score against held-out words (the separation a per-file
decision could reach).

--compare also re-calibrates, from the same reference clips as the export, the per-frame scores
kl and maha with rolling windows of other lengths (1 frame = no window) at the manifest's
false-positive rate, and prints each choice's flag rates: the measurement behind the defaults.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from export import calibration  # noqa: E402
from export.onnx import reference_indices  # noqa: E402
from export.ood_signals import is_anomaly, signal_set  # noqa: E402
from export.streams import encode_streams  # noqa: E402
from serve.runtime import StreamingModel  # noqa: E402
from serve.scoring import Scorer, flags, rolling_mean  # noqa: E402
from train.ood import auroc  # noqa: E402

REAL_SPEECH = Path("/usr/share/codec2/wav")  # Debian codec2-examples: recordings of read English speech
REAL_SECONDS = 10.0  # each recording is cut to this much
COMPARE_WINDOWS = (0.0, 0.1, 0.3, 0.6, 1.0)  # seconds (0: one frame)


def real_speech(directory: Path, sample_rate: int) -> list[np.ndarray]:
    """The recordings in directory that soundfile reads, mono at sample_rate, at most REAL_SECONDS each."""
    from clients.audio import AudioFileError, load_audio

    out = []
    for path in sorted(directory.glob("*.wav")):
        try:
            audio = load_audio(path, sample_rate)
        except AudioFileError:
            continue
        if audio.size >= sample_rate // 2:
            out.append(audio[:int(REAL_SECONDS * sample_rate)])
    return out


def encode(model: StreamingModel, clips: list[np.ndarray], batch: int = 64) -> list[dict]:
    out = []
    for i in range(0, len(clips), batch):
        part = clips[i:i + batch]
        out += encode_streams(model, part, [[4000]] * len(part))
    return out


def flag_table(model: StreamingModel, encoded: dict[str, list[dict]], negative: str) -> dict:
    """{signal: {level: {"flagged": share of frames, "auroc": clip-mean score vs negative clips}}}."""
    scorer = Scorer(model.manifest)
    table: dict = {}
    for name, clips in encoded.items():
        row = table.setdefault(name, {})
        for level in model.levels:
            cal = scorer.cal.get(level)
            if cal is None:
                continue
            per_clip = [scorer.score(level, {k: c[f"{k}_{level}"] for k in ("maha", "kl") if f"{k}_{level}" in c}).ood
                        for c in clips]
            ood = np.concatenate(per_clip)
            key = f"{cal.score}_{level}"
            means = np.array([c[key].mean() for c in clips if c[key].size])
            neg = np.array([c[key].mean() for c in encoded[negative] if c[key].size])
            row[level] = {"flagged": float(ood.mean()) if ood.size else float("nan"),
                          "clips": float(np.mean([o.any() for o in per_clip])),
                          "auroc": auroc(means, neg) if name != negative else float("nan"),
                          "frames": int(ood.size)}
    return table


def compare(model: StreamingModel, reference: list[dict], encoded: dict[str, list[dict]], fpr: float) -> dict:
    """{(score, window s): {signal: {level: share of frames flagged}}}, each calibrated as the export does."""
    hops = model.level_hops
    result = {}
    for kind in ("maha", "kl"):
        for seconds in COMPARE_WINDOWS:
            windows = calibration.window_frames(seconds, hops, model.sample_rate) if seconds else \
                {lv: 1 for lv in hops}
            res = {}
            for level in model.levels:
                key = f"{kind}_{level}"
                if key not in reference[0]:
                    continue
                w = windows[level]
                thr = calibration.level_reference([r[key] for r in reference], w, fpr)["threshold"]
                for name, clips in encoded.items():
                    ood = np.concatenate([flags(rolling_mean(c[key], w), thr) for c in clips])
                    res.setdefault(name, {})[level] = float(ood.mean()) if ood.size else float("nan")
            result[f"{kind}, window {seconds:g} s"] = res
    return result


def markdown(table: dict, levels: list[str], value: str, fmt) -> list[str]:
    lines = ["| signal | " + " | ".join(levels) + " |", "|---" * (len(levels) + 1) + "|"]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(fmt(row[lv][value] if value else row[lv]) if lv in row else "-"
                                                  for lv in levels) + " |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("model", help="exported model directory (python -m export.onnx)")
    ap.add_argument("--corpus", help="corpus directory (default: the default corpus cache)")
    ap.add_argument("--words", type=int, default=150, help="held-out words (negatives) (default %(default)s)")
    ap.add_argument("--per-kind", type=int, default=30, help="clips per synthetic signal (default %(default)s)")
    ap.add_argument("--real", type=Path, default=REAL_SPEECH,
                    help="folder of real speech recordings, *.wav (default %(default)s; skipped when absent)")
    ap.add_argument("--compare", action="store_true", help="also compare scores and window lengths")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the tables here as JSON too")
    args = ap.parse_args()

    from train.audio import load_audio
    from train.corpus import find_corpus, load_corpus

    t0 = time.time()
    model = StreamingModel(args.model)
    man = model.manifest
    exp = man.get("export", {})
    corpus = find_corpus(args.corpus)
    test = load_corpus(corpus, "test")
    used = reference_indices(len(test), int(exp.get("calibration_clips", 400)), int(exp.get("seed", 0)))
    rng = np.random.default_rng(args.seed)
    unused = [i for i in range(len(test)) if i not in set(used)]
    words = [load_audio(test[i].path) for i in sorted(rng.choice(unused, min(args.words, len(unused)), replace=False))]
    voice = load_corpus(corpus, "test_voice")
    clips = {"held-out words": words,
             "held-out voice words": [load_audio(u.path) for u in voice[:args.words]]}
    clips.update(signal_set(words, args.per_kind, args.seed))
    if args.real.is_dir():
        real = real_speech(args.real, model.sample_rate)
        if real:
            clips[f"real speech ({args.real.name}, {len(real)} recordings)"] = real
    print(f"{args.model}: {model.step_precision} step; calibration: {man['calibration'].get('window_seconds', 0)} s "
          f"windows at fpr {man['calibration']['fpr']}; corpus {corpus}", file=sys.stderr)
    encoded = {name: encode(model, c) for name, c in clips.items()}
    levels = list(model.levels)
    table = flag_table(model, encoded, "held-out words")
    out = {"model": str(args.model), "flags": table, "counts": {k: len(v) for k, v in clips.items()}}
    print("\nShare of frames flagged (served calibration):\n")
    print("\n".join(markdown(table, levels, "flagged", lambda v: f"{100 * v:.1f} %")))
    print("\nShare of clips with at least one flagged frame:\n")
    print("\n".join(markdown(table, levels, "clips", lambda v: f"{100 * v:.0f} %")))
    print("\nAUROC of the clip's mean per-frame score against held-out words:\n")
    print("\n".join(markdown({k: v for k, v in table.items() if k != "held-out words"}, levels, "auroc",
                             lambda v: f"{v:.3f}")))
    anomalies = [k for k in table if is_anomaly(k)]
    print("\nAnomalies flagged (frames, all anomaly signals): " + ", ".join(
        f"{lv} {100 * np.mean([table[k][lv]['flagged'] for k in anomalies]):.1f} %" for lv in levels if lv in
        table[anomalies[0]]))
    if args.compare:
        cal = man["calibration"]
        ref_all = [load_audio(test[i].path) for i in used]
        _, score_idx = calibration.split_halves(len(ref_all))
        reference = encode(model, [ref_all[i] for i in score_idx])
        cmp = compare(model, reference, encoded, float(cal["fpr"]))
        out["compare"] = cmp
        for choice, res in cmp.items():
            print(f"\nShare of frames flagged, {choice} (calibrated like the export):\n")
            print("\n".join(markdown(res, levels, "", lambda v: f"{100 * v:.1f} %")))
    print(f"\n{sum(len(c) for c in clips.values())} clips in {time.time() - t0:.0f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
