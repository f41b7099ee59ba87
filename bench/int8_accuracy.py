"""How far an `--int8` export's streaming latents and flags are from its own fp32 step, on words and on audio unlike them.

    python bench/int8_accuracy.py MODEL_DIR [--corpus DIR] [--split train] [--clips 40] [--seed 7]
                                  [--real DIR]

MODEL_DIR comes from `python -m export.onnx CHECKPOINT --out MODEL_DIR --int8`; it holds the int8
`step.onnx` and the fp32 `step.fp32.onnx`. Both stream the same audio (160-sample chunks): corpus
clips the export did not calibrate on (the export uses the test split; the default here is the
train split), white noise at five levels, pure tones (export.quantize.check_signals) and, with
--real (default: Debian's codec2-examples recordings, when installed), real recorded speech.
Per signal and level it prints the relative RMS error, the largest per-frame relative error and
the lowest per-frame cosine of int8 against fp32 (export.quantize.accuracy), and the share of
frames whose OOD flag differs between the int8 step (with its own calibration) and the fp32 step
(with the fp32 calibration the export keeps as `calibration_fp32`).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ood_flags import REAL_SPEECH, real_speech  # noqa: E402

from export.quantize import STEP, STEP_FP32, accuracy, check_signals, encode_hops  # noqa: E402
from serve.runtime import StreamingModel  # noqa: E402
from serve.scoring import Scorer  # noqa: E402


def fp32_view(model_dir: Path, tmp: Path) -> Path:
    """A directory of links to MODEL_DIR's files with the fp32 step as step.onnx."""
    for f in model_dir.iterdir():
        (tmp / f.name).symlink_to(f.resolve())
    (tmp / STEP).unlink()
    (tmp / STEP).symlink_to((model_dir / STEP_FP32).resolve())
    return tmp


def max_frame_error(fp32: list[dict], int8: list[dict], level: str) -> float:
    """The largest per-frame ||int8 - fp32|| / ||fp32|| (frames with a non-negligible norm)."""
    a = np.concatenate([r[level] for r in int8]).astype(np.float64)
    b = np.concatenate([r[level] for r in fp32]).astype(np.float64)
    norm = np.linalg.norm(b, axis=1)
    ok = norm > 1e-3 * max(float(norm.max(initial=0.0)), 1e-12)
    return float((np.linalg.norm(a - b, axis=1)[ok] / norm[ok]).max(initial=0.0))


def flags_of(manifest_calibration: dict, encoded: list[dict], level: str) -> np.ndarray:
    scorer = Scorer({"calibration": manifest_calibration})
    return np.concatenate([scorer.score(level, {k: e[f"{k}_{level}"] for k in ("maha", "kl") if f"{k}_{level}" in e}).ood
                           for e in encoded])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("model", help="an export made with --int8")
    ap.add_argument("--corpus", help="corpus directory (default: the default corpus cache)")
    ap.add_argument("--split", default="train", help="corpus split to draw clips from (default %(default)s)")
    ap.add_argument("--clips", type=int, default=40)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--real", type=Path, default=REAL_SPEECH,
                    help="folder of real recordings, *.wav (default %(default)s; skipped when absent)")
    args = ap.parse_args()

    from train.audio import load_audio
    from train.corpus import find_corpus, load_corpus

    model_dir = Path(args.model)
    if not (model_dir / STEP_FP32).is_file():
        print(f"error: {model_dir} has no {STEP_FP32}: export it with --int8", file=sys.stderr)
        return 2
    utts = load_corpus(find_corpus(args.corpus), args.split)
    pick = np.random.default_rng(args.seed).choice(len(utts), min(args.clips, len(utts)), replace=False)
    signals = {f"corpus words ({args.split})": [load_audio(utts[i].path) for i in pick], **check_signals(seed=args.seed)}
    int8_model = StreamingModel(model_dir)
    if args.real.is_dir():
        real = real_speech(args.real, int8_model.sample_rate)
        if real:
            signals[f"real speech ({len(real)} recordings in {args.real})"] = real
    man = int8_model.manifest
    cal_fp32 = man.get("calibration_fp32")
    with tempfile.TemporaryDirectory() as tmp:
        fp32_model = StreamingModel(fp32_view(model_dir, Path(tmp)), verify=False)
        print("| signal | level | relative RMS error | largest frame error | lowest frame cosine | flags that differ |")
        print("|---|---|---|---|---|---|")
        for name, audios in signals.items():
            int8 = encode_hops(int8_model, audios)
            fp32 = encode_hops(fp32_model, audios)
            for level, acc in accuracy(fp32, int8, int8_model.levels).items():
                differ = "-"
                if cal_fp32 is not None:
                    a, b = flags_of(man["calibration"], int8, level), flags_of(cal_fp32, fp32, level)
                    differ = f"{int(np.sum(a != b))} of {a.size}"
                print(f"| {name} | {level} | {100 * acc['rel_rms_err']:.1f} % | "
                      f"{100 * max_frame_error(fp32, int8, level):.0f} % | {acc['min_cosine']:.3f} | {differ} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
