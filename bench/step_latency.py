"""Streaming-step cost per batch size: how long one `step.onnx` call takes for B streams.

    python bench/step_latency.py MODEL_DIR [MODEL_DIR ...] [--batches 1 4 8 12 16 32] [--threads 2]

Runs the model's step graph directly in onnxruntime (CPU provider) on real state: the batch
first streams a few hops of noise, then every timed call steps all B streams by one hop. The
median of --repeat calls is reported, in ms per call and ms per stream-hop (several models take
turns call by call, so they are compared on the same machine state); the compute bound
on real-time streams is then 10 ms / (ms per stream-hop), before any gRPC or Python cost.
This is the number that moves most between machines (and between busy and quiet hours on a
shared VM), so docs/benchmarks.md quotes it next to every capacity result.
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

from serve.model_dir import step_precision  # noqa: E402
from serve.onnx_sessions import make_session  # noqa: E402


def prepare(model_dir: Path, batch: int, threads: int | None, spin: bool):
    """A zero-argument function running one step of `batch` streams that have already taken a few
    hops (real state, past the start-of-stream special case)."""
    manifest = json.loads((model_dir / "manifest.json").read_text())
    session = make_session(model_dir / "step.onnx", threads, spin)
    names = [o.name for o in session.get_outputs()]
    spec = manifest["geometry"]["state"]
    hop = int(manifest["geometry"]["step_samples"])
    rng = np.random.default_rng(0)
    state = {s["name"]: np.zeros((batch, *s["shape"]), s["dtype"]) for s in spec}
    for _ in range(5):  # warm up, and leave the start-of-stream state behind
        audio = (0.1 * rng.standard_normal((batch, hop))).astype(np.float32)
        out = dict(zip(names, session.run(names, {"audio": audio, **state})))
        state = {s["name"]: out[f"next_{s['name']}"] for s in spec}
    feeds = {"audio": (0.1 * rng.standard_normal((batch, hop))).astype(np.float32), **state}
    return lambda: session.run(names, feeds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("models", nargs="+", help="exported model directories (python -m export.onnx)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 12, 16, 32])
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: one per core)")
    ap.add_argument("--repeat", type=int, default=50, help="timed calls per batch size and model (default %(default)s)")
    ap.add_argument("--no-spin", dest="spin", action="store_false", help="onnxruntime threads do not busy-wait")
    args = ap.parse_args()
    dirs = [Path(m) for m in args.models]
    times = {(d, b): [] for d in dirs for b in args.batches}
    for b in args.batches:
        steps = [(d, prepare(d, b, args.threads, args.spin)) for d in dirs]
        for _ in range(args.repeat):  # the models take turns, call by call: they see the same machine
            for d, step in steps:
                t0 = time.perf_counter()
                step()
                times[d, b].append(time.perf_counter() - t0)
    print("| model | step | " + " | ".join(f"B={b}" for b in args.batches) + " |")
    print("|---|---|" + "---|" * len(args.batches))
    for d in dirs:
        man = json.loads((d / "manifest.json").read_text())
        precision = step_precision(man)
        cells = []
        for b in args.batches:
            ms = float(np.median(times[d, b])) * 1000.0
            cells.append(f"{ms:.2f} ms ({ms / b:.2f}/stream)")
        print(f"| {d.name} ({man['dims']['channels']} ch) | {precision} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
