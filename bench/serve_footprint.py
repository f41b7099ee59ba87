"""What one server replica costs: resident memory idle and with N live streams, and server CPU
per second of streamed audio; the figures behind deploy/k8s/deployment.yaml's resource requests.

    python bench/serve_footprint.py [--model DIR] [--streams 1 6] [--seconds 8]

Default model: the full-size random SIM encoder with an int8 step that bench/serve_capacity.py
exports into its cache. Each run starts a fresh server (python -m serve, serve.launch), measures its
RSS after one warm-up stream, then N streams of real synthesised speech sent at real time in 100 ms
messages (one client thread and connection each), sampling RSS every 0.2 s; reports idle RSS, peak
RSS, their difference per stream, and the server's CPU seconds per second of one stream's audio.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import grpc  # noqa: E402

from clients.requests import file_requests  # noqa: E402
from protos.sim.v2 import sim_pb2_grpc as pb_grpc  # noqa: E402
from serve.launch import ServerProcess  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def stream(address: str, audio, realtime: bool, errors: list) -> None:
    try:
        with grpc.insecure_channel(address) as ch:
            for _ in pb_grpc.SimEncoderStub(ch).StreamEncode(file_requests(audio, 16000, 1600, realtime=realtime)):
                pass
    except grpc.RpcError as exc:
        errors.append(f"{exc.code().name}: {exc.details()}")


def measure(model: Path, n: int, audio, server_args: list[str]) -> dict:
    srv = ServerProcess(model, *server_args).start()
    try:
        errors: list[str] = []
        stream(srv.address, audio[:16000], False, errors)  # warm-up: sessions, buffers, first allocations
        time.sleep(1.0)
        idle = rss_mib(srv.proc.pid)
        cpu0 = srv.cpu_seconds()
        threads = [threading.Thread(target=stream, args=(srv.address, audio, True, errors)) for _ in range(n)]
        for t in threads:
            t.start()
        peak = idle
        while any(t.is_alive() for t in threads):
            peak = max(peak, rss_mib(srv.proc.pid))
            time.sleep(0.2)
        cpu = srv.cpu_seconds() - cpu0
        time.sleep(1.0)
        after = rss_mib(srv.proc.pid)
    finally:
        srv.close()
    seconds = len(audio) / 16000
    return dict(streams=n, idle=idle, peak=peak, after=after, per_stream=(peak - idle) / n,
                cpu_per_stream_second=cpu / (n * seconds), errors=errors)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="exported model directory (default: serve_capacity's full-size int8 model)")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "serve_bench"), help="serve_capacity's cache")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 6], help="stream counts (default %(default)s)")
    ap.add_argument("--seconds", type=float, default=8.0, help="audio per stream (default %(default)s)")
    ap.add_argument("--server-args", default="", help="more options for python -m serve")
    args = ap.parse_args()
    from serve_capacity import prepare_model, speech_audio

    cache = Path(args.cache)
    model = Path(args.model) if args.model else prepare_model(cache, int8=True)
    audio = speech_audio(cache, args.seconds, 16000)
    print("streams  idle MiB  peak MiB  after MiB  MiB/stream  server CPU-s per stream-s  errors", flush=True)
    for n in args.streams:
        r = measure(model, n, audio, args.server_args.split())
        print(f"{n:7d}  {r['idle']:8.0f}  {r['peak']:8.0f}  {r['after']:9.0f}  {r['per_stream']:10.1f}  "
              f"{r['cpu_per_stream_second']:25.3f}  {len(r['errors'])} {r['errors'][:2]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
