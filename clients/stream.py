"""`python -m clients.stream AUDIO --server HOST:PORT --out X.npz`: stream a file through the service.

Saves the same arrays as `python -m train.encode` (m1 m2 m3 ar, kl_m1 kl_m2 kl_m3) plus the OOD
results (see clients.collector for every name), and prints an OOD timeline summary. The file is
converted to mono at the served model's sample rate (from the Info RPC).

The .npz is written while the frames arrive (clients.npz_stream), so memory stays small for long
files; --levels and --dtype float16 make it smaller (it says the expected size first). If the
server ends the stream with an error, the frames received before it are still saved, the error is
printed and the exit status is 1.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import grpc
import numpy as np

from clients.audio import AudioFileError, read_audio, resample, truncation
from clients.collector import TIMELINE_LEVEL, FrameCollector, flagged_stretches
from clients.connection import ClientError, add_connection_args, connect, describe_rpc_error
from clients.npz_stream import NpzStream
from clients.requests import file_requests
from clients.retry import add_retry_args, policy_from_args, with_retry
from clients.served_model import ServedModel, fetch
from clients.view import ood_timeline
from protos.sim.v2 import sim_pb2 as pb


def stream_into(collector: FrameCollector, conn, audio: np.ndarray, sample_rate: int, *, chunk_samples: int = 1600,
                realtime: bool = False, levels=(), return_logvar: bool = False, encoding: int = pb.FLOAT32,
                progress=None) -> None:
    """Stream one waveform (at the served sample_rate) into collector. Raises grpc.RpcError when
    the server ends the call (the collector keeps what arrived before)."""
    requests = file_requests(audio, sample_rate, chunk_samples, realtime=realtime, levels=levels,
                             return_logvar=return_logvar, encoding=encoding)
    for resp in conn.stub.StreamEncode(requests, metadata=conn.metadata):
        collector.add(resp)
        if progress is not None:
            progress(collector)


def encode_file(conn, audio: np.ndarray, sample_rate: int, *, timeline_level: str = TIMELINE_LEVEL,
                **options) -> dict[str, np.ndarray]:
    """Stream one waveform; the collected arrays (in memory). Options as stream_into's."""
    collector = FrameCollector(timeline_level)
    stream_into(collector, conn, audio, sample_rate, **options)
    return collector.arrays()


def expected_bytes(served: ServedModel, n_samples: int, levels, return_logvar: bool, itemsize: int) -> int:
    """About how large the saved arrays of n_samples of audio will be."""
    total = 0
    for name in levels or served.levels:
        lv = served.levels[name]
        frames = n_samples // lv.hop_samples + 1
        per_frame = lv.dim * (2 if return_logvar and lv.has_logvar else 1) + 5 + (1 if lv.has_logvar else 0)
        total += frames * (per_frame * itemsize + 1)  # + the uint8 flag
    return total


def summary(name: str, collector: FrameCollector, n_samples: int, level: str, served: ServedModel,
            width: int = 100) -> str:
    arrays = collector.arrays()
    lines = [f"{name}: {n_samples / served.sample_rate:.2f} s; frames " +
             ", ".join(f"{lv} {collector.count(lv)}" for lv in served.levels if lv in collector.levels)]
    if f"ood_{level}" not in arrays:
        return "\n".join(lines)
    ood = arrays[f"ood_{level}"]
    frame_s = served.frame_seconds(level)
    n_flag = int(ood.sum())
    lines.append(f"OOD ({level}): {n_flag} of {ood.size} frames flagged ({100.0 * n_flag / max(ood.size, 1):.1f} %)")
    stretches = flagged_stretches(ood, frame_s)
    if stretches:
        shown = ", ".join(f"{a:.2f}-{b:.2f} s" for a, b in stretches[:12])
        more = f" and {len(stretches) - 12} more" if len(stretches) > 12 else ""
        lines.append(f"flagged stretches: {shown}{more}")
    per_char = max(1, int(np.ceil(ood.size / width)))
    lines.append(f"timeline ({per_char * frame_s * 1000:.0f} ms per char, '!' flagged, '#' mostly flagged):")
    lines.append("  " + ood_timeline(ood, per_char))
    return "\n".join(lines)


def progress_bar(total: int):
    """A tqdm bar on stderr counting top-level frames, or a context of None where tqdm is not
    installed (it comes with the training extra, not with the clients)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return contextlib.nullcontext(None)
    return tqdm(total=total, unit="frame", desc="streaming", file=sys.stderr, disable=None, leave=False)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m clients.stream", description=__doc__.split("\n\n")[0])
    ap.add_argument("audio", help="audio file (wav, flac, ...); other rates and stereo are converted")
    ap.add_argument("--out", required=True, help="output .npz (written as the frames arrive)")
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                    help="precision of the saved latents and scores (default %(default)s; float16 halves the file)")
    ap.add_argument("--chunk-samples", type=int, default=1600, help="samples per message (default %(default)s)")
    ap.add_argument("--realtime", action="store_true", help="send at the pace of a live recording")
    ap.add_argument("--levels", default="", help="comma-separated levels to return (default: all of the model's)")
    ap.add_argument("--logvar", action="store_true", help="also return and save log-variances")
    ap.add_argument("--encoding", choices=("float32", "linear16"), default="float32",
                    help="wire format of the samples (default %(default)s; linear16 quantises to 16 bits)")
    ap.add_argument("--timeline-level", default=TIMELINE_LEVEL, help="level of p_value, ood and the summary "
                                                                     "(default %(default)s)")
    add_connection_args(ap)
    add_retry_args(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.chunk_samples < 1:
        print("error: --chunk-samples must be at least 1", file=sys.stderr)
        return 2
    try:
        retry = policy_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        audio, rate = read_audio(args.audio)
        problem = truncation(args.audio)
        if problem:
            print(f"warning: {problem}", file=sys.stderr)
        conn = connect(args)
    except (AudioFileError, ClientError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        served = fetch(conn)
    except ClientError as exc:
        conn.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    audio = resample(audio, rate, served.sample_rate)
    levels = [lv for lv in args.levels.split(",") if lv]
    try:
        for lv in levels:
            served.level(lv, "--levels")
    except ClientError as exc:
        conn.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    encoding = pb.LINEAR16 if args.encoding == "linear16" else pb.FLOAT32
    out = Path(args.out)
    size = expected_bytes(served, len(audio), levels, args.logvar, np.dtype(args.dtype).itemsize)
    print(f"streaming {len(audio) / served.sample_rate:.1f} s; writing about {size / 1e6:.1f} MB to {out} "
          f"({args.dtype}; --levels and --dtype float16 make it smaller)", file=sys.stderr)
    timeline_level = args.timeline_level if not levels or args.timeline_level in levels else next(
        lv for lv in reversed(list(served.levels)) if lv in levels)
    total = max(1, int(np.ceil(len(audio) / served.hop)))
    top = [lv for lv, spec in served.levels.items() if spec.hop_samples == served.hop]  # frames of a hop
    attempt: dict = {}  # the current attempt's sink and collector: a retry starts the file again
    error = None
    try:
        with progress_bar(total) as bar:
            def progress(col: FrameCollector) -> None:
                if bar is not None:
                    bar.update(max((col.count(lv) for lv in top), default=0) - bar.n)

            def one_attempt() -> None:
                if attempt:
                    attempt["sink"].discard()
                    if bar is not None:
                        bar.reset()
                attempt["sink"] = NpzStream(out, args.dtype)
                attempt["collector"] = FrameCollector(timeline_level, sink=attempt["sink"])
                stream_into(attempt["collector"], conn, audio, served.sample_rate, chunk_samples=args.chunk_samples,
                            realtime=args.realtime, levels=levels, return_logvar=args.logvar, encoding=encoding,
                            progress=progress)

            with_retry(one_attempt, retry, say=lambda msg: print(msg, file=sys.stderr, flush=True))
    except grpc.RpcError as exc:
        error = exc
    except BaseException:
        if attempt:
            attempt["sink"].discard()
        raise
    finally:
        conn.close()
    sink, collector = attempt["sink"], attempt["collector"]
    timeline = collector.arrays()
    sink.close({k: timeline[k] for k in ("p_value", "ood") if k in timeline})
    print(summary(args.audio, collector, len(audio), timeline_level, served))
    saved = f"{out} ({out.stat().st_size / 1e6:.1f} MB)"
    if error is not None:
        done = max((collector.count(lv) * served.levels[lv].hop_samples for lv in collector.levels), default=0)
        print(f"error: the server ended the stream: {describe_rpc_error(error)}\nthe stream was cut short: "
              f"saved the frames of the first {done / served.sample_rate:.2f} s of "
              f"{len(audio) / served.sample_rate:.2f} s to {saved}", file=sys.stderr)
        return 1
    print(f"saved {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
