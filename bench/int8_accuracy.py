"""How far an `--int8` export's streaming latents are from its own fp32 step, on corpus clips.

    python bench/int8_accuracy.py MODEL_DIR [--corpus DIR] [--split train] [--clips 40] [--seed 7]

MODEL_DIR comes from `python -m export.onnx CHECKPOINT --out MODEL_DIR --int8`; it holds the int8
`step.onnx` and the fp32 `step.fp32.onnx`. Both stream the same clips (160-sample chunks) and the
script prints, per level, the relative RMS error and the mean / lowest per-frame cosine of int8
against fp32 (export.quantize.accuracy, as the export's own check) and the share of int8 frames
flagged at the manifest's threshold. Use clips the export did not calibrate on (the export uses
the test split; the default here is the train split).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from export.quantize import STEP, STEP_FP32, accuracy  # noqa: E402
from export.streams import encode_streams  # noqa: E402
from serve.runtime import StreamingModel  # noqa: E402


def fp32_view(model_dir: Path, tmp: Path) -> Path:
    """A directory of links to MODEL_DIR's files with the fp32 step as step.onnx."""
    for f in model_dir.iterdir():
        (tmp / f.name).symlink_to(f.resolve())
    (tmp / STEP).unlink()
    (tmp / STEP).symlink_to((model_dir / STEP_FP32).resolve())
    return tmp


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("model", help="an export made with --int8")
    ap.add_argument("--corpus", help="corpus directory (default: the default corpus cache)")
    ap.add_argument("--split", default="train", help="corpus split to draw clips from (default %(default)s)")
    ap.add_argument("--clips", type=int, default=40)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    from train.audio import load_audio
    from train.corpus import find_corpus, load_corpus

    model_dir = Path(args.model)
    if not (model_dir / STEP_FP32).is_file():
        print(f"error: {model_dir} has no {STEP_FP32}: export it with --int8", file=sys.stderr)
        return 2
    utts = load_corpus(find_corpus(args.corpus), args.split)
    pick = np.random.default_rng(args.seed).choice(len(utts), min(args.clips, len(utts)), replace=False)
    audios = [load_audio(utts[i].path) for i in pick]
    int8_model = StreamingModel(model_dir)
    hops = [[int8_model.hop]] * len(audios)  # one hop per chunk, as a live stream
    int8 = encode_streams(int8_model, audios, hops)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = encode_streams(StreamingModel(fp32_view(model_dir, Path(tmp)), verify=False), audios, hops)
    cal = int8_model.manifest["calibration"]["levels"]
    print(f"{len(audios)} clips of the {args.split} split, seed {args.seed}")
    print("| level | relative RMS error | mean / lowest frame cosine | int8 flag rate at the threshold |")
    print("|---|---|---|---|")
    for level, acc in accuracy(fp32, int8, int8_model.levels).items():
        key = f"{cal[level]['score']}_{level}"
        flagged = float(np.mean(np.concatenate([r[key] for r in int8]) > cal[level]["threshold"]))
        print(f"| {level} | {100 * acc['rel_rms_err']:.1f} % | {acc['mean_cosine']:.3f} / {acc['min_cosine']:.3f} "
              f"| {100 * flagged:.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
