"""Soak: a steady mixed load for --minutes, sampling the server every few seconds; prints the slopes.

    python bench/soak.py --minutes 30 [--streams 6] [--every 5] [--json OUT]

Serves the small random model of bench/load.py and keeps, in one asyncio client process:
--streams real-time streams opening and closing one after another (each a real synthesised
utterance looped to 1, 2 or 3 s, random chunk sizes; every frame checked against the offline encoder),
Info and Decode calls every second, and one misbehaving client every 2 s, in turn: a bad config
and NaN samples (INVALID_ARGUMENT), a stream that goes silent (OUT_OF_RANGE after --idle-timeout),
one that cancels half-way, one that stops reading its responses (RESOURCE_EXHAUSTED after
--unread-timeout). Every --every seconds it samples the server's RSS, open descriptors, mean tick
time and the outcome counts, and at the end fits a line to each after the first --warmup
seconds. Exit status 1 on any error that is not a misbehaving client's own expected one, or an
RSS slope above --max-rss-slope MiB per minute.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from load import looped, offline_refs, prepare, utterances  # noqa: E402

TOLERANCE = 1e-4


def slope_per_min(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over ts (seconds), per minute."""
    if len(ts) < 2:
        return float("nan")
    return float(np.polyfit(np.asarray(ts) / 60.0, np.asarray(ys, dtype=np.float64), 1)[0])


async def soak(address: str, refs: dict, seconds: float, n_streams: int, every: float, server, log) -> dict:
    import grpc

    from protos.sim.v2 import codec
    from protos.sim.v2 import sim_pb2 as pb
    from protos.sim.v2 import sim_pb2_grpc as pb_grpc

    channel = grpc.aio.insecure_channel(address)
    stub = pb_grpc.SimEncoderStub(channel)
    n_audio = sum(1 for k in refs if k.startswith("audio_"))
    levels = sorted({k.rsplit("_", 1)[0] for k in refs if not k.startswith("audio_")})
    end = time.monotonic() + seconds
    outcomes: Counter = Counter()  # (kind, status) -> count
    unexpected: list[str] = []
    frames = Counter()
    config = pb.StreamEncodeRequest(config=pb.StreamConfig(sample_rate=16000, encoding=pb.FLOAT32))

    def note(kind: str, code: str, expected: tuple[str, ...]) -> None:
        outcomes[f"{kind} {code}"] += 1
        if code not in expected:
            unexpected.append(f"{kind}: {code}")

    async def good(worker: int) -> None:
        rng = random.Random(worker)
        while time.monotonic() < end:
            i = rng.randrange(n_audio)

            async def requests(audio=refs[f"audio_{i}"]):
                yield config
                start, pos = time.monotonic(), 0
                while pos < len(audio):
                    nxt = min(len(audio), pos + rng.randint(1, 1600))
                    await asyncio.sleep(max(0.0, start + nxt / 16000 - time.monotonic()))
                    yield pb.StreamEncodeRequest(audio=codec.encode_samples(audio[pos:nxt], pb.FLOAT32))
                    pos = nxt

            got = {lv: [] for lv in levels}
            try:
                async for resp in stub.StreamEncode(requests()):
                    for msg in resp.frames:
                        f = codec.frames_of(msg)
                        got[f.level].append((f.first_index, np.array(f.mu)))
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            note("stream", code, ("OK",))
            if code == "OK":
                for lv in levels:
                    want, parts = refs[f"{lv}_{i}"], got[lv]
                    idx = np.concatenate([np.arange(a, a + len(m)) for a, m in parts]) if parts else np.zeros(0, int)
                    ok = np.array_equal(idx, np.arange(len(want))) and np.allclose(
                        np.concatenate([m for _, m in parts]), want, atol=TOLERANCE, rtol=0)
                    frames["checked"] += len(idx)
                    if not ok:
                        unexpected.append(f"stream: {lv} frames differ from offline")

    async def calls() -> None:
        dim = None
        while time.monotonic() < end:
            try:
                info = await stub.Info(pb.InfoRequest(), timeout=10)
                dim = dim or next(lv.dim for lv in info.levels if lv.name == "m3")
                note("info", "OK", ("OK",))
                await stub.Decode(pb.DecodeRequest(level="m3", num_frames=50,
                                                   latents=np.zeros((50, dim), np.float32).tobytes()), timeout=10)
                note("decode", "OK", ("OK",))
            except grpc.aio.AioRpcError as exc:
                note("info/decode", exc.code().name, ("OK",))
            await asyncio.sleep(1.0)

    async def misbehave() -> None:
        kinds = ["bad-config", "nan", "silent", "cancel", "no-read"]
        k = 0
        noise = (0.1 * np.random.default_rng(0).standard_normal(1600)).astype(np.float32)
        while time.monotonic() < end - 5:
            kind = kinds[k % len(kinds)]
            k += 1
            try:
                if kind == "bad-config":
                    bad = pb.StreamEncodeRequest(config=pb.StreamConfig(sample_rate=8000, encoding=pb.FLOAT32))
                    async for _ in stub.StreamEncode(iter([bad])):
                        pass
                elif kind == "nan":
                    nan = np.full(160, np.nan, np.float32)
                    async for _ in stub.StreamEncode(iter([config, pb.StreamEncodeRequest(
                            audio=codec.encode_samples(nan, pb.FLOAT32))])):
                        pass
                elif kind == "silent":
                    async def silent():
                        yield config
                        yield pb.StreamEncodeRequest(audio=codec.encode_samples(noise, pb.FLOAT32))
                        await asyncio.sleep(60)

                    async for _ in stub.StreamEncode(silent()):
                        pass
                elif kind == "cancel":
                    call = stub.StreamEncode()
                    await call.write(config)
                    for _ in range(5):
                        await call.write(pb.StreamEncodeRequest(audio=codec.encode_samples(noise, pb.FLOAT32)))
                    await call.read()
                    call.cancel()
                    note(kind, "CANCELLED", ("CANCELLED",))
                    await asyncio.sleep(2.0)
                    continue
                else:  # no-read: write audio, never read; after the unread limit, read what is left
                    call = stub.StreamEncode()

                    async def flood(call=call):
                        try:
                            await call.write(config)
                            while True:
                                await call.write(pb.StreamEncodeRequest(audio=codec.encode_samples(noise, pb.FLOAT32)))
                        except Exception:  # the call ended
                            return

                    ended = server.metric("sim_streams_total", outcome="resource_exhausted")
                    writer = asyncio.ensure_future(flood())
                    give_up = time.monotonic() + 120.0  # windows fill, the server stops reading, --unread-timeout
                    while server.metric("sim_streams_total", outcome="resource_exhausted") == ended:
                        if time.monotonic() > give_up:
                            break
                        await asyncio.sleep(0.5)

                    async def drain(call=call):
                        async for _ in call:
                            pass

                    try:
                        await asyncio.wait_for(drain(), 30.0)
                    except asyncio.TimeoutError:
                        note(kind, "HANG", ())
                        call.cancel()
                        continue
                    finally:
                        writer.cancel()
                note(kind, "OK", ())
            except grpc.aio.AioRpcError as exc:
                expected = {"bad-config": ("INVALID_ARGUMENT",), "nan": ("INVALID_ARGUMENT",),
                            "silent": ("OUT_OF_RANGE",), "no-read": ("RESOURCE_EXHAUSTED",)}[kind]
                note(kind, exc.code().name, expected)
            await asyncio.sleep(2.0)

    samples = []
    t0 = time.monotonic()

    async def sample() -> None:
        last_sum = last_cnt = 0.0
        while time.monotonic() < end:
            tick_sum, tick_cnt = (server.metric("sim_tick_duration_seconds_sum"),
                                  server.metric("sim_tick_duration_seconds_count"))
            tick_ms = 1000.0 * (tick_sum - last_sum) / (tick_cnt - last_cnt) if tick_cnt > last_cnt else float("nan")
            last_sum, last_cnt = tick_sum, tick_cnt
            s = {"t": round(time.monotonic() - t0, 1), "rss_mib": server.rss_bytes() / 2**20, "fds": server.open_fds(),
                 "tick_ms": tick_ms, "active": server.metric("sim_active_streams"),
                 "streams": sum(v for k, v in outcomes.items() if k.startswith("stream ")),
                 "unexpected": len(unexpected)}
            samples.append(s)
            log(f"{s['t']:7.1f} s  RSS {s['rss_mib']:7.1f} MiB  fds {s['fds']:4d}  tick {s['tick_ms']:6.2f} ms  "
                f"open {s['active']:3.0f}  streams done {s['streams']:5d}  unexpected errors {s['unexpected']}")
            await asyncio.sleep(every)

    await asyncio.gather(*(good(w) for w in range(n_streams)), calls(), misbehave(), sample())
    await channel.close()
    return {"samples": samples, "outcomes": dict(outcomes), "unexpected": unexpected,
            "frames_checked": frames["checked"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="how long (default %(default)s)")
    ap.add_argument("--streams", type=int, default=6, help="well-behaved streams at a time (default %(default)s)")
    ap.add_argument("--every", type=float, default=5.0, help="seconds between samples (default %(default)s)")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds left out of the slopes (default: a fifth of the run, at most 120)")
    ap.add_argument("--max-rss-slope", type=float, default=1.0,
                    help="fail above this RSS slope, MiB per minute (default %(default)s)")
    ap.add_argument("--model", help="exported model directory (with --checkpoint; default: small random model)")
    ap.add_argument("--checkpoint", help="the checkpoint --model was exported from (for the offline frames)")
    ap.add_argument("--corpus", help="corpus whose utterances the streams send (default: the bench corpus)")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "load_bench"))
    ap.add_argument("--json", help="also write the samples and results here")
    args = ap.parse_args(argv)

    from serve.launch import ServerProcess

    cache = Path(args.cache)
    model_dir, ckpt, corpus = prepare(cache, args.model, args.checkpoint, args.corpus)
    audios = [looped(u, seconds * 16000) for u in utterances(corpus, 6) for seconds in (1, 2, 3)]
    refs_path = cache / "soak_refs.npz"
    offline_refs(ckpt, audios, refs_path)
    refs = dict(np.load(refs_path))
    duration = args.minutes * 60.0
    warmup = args.warmup if args.warmup is not None else min(120.0, duration / 5)
    server = ServerProcess(model_dir, "--idle-timeout", "2", "--unread-timeout", "3", "--log-level", "warning",
                           log_dir=cache).start(timeout=300)
    print(f"# soak, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, {args.minutes:g} min, "
          f"{args.streams} streams at a time + Info/Decode + misbehaving clients", flush=True)
    try:
        res = asyncio.run(soak(server.address, refs, duration, args.streams, args.every, server,
                               lambda line: print(line, flush=True)))
    finally:
        server.stop(timeout=60)
    kept = [s for s in res["samples"] if s["t"] >= warmup]
    ts = [s["t"] for s in kept]
    slopes = {"rss_mib_per_min": slope_per_min(ts, [s["rss_mib"] for s in kept]),
              "fds_per_min": slope_per_min(ts, [s["fds"] for s in kept]),
              "tick_ms_per_min": slope_per_min(*zip(*[(s["t"], s["tick_ms"]) for s in kept
                                                      if np.isfinite(s["tick_ms"])]) or ([], []))}
    res.update(slopes=slopes, warmup_s=warmup, minutes=args.minutes, max_rss_slope=args.max_rss_slope)
    res["pass"] = not res["unexpected"] and slopes["rss_mib_per_min"] <= args.max_rss_slope
    print(f"\nslopes after {warmup:g} s: RSS {slopes['rss_mib_per_min']:+.3f} MiB/min, fds {slopes['fds_per_min']:+.3f}"
          f"/min, tick {slopes['tick_ms_per_min']:+.4f} ms/min")
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(res["outcomes"].items())))
    print(f"frames checked against offline: {res['frames_checked']}; unexpected errors: {len(res['unexpected'])}"
          + (f" ({'; '.join(sorted(set(res['unexpected'])))})" if res["unexpected"] else ""))
    print("PASS" if res["pass"] else f"FAIL (RSS slope bound {args.max_rss_slope:g} MiB/min)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if res["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
