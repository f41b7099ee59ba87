"""Serving capacity: the most concurrent real-time streams the server holds with p99 frame latency <= 50 ms.

    python bench/serve_capacity.py [--streams 4 8 12 16 20] [--seconds 10] [--levels all|m3,ar]

Exports a FULL-size SIM encoder (512 channels, GRU 256; random weights, so the numbers are the
model's cost, not its quality) once into --cache, starts `python -m serve` on a loopback port,
and for each stream count runs that many clients in one asyncio process, each sending one
160-sample message every 10 ms, paced like a live microphone (starts spread over one hop).
Frame latency: from sending the message that holds a top-level frame's last sample (frame f
needs samples up to 160 f + 252, i.e. message f + 1) to receiving that frame. The first second
of every stream is warm-up and not counted. A count passes when p99 <= --p99-ms and every
stream ended cleanly; with --repeat N a count passes only if all N runs do (the tail moves a
lot from run to run on a shared VM). After the listed counts it searches one by one above the
best passing count (--refine) and prints a markdown table and the result. --int8 serves the
model with its step quantized (python -m export.onnx --int8).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protos.sim.v2 import codec  # noqa: E402
from protos.sim.v2 import sim_pb2 as pb  # noqa: E402
from protos.sim.v2 import sim_pb2_grpc as pb_grpc  # noqa: E402
from serve.launch import ServerProcess  # noqa: E402
from serve.model_dir import ModelInfo  # noqa: E402

WARMUP_S = 1.0


def bench_corpus(cache: Path) -> Path:
    """20 synthesised words (one voice) in cache/corpus: the streams' speech and the calibration clips."""
    from train.corpus import TEST_VOICE, build_corpus, word_split

    corpus = cache / "corpus"
    if not (corpus / "corpus.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        train_words, test_words = word_split(0)
        build_corpus(corpus, seed=0, words=list(train_words[:10]) + list(test_words[:10]), voices=("sw",),
                     test_voice=TEST_VOICE, progress=False)
    return corpus


def prepare_model(cache: Path, int8: bool = False) -> Path:
    """Full-size random SIM encoder exported to cache/model (once); calibration on a small corpus.
    With int8, cache/model_int8 with the step quantized (export --int8)."""
    from export.random_model import export_random_model
    from train.model import ModelSpec

    out = cache / ("model_int8" if int8 else "model")
    if not (out / "manifest.json").is_file():
        print(f"exporting a full-size random SIM encoder to {out} ...", file=sys.stderr, flush=True)
    return export_random_model(out, bench_corpus(cache), ModelSpec("sim", 512, 256), int8=int8, seed=0)


def speech_audio(cache: Path, seconds: float, sample_rate: int) -> np.ndarray:
    """Real synthesised speech from the bench corpus, looped to `seconds`."""
    import soundfile as sf

    from train.corpus import load_corpus

    parts = [sf.read(u.path, dtype="float32")[0] for u in load_corpus(bench_corpus(cache))[:10]]
    audio = np.concatenate(parts)
    reps = int(np.ceil(seconds * sample_rate / len(audio)))
    return np.tile(audio, reps)[: int(seconds * sample_rate)]


async def run_streams(address: str, model: ModelInfo, n: int, audio: np.ndarray, levels: list[str],
                      channel_per_stream: bool) -> dict:
    import grpc

    rate, hop = model.sample_rate, model.hop
    lookahead = int(model.manifest["geometry"]["lookahead"])  # top frame f needs samples up to hop (f + 1) + lookahead - 1
    chunks = [pb.StreamEncodeRequest(audio=codec.encode_samples(audio[i:i + hop], pb.FLOAT32))
              for i in range(0, len(audio) - hop + 1, hop)]
    config = pb.StreamEncodeRequest(config=pb.StreamConfig(sample_rate=rate, encoding=pb.FLOAT32, levels=levels))
    latencies: list[float] = []
    errors: list[str] = []
    warm_frames = int(WARMUP_S * rate / hop)
    top = "m3" if "m3" in levels or not levels else levels[-1]
    # a local subchannel pool per channel: otherwise gRPC shares one TCP connection among channels
    options = [("grpc.use_local_subchannel_pool", 1)] if channel_per_stream else []
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(n if channel_per_stream else 1)]
    stubs = [pb_grpc.SimEncoderStub(c) for c in channels]
    for c in channels:
        await c.channel_ready()
    try:
        t0 = time.perf_counter() + 0.2
        offsets = [random.Random(i).uniform(0, hop / rate) for i in range(n)]

        async def one(i: int) -> None:
            sent = [0.0] * len(chunks)
            start = t0 + offsets[i]

            async def requests():
                yield config
                for j, req in enumerate(chunks):
                    due = start + (j + 1) * hop / rate  # when message j's last sample was recorded
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    sent[j] = time.perf_counter()
                    yield req

            try:
                async for resp in stubs[i % len(stubs)].StreamEncode(requests()):
                    now = time.perf_counter()
                    for frames in resp.frames:
                        if frames.level != top:
                            continue
                        for f in range(max(frames.first_index, warm_frames), frames.first_index + frames.count):
                            j = (hop * (f + 1) + lookahead - 1) // hop  # the message holding its last sample
                            if j < len(chunks):
                                latencies.append(now - sent[j])
            except grpc.aio.AioRpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")

        await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        for c in channels:
            await c.close()
    lat = np.asarray(latencies) * 1000.0
    return {"streams": n, "frames": int(lat.size), "errors": errors,
            **{f"p{q}_ms": float(np.percentile(lat, q)) if lat.size else float("nan") for q in (50, 90, 99)},
            "max_ms": float(lat.max()) if lat.size else float("nan")}


def measure(server: ServerProcess, model: ModelInfo, n: int, audio: np.ndarray, levels: list[str], p99_ms: float,
            channel_per_stream: bool = False) -> dict:
    b_sum, b_cnt = server.metric("sim_batch_size_sum"), server.metric("sim_batch_size_count")
    t_sum = server.metric("sim_tick_duration_seconds_sum")
    cpu0, scpu0 = os.times(), server.cpu_seconds()
    r = asyncio.run(run_streams(server.address, model, n, audio, levels, channel_per_stream))
    cpu1, scpu1 = os.times(), server.cpu_seconds()
    r["client_cpu_s"] = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    r["server_cpu_s"] = scpu1 - scpu0
    # CPU seconds (server + client) per second of one stream's audio: 2 cores / this = a compute bound
    r["cpu_per_stream"] = (r["server_cpu_s"] + r["client_cpu_s"]) / (n * len(audio) / model.sample_rate)
    db = server.metric("sim_batch_size_count") - b_cnt
    r["mean_batch"] = (server.metric("sim_batch_size_sum") - b_sum) / db if db else float("nan")
    r["mean_tick_ms"] = 1000.0 * (server.metric("sim_tick_duration_seconds_sum") - t_sum) / db if db else float("nan")
    r["pass"] = not r["errors"] and r["frames"] > 0 and r["p99_ms"] <= p99_ms
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--model", help="exported model directory (default: a full-size random one in --cache)")
    ap.add_argument("--int8", action="store_true", help="serve the default model with its step quantized to int8")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "serve_bench"), help="where the benchmark model lives")
    ap.add_argument("--streams", type=int, nargs="+", default=[4, 8, 12, 16, 20], help="stream counts to run")
    ap.add_argument("--refine", action="store_true", help="then try counts one by one above the best passing one")
    ap.add_argument("--channel-per-stream", action="store_true",
                    help="one gRPC channel (TCP connection) per stream, like independent clients; needed to spread "
                         "streams over `--server-args '--workers N'` (default: all streams on one channel)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per stream count; a count passes only if every run does (default %(default)s)")
    ap.add_argument("--seconds", type=float, default=10.0, help="audio per stream (default %(default)s)")
    ap.add_argument("--levels", default="all", help="levels the clients ask for: all, or e.g. m3,ar")
    ap.add_argument("--p99-ms", type=float, default=50.0, help="latency bound (default %(default)s)")
    ap.add_argument("--server-args", default="", help="more options for python -m serve, e.g. '--threads 1'")
    ap.add_argument("--json", help="also write the results as JSON here")
    args = ap.parse_args()

    cache = Path(args.cache)
    model_dir = Path(args.model) if args.model else prepare_model(cache, args.int8)
    model = ModelInfo(model_dir, verify=False)
    audio = speech_audio(cache, args.seconds, model.sample_rate)
    levels = [] if args.levels == "all" else [lv for lv in args.levels.split(",") if lv]
    manifest = model.manifest
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    header = (f"# serve capacity, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu}, {os.cpu_count()} cores; "
              f"model {manifest['method']} {manifest['dims']['channels']} ch / GRU {manifest['dims']['hidden']}, "
              f"step {model.step_precision}; "
              f"levels {args.levels}; {args.seconds:g} s per stream; p99 bound {args.p99_ms:g} ms; "
              f"server options: {args.server_args or 'defaults'}; "
              f"{'a channel per stream' if args.channel_per_stream else 'one channel'}")
    print(header, flush=True)
    print("| streams | frames | p50 ms | p90 ms | p99 ms | max ms | mean batch | mean tick ms | server CPU s "
          "| client CPU s | CPU s per stream-s | result |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    server = ServerProcess(model_dir, "--max-streams", "1000", "--log-level", "warning",
                           *shlex.split(args.server_args)).start(timeout=300)
    results = []

    def run(n: int, repeat: int = args.repeat) -> dict:
        rows = []
        for _ in range(repeat):
            r = measure(server, model, n, audio, levels, args.p99_ms, args.channel_per_stream)
            rows.append(r)
            verdict = "pass" if r["pass"] else ("errors: " + "; ".join(sorted(set(r["errors"])))[:80] if r["errors"]
                                                else "fail")
            print(f"| {n} | {r['frames']} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | "
                  f"{r['max_ms']:.1f} | {r['mean_batch']:.1f} | {r['mean_tick_ms']:.1f} | {r['server_cpu_s']:.1f} | {r['client_cpu_s']:.1f} | "
                  f"{r['cpu_per_stream']:.3f} | {verdict} |", flush=True)
        summary = {"streams": n, "runs": rows, "pass": all(r["pass"] for r in rows),
                   "passed_runs": sum(r["pass"] for r in rows)}
        results.append(summary)
        return summary

    try:
        run(1, repeat=1)  # warm-up: first sessions, arena growth
        results.clear()
        for n in sorted(set(args.streams)):
            run(n)
        if args.refine:
            best = max((r["streams"] for r in results if r["pass"]), default=0)
            n = best + 1
            while all(r["streams"] != n or r["pass"] for r in results):
                if any(r["streams"] == n for r in results):
                    n += 1
                    continue
                if not run(n)["pass"]:
                    break
                n += 1
    finally:
        server.stop(timeout=60)
    best = max((r["streams"] for r in results if r["pass"]), default=0)
    if args.repeat > 1:
        print("\nruns passed per count: " + ", ".join(f"{r['streams']}: {r['passed_runs']}/{len(r['runs'])}"
                                                      for r in sorted(results, key=lambda r: r["streams"])))
    print(f"\nmost real-time streams with p99 <= {args.p99_ms:g} ms{' in every run' if args.repeat > 1 else ''}: {best}")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "results": results, "best": best}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
