"""Load: many concurrent streams from several client processes, every frame accounted for.

    python bench/load.py [--slow 1000] [--fast 8] [--procs 4] [--hold 60] [--over 20] [--json OUT]

Starts `python -m serve` (loopback, --max-streams = slow + fast) on a small random SIM model
exported into --cache (or --model/--checkpoint), and runs --slow + --fast streams from --procs
client processes at once. Every stream sends a real synthesised utterance from the bench corpus
(looped to length) in random chunk sizes: a slow stream at --slow-rate samples per second (160: one
10 ms hop per second; these test connection and state handling), a fast one at real time. For every
stream and level the client checks that frame indices arrive exactly once and in order, that the
count equals the offline encoder's (python -m train.encode on the same audio) and that every frame
equals it (atol 1e-4). Once all streams are open, --over more streams must each get
RESOURCE_EXHAUSTED within 5 s. Reports streams held at once, frames lost / duplicated / wrong,
status codes, frame latency p50/p99 (from sending the chunk that completes a top-level frame to
receiving it), and the server's RSS and open file descriptors before, at peak and after the
measured wave (--waves: by default one identical wave runs first, so "before" is the warm level).
Exit status 1 if anything was lost, duplicated, wrong, refused below the limit, or RSS after is
more than 10 % above warm.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import platform
import random
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STREAMS_PER_CHANNEL = 50
TOLERANCE = 1e-4
HOP = 160


def prepare(cache: Path, model: str | None = None, checkpoint: str | None = None,
            corpus: str | None = None) -> tuple[Path, Path, Path]:
    """(model dir, checkpoint, corpus): those given, else a small random SIM model (32 channels,
    GRU 16) exported once into cache, and the bench corpus."""
    sys.path.insert(0, str(ROOT / "bench"))
    from serve_capacity import bench_corpus

    from export.random_model import checkpoint_of, export_random_model
    from train.model import ModelSpec

    corpus_dir = Path(corpus) if corpus else bench_corpus(cache)
    if model:
        if not checkpoint:
            raise SystemExit("--model needs --checkpoint (the offline frames come from it)")
        return Path(model), Path(checkpoint), corpus_dir
    out = export_random_model(cache / "small", corpus_dir, ModelSpec("sim", 32, 16), decoders=("m3",), seed=1)
    return out, checkpoint_of(out), corpus_dir


def utterances(corpus: Path, n: int) -> list[np.ndarray]:
    import soundfile as sf

    from train.corpus import load_corpus

    return [sf.read(u.path, dtype="float32")[0] for u in load_corpus(corpus)[:n]]


def looped(audio: np.ndarray, samples: int) -> np.ndarray:
    return np.tile(audio, math.ceil(samples / len(audio)))[:samples]


def offline_refs(checkpoint: Path, audios: list[np.ndarray], path: Path) -> None:
    """Offline encodings of each distinct stream audio, saved for the client processes."""
    from train.checkpoint import load_encoder
    from train.encode import encode_array

    encoder, _ = load_encoder(checkpoint)
    arrays = {}
    for i, a in enumerate(audios):
        arrays[f"audio_{i}"] = a
        for k, v in encode_array(encoder, a).items():
            if not k.startswith("kl_"):
                arrays[f"{k}_{i}"] = v
    np.savez(path, **arrays)


# --- client processes --------------------------------------------------------------------------
def client_process(address: str, refs_path: str, specs: list[dict], lookahead: int, queue) -> None:
    try:
        queue.put(asyncio.run(_client(address, refs_path, specs, lookahead)))
    except BaseException as exc:  # tell the parent instead of leaving it waiting
        queue.put({"fatal": f"{type(exc).__name__}: {exc}"})


async def _client(address: str, refs_path: str, specs: list[dict], lookahead: int) -> dict:
    import grpc

    from protos.sim.v2 import codec
    from protos.sim.v2 import sim_pb2 as pb
    from protos.sim.v2 import sim_pb2_grpc as pb_grpc

    refs = dict(np.load(refs_path))
    levels = sorted({k.rsplit("_", 1)[0] for k in refs if not k.startswith("audio_")})
    options = [("grpc.use_local_subchannel_pool", 1)]  # each channel its own TCP connection
    channels = [grpc.aio.insecure_channel(address, options=options)
                for _ in range(math.ceil(len(specs) / STREAMS_PER_CHANNEL))]
    stubs = [pb_grpc.SimEncoderStub(c) for c in channels]
    stats = Counter()
    codes: Counter = Counter()
    details: dict[str, str] = {}  # the first message of each error code
    latencies = {"slow": [], "fast": []}
    t0 = time.monotonic()

    async def one(k: int, spec: dict) -> None:
        audio = refs[f"audio_{spec['audio']}"]
        rng = random.Random(spec["seed"])
        rate = spec["rate"]  # samples per second of wall time
        cuts, pos = [], 0
        while pos < len(audio):
            pos = min(len(audio), pos + rng.randint(1, 2 * spec["chunk"]))
            cuts.append(pos)
        cuts = np.asarray(cuts)
        sent_at = np.zeros(len(cuts))

        async def requests():
            yield pb.StreamEncodeRequest(config=pb.StreamConfig(sample_rate=16000, encoding=pb.FLOAT32))
            start, prev = time.monotonic(), 0
            for j, end in enumerate(cuts.tolist()):
                delay = start + end / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent_at[j] = time.monotonic()
                yield pb.StreamEncodeRequest(audio=codec.encode_samples(audio[prev:end], pb.FLOAT32))
                prev = end

        await asyncio.sleep(spec["start"] - (time.monotonic() - t0))
        got = {lv: [] for lv in levels}
        nxt = {lv: 0 for lv in levels}
        try:
            async for resp in stubs[k % len(stubs)].StreamEncode(requests()):
                now = time.monotonic()
                for msg in resp.frames:
                    f = codec.frames_of(msg)
                    if f.first_index < nxt[f.level]:
                        stats["duplicated"] += nxt[f.level] - f.first_index
                    elif f.first_index > nxt[f.level]:
                        stats["gaps"] += f.first_index - nxt[f.level]
                    nxt[f.level] = max(nxt[f.level], f.first_index + f.count)
                    got[f.level].append((f.first_index, np.array(f.mu)))
                    if f.level == "m3":  # frame i needs samples up to HOP (i + 1) + lookahead - 1
                        last = HOP * (np.arange(f.first_index, f.first_index + f.count) + 1) + lookahead - 1
                        j = np.searchsorted(cuts, last, side="right")
                        latencies[spec["kind"]].append(now - sent_at[j[j < len(cuts)]])
            codes["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            codes[exc.code().name] += 1
            details.setdefault(exc.code().name, exc.details())
        for lv in levels:  # every frame against the offline encoder, at once per level
            want = refs[f"{lv}_{spec['audio']}"]
            if not got[lv]:
                stats["lost"] += len(want)
                continue
            idx = np.concatenate([np.arange(first, first + len(mu)) for first, mu in got[lv]])
            mu = np.concatenate([mu for _, mu in got[lv]])
            inside = idx < len(want)
            stats["extra"] += int((~inside).sum())
            idx, mu = idx[inside], mu[inside]
            seen = np.zeros(len(want), bool)
            seen[idx] = True
            stats["wrong"] += int((np.abs(mu - want[idx]).max(axis=1) > TOLERANCE).sum())
            stats["lost"] += int((~seen).sum())
            stats["frames"] += int(seen.sum())
        await asyncio.sleep(0)

    await asyncio.gather(*(one(k, s) for k, s in enumerate(specs)))
    for c in channels:
        await c.close()
    return {"stats": dict(stats), "codes": dict(codes), "details": details,
            "latencies": {k: [float(x) for part in v for x in part] for k, v in latencies.items()}}


# --- the parent --------------------------------------------------------------------------------
class Sampler(threading.Thread):
    """RSS, descriptors and open streams of the server, once a second."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.samples, self.stop = server, [], threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                self.samples.append((time.monotonic(), self.server.rss_bytes(), self.server.open_fds(),
                                     self.server.metric("sim_active_streams")))
            except (OSError, ValueError):
                pass


def probe_over_limit(address: str, n: int) -> Counter:
    import grpc

    from protos.sim.v2 import sim_pb2 as pb
    from protos.sim.v2 import sim_pb2_grpc as pb_grpc

    codes: Counter = Counter()
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.SimEncoderStub(ch)
        for _ in range(n):
            req = pb.StreamEncodeRequest(config=pb.StreamConfig(sample_rate=16000, encoding=pb.FLOAT32))
            try:
                for _ in stub.StreamEncode(iter([req]), timeout=5.0):
                    pass
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
    return codes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slow", type=int, default=1000, help="slow streams (default %(default)s)")
    ap.add_argument("--fast", type=int, default=8, help="real-time streams (default %(default)s)")
    ap.add_argument("--procs", type=int, default=4, help="client processes (default %(default)s)")
    ap.add_argument("--hold", type=float, default=60.0, help="seconds each stream lasts (default %(default)s)")
    ap.add_argument("--ramp", type=float, default=10.0, help="streams start spread over this many seconds")
    ap.add_argument("--slow-rate", type=float, default=160.0, help="samples per second a slow stream sends")
    ap.add_argument("--waves", type=int, default=2,
                    help="runs of all streams; the last is measured, RSS 'before' is after the ones before it "
                         "(the warm level: pools and allocator arenas grown to this load) (default %(default)s)")
    ap.add_argument("--over", type=int, default=20, help="streams opened above the limit at the peak")
    ap.add_argument("--utterances", type=int, default=10, help="distinct utterances (default %(default)s)")
    ap.add_argument("--model", help="exported model directory (with --checkpoint; default: small random model)")
    ap.add_argument("--checkpoint", help="the checkpoint --model was exported from (for the offline frames)")
    ap.add_argument("--corpus", help="corpus whose utterances the streams send (default: the bench corpus)")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "load_bench"))
    ap.add_argument("--server-args", default="", help="more options for python -m serve")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    import shlex

    from serve.launch import ServerProcess
    from serve.model_dir import ModelInfo

    cache = Path(args.cache)
    model_dir, ckpt, corpus = prepare(cache, args.model, args.checkpoint, args.corpus)
    info = ModelInfo(model_dir, verify=False)
    lookahead = int(info.manifest["geometry"]["lookahead"])
    utts = utterances(corpus, args.utterances)
    slow_len, fast_len = int(args.hold * args.slow_rate), int(args.hold * 16000)
    audios = [looped(u, slow_len) for u in utts] + [looped(u, fast_len) for u in utts]
    refs = cache / "load_refs.npz"
    print(f"offline encodings of {len(audios)} stream audios ...", file=sys.stderr, flush=True)
    offline_refs(ckpt, audios, refs)

    total = args.slow + args.fast
    rng = random.Random(0)
    specs = [{"kind": "slow", "audio": i % len(utts), "rate": args.slow_rate, "chunk": 160, "seed": i,
              "start": rng.uniform(0, args.ramp)} for i in range(args.slow)]
    specs += [{"kind": "fast", "audio": len(utts) + i % len(utts), "rate": 16000.0, "chunk": 800,
               "seed": 10**6 + i, "start": rng.uniform(0, args.ramp)} for i in range(args.fast)]
    rng.shuffle(specs)
    server = ServerProcess(model_dir, "--max-streams", str(total), "--log-level", "warning",
                           *shlex.split(args.server_args), log_dir=cache).start(timeout=300)
    sampler = Sampler(server)

    def wave(probe: bool) -> tuple[list[dict], float, Counter, float, tuple[int, int]]:
        """All streams once; (client results, streams open at once, over-limit codes, seconds, (RSS, fds)
        once they have ended and the server has been idle a few seconds)."""
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        t0 = time.monotonic()
        procs = [ctx.Process(target=client_process,
                             args=(server.address, str(refs), specs[i::args.procs], lookahead, q))
                 for i in range(args.procs)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + args.ramp + 120
        while server.metric("sim_active_streams") < total and time.monotonic() < deadline:
            if any(not p.is_alive() for p in procs):
                break
            time.sleep(0.5)
        held = server.metric("sim_active_streams")
        over = Counter()
        if probe:
            over = probe_over_limit(server.address, args.over) if held >= total else Counter({"not probed": args.over})
        results = [q.get(timeout=args.hold + args.ramp + 900) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        elapsed = time.monotonic() - t0
        wait_end = time.monotonic() + 60
        while server.metric("sim_active_streams") > 0 and time.monotonic() < wait_end:
            time.sleep(0.5)
        time.sleep(5)  # the server trims its heap after 2 s without streams
        return results, held, over, elapsed, (server.rss_bytes(), server.open_fds())

    try:
        cold = (server.rss_bytes(), server.open_fds())
        sampler.start()
        if args.waves > 1:  # the first wave grows the pools and arenas to their size for this load
            for w in range(args.waves - 1):
                print(f"warm-up wave {w + 1} ...", file=sys.stderr, flush=True)
                wave(probe=False)
        before = (server.rss_bytes(), server.open_fds())
        t_measured = time.monotonic()
        results, held_at, over, elapsed, after = wave(probe=True)
        page = server.metrics()
        server_outcomes = {line.split('"')[1]: float(line.split()[-1]) for line in page.splitlines()
                           if line.startswith("sim_streams_total{")}
    finally:
        sampler.stop.set()
        server.stop(timeout=60)
    fatal = [r["fatal"] for r in results if "fatal" in r]
    stats, codes, lat, details = Counter(), Counter(), {"slow": [], "fast": []}, {}
    for r in results:
        if "fatal" in r:
            continue
        stats.update(r["stats"])
        codes.update(r["codes"])
        details.update(r["details"])
        for k in lat:
            lat[k] += r["latencies"][k]
    measured = [x for x in sampler.samples if x[0] >= t_measured]
    peak_rss = max([x[1] for x in measured] + [before[0]])
    peak_fds = max([x[2] for x in measured] + [before[1]])
    peak_streams = max([x[3] for x in measured] + [held_at])

    def pct(v, q):
        return float(np.percentile(np.asarray(v) * 1000, q)) if v else float("nan")

    dims = info.manifest["dims"]
    summary = {
        "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "cpus": os.cpu_count(), "host": platform.node(),
        "model": f"{info.manifest['method']} {dims['channels']} ch / GRU {dims['hidden']}",
        "slow": args.slow, "fast": args.fast, "procs": args.procs, "hold_s": args.hold, "elapsed_s": round(elapsed, 1),
        "streams_held_at_once": int(peak_streams), "frames_checked": stats["frames"], "lost": stats["lost"],
        "duplicated": stats["duplicated"], "gaps": stats["gaps"], "wrong": stats["wrong"], "extra": stats["extra"],
        "codes": dict(codes), "error_details": details, "server_outcomes": server_outcomes,
        "over_limit": dict(over), "fatal": fatal,
        "latency_ms": {k: {"p50": pct(v, 50), "p99": pct(v, 99), "n": len(v)} for k, v in lat.items()},
        "waves": args.waves, "rss_mib": {"cold": cold[0] / 2**20, "before": before[0] / 2**20,
                                         "peak": peak_rss / 2**20, "after": after[0] / 2**20},
        "fds": {"before": before[1], "peak": peak_fds, "after": after[1]},
    }
    rss_ok = after[0] <= 1.10 * before[0]
    summary["pass"] = (not fatal and codes.get("OK", 0) == total and sum(codes.values()) == total
                       and not any(stats[k] for k in ("lost", "duplicated", "gaps", "wrong", "extra"))
                       and over.get("RESOURCE_EXHAUSTED", 0) == args.over and rss_ok)
    s = summary
    print(f"# load, {s['date']}, {s['cpus']} cores, model {s['model']}: {args.slow} slow "
          f"({args.slow_rate:g} samples/s) + {args.fast} real-time streams from {args.procs} processes, "
          f"{args.hold:g} s each")
    print(f"streams held at once: {s['streams_held_at_once']} (limit {total}); status codes: {s['codes']}; "
          f"{args.over} above the limit: {s['over_limit']}")
    print(f"frames checked against offline: {s['frames_checked']}; lost {s['lost']}, duplicated {s['duplicated']}, "
          f"out of order {s['gaps']}, wrong {s['wrong']}, extra {s['extra']}")
    for k, v in s["latency_ms"].items():
        print(f"frame latency, {k} streams: p50 {v['p50']:.1f} ms, p99 {v['p99']:.1f} ms ({v['n']} frames)")
    mib = s["rss_mib"]
    print(f"server RSS MiB cold {mib['cold']:.0f}; warm before/peak/after: {mib['before']:.0f} / {mib['peak']:.0f} / "
          f"{mib['after']:.0f} ({100 * (after[0] / before[0] - 1):+.1f} %); fds before/peak/after: "
          f"{before[1]} / {peak_fds} / {after[1]}")
    print(f"outcomes counted by the server (all waves, over-limit probes included): {server_outcomes}")
    for code, text in details.items():
        print(f"  {code}: {text}")
    if fatal:
        print("client process failures: " + "; ".join(fatal))
    print("PASS" if s["pass"] else "FAIL")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0 if s["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
