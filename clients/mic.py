"""`python -m clients.mic --server HOST:PORT`: live microphone -> service, with a live terminal view.

Records 16 kHz mono with sounddevice (PortAudio), sends every block as it arrives and shows the
input level, a scrolling sparkline of the OOD score the flags are decided on (the per-frame score's
mean over the model's window, a few hundred ms) and the flagged stretches. Ctrl-C
(or --duration) stops: the stream is half-closed, the last frames arrive, and --save PREFIX
writes PREFIX.wav (exactly the audio sent) and PREFIX.npz (arrays as clients.stream saves).
"""
from __future__ import annotations

import argparse
import math
import queue
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from clients.collector import TIMELINE_LEVEL, FrameCollector, flagged_stretches
from clients.connection import ClientError, add_connection_args, connect, describe_rpc_error
from clients.requests import audio_request, config_request
from clients.served_model import fetch
from clients.view import dbfs, level_meter, sparkline
from protos.sim.v2 import sim_pb2 as pb


def import_sounddevice():
    """sounddevice, imported only by the microphone client (it needs the PortAudio library)."""
    try:
        import sounddevice
    except (ImportError, OSError) as exc:
        raise ClientError(f"the microphone needs sounddevice and the PortAudio library ({exc}); "
                          "install libportaudio2 (Debian/Ubuntu) or portaudio (Homebrew)") from None
    return sounddevice


def list_devices() -> str:
    sd = import_sounddevice()
    lines = []
    for i, dev in enumerate(sd.query_devices()):
        if dev["max_input_channels"] > 0:
            mark = "*" if i == sd.default.device[0] else " "
            lines.append(f"{mark} {i:3d}  {dev['name']}  ({dev['max_input_channels']} in, "
                         f"default {dev['default_samplerate']:.0f} Hz)")
    return "\n".join(lines) if lines else "no input devices found"


def resolve_device(spec: str | None):
    """--device: an index, a name substring, or None for the default input."""
    if spec is None:
        return None
    if spec.isdigit():
        return int(spec)
    sd = import_sounddevice()
    matches = [i for i, d in enumerate(sd.query_devices()) if d["max_input_channels"] > 0 and spec.lower() in
               d["name"].lower()]
    if not matches:
        raise ClientError(f"--device {spec!r}: no input device has that in its name (see --list-devices)")
    return matches[0]


DURATION_GRACE_S = 5.0  # with --duration, stop anyway this long after the duration if the device lags


class MicSession:
    """Microphone capture, the gRPC stream and the state the view shows. Threads: PortAudio's
    callback (capture), gRPC's request thread (send), one receive thread; the caller renders."""

    def __init__(self, conn, sample_rate: int, device=None, block_samples: int = 160, levels=(),
                 return_logvar: bool = False, view_level: str = TIMELINE_LEVEL, on_response=None):
        self.conn = conn
        self.sample_rate = sample_rate  # the served model's: the microphone records at it
        self.on_response = on_response  # called with each StreamEncodeResponse (receive thread)
        self.device = device
        self.block = block_samples
        self.levels = list(levels)
        self.return_logvar = return_logvar
        self.view_level = view_level
        self.collector = FrameCollector(view_level)
        self._audio_q: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self.recorded: list[np.ndarray] = []  # exactly what was sent
        self.samples_sent = 0
        self.max_samples: int | None = None  # --duration: send exactly this many samples, then half-close
        self.last_db = -math.inf
        self.overflows = 0
        self.error: grpc.RpcError | None = None
        self.finished = threading.Event()
        self.lock = threading.Lock()

    # PortAudio thread
    def _callback(self, indata, frames, time_info, status) -> None:
        if status.input_overflow:
            self.overflows += 1
        self._audio_q.put(indata[:, 0].copy())

    # gRPC request thread
    def _requests(self):
        yield config_request(self.sample_rate, self.levels, self.return_logvar, pb.FLOAT32)
        while True:
            try:
                block = self._audio_q.get(timeout=0.05)
            except queue.Empty:
                if self._stop.is_set():
                    return  # half-close: the server flushes the tail
                continue
            if self.max_samples is not None:
                block = block[:max(0, self.max_samples - self.samples_sent)]
                if block.size == 0:
                    self._stop.set()
                    return
            self.recorded.append(block)
            self.samples_sent += block.shape[0]
            self.last_db = dbfs(block)
            yield audio_request(block, pb.FLOAT32)

    def _receive(self) -> None:
        try:
            for resp in self.conn.stub.StreamEncode(self._requests(), metadata=self.conn.metadata):
                with self.lock:
                    self.collector.add(resp)
                if self.on_response is not None:
                    self.on_response(resp)
        except grpc.RpcError as exc:
            self.error = exc
            self._stop.set()
        finally:
            self.finished.set()

    def stop(self) -> None:
        """Stop recording (safe from a signal handler); run() returns once the last frames arrived."""
        self._stop.set()

    def run(self, on_start=None, duration: float | None = None, render=None, render_every: float = 0.1) -> None:
        sd = import_sounddevice()
        receiver = threading.Thread(target=self._receive, name="mic-receive", daemon=True)
        try:
            stream = sd.InputStream(samplerate=self.sample_rate, channels=1, dtype="float32", blocksize=self.block,
                                    device=self.device, callback=self._callback)
        except Exception as exc:  # PortAudioError and ValueError for bad devices/rates
            raise ClientError(f"cannot open the microphone: {exc}") from None
        receiver.start()
        # --duration counts samples sent, not wall time (the device starts late and delivers in blocks);
        # the wall-clock end is only a safety net for a device that delivers nothing
        t_end = None if duration is None else time.monotonic() + duration + DURATION_GRACE_S
        if duration is not None:
            self.max_samples = int(round(duration * self.sample_rate))
        try:
            with stream:
                if on_start is not None:
                    on_start(stream)
                while not self._stop.is_set() and (t_end is None or time.monotonic() < t_end) and not (
                        self.max_samples is not None and self.samples_sent >= self.max_samples):
                    time.sleep(render_every)
                    if render is not None:
                        render(self)
        finally:
            self._stop.set()  # the request generator sends what is queued, then half-closes
        self.finished.wait()
        if render is not None:
            render(self)

    def arrays(self) -> dict[str, np.ndarray]:
        with self.lock:
            arrays = self.collector.arrays()
        arrays["audio"] = self.audio()
        return arrays

    def audio(self) -> np.ndarray:
        return np.concatenate(self.recorded) if self.recorded else np.zeros(0, np.float32)

    def scores(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The window scores (the flags' basis) and flags of the view level's last n frames."""
        with self.lock:
            return self.collector.recent(self.view_level, n)

    def flags(self, level: str) -> np.ndarray:
        """The OOD flags of every frame of a level so far."""
        with self.lock:
            flags = self.collector.column(level, "ood")
        return np.zeros(0, bool) if flags is None else flags


class LiveView:
    """Redraws a few lines in place on a terminal; prints a line per second elsewhere."""

    def __init__(self, frame_seconds: float, out=sys.stdout, level: str = TIMELINE_LEVEL,
                 threshold: float | None = None, window_seconds: float | None = None):
        self.out = out
        self.tty = out.isatty()
        self.level = level
        self.threshold = threshold  # the level's OOD threshold: the sparkline's midpoint
        self.window_s = window_seconds  # the window the shown score averages over
        self.frame_s = frame_seconds  # of the level's frames
        self._drawn = 0
        self._last_plain = 0.0

    def __call__(self, s: MicSession) -> None:
        width = max(20, min(shutil.get_terminal_size((100, 20)).columns - 12, 200))
        scores, ood = s.scores(width)
        all_ood = s.flags(self.level)
        n = all_ood.size
        t = s.samples_sent / s.sample_rate
        stretches = flagged_stretches(all_ood, self.frame_s, min_gap=5)
        head = (f"{t:7.1f} s  input {level_meter(s.last_db)}  {n} frames ({self.level}), "
                f"{int(all_ood.sum())} flagged")
        if not self.tty:
            now = time.monotonic()
            if now - self._last_plain >= 1.0:
                self._last_plain = now
                print(head, file=self.out, flush=True)
            return
        if self.threshold is not None and self.threshold > 0:
            hi = 2.0 * self.threshold  # flagged frames fill the upper half
        else:
            hi = max(float(np.max(scores)) if scores.size else 1.0, 1e-9)
        spark = sparkline(scores, 0.0, hi)
        marks = "".join("^" if f else " " for f in ood)
        recent = ", ".join(f"{a:.2f}-{b:.2f} s" for a, b in stretches[-4:]) or "none"
        scale = f"(0 .. {hi:.3g}, threshold {self.threshold:.3g})" if self.threshold else ""
        label = f"mean over {self.window_s:.2g} s" if self.window_s else "per frame"
        lines = [head, f"OOD score  {spark}", f"flagged    {marks}",
                 f"stretches  {recent}   score {label} {scale}   Ctrl-C to stop"]
        if self._drawn:
            self.out.write(f"\x1b[{self._drawn}F")
        for line in lines:
            self.out.write("\x1b[2K" + line[:width + 12] + "\n")
        self.out.flush()
        self._drawn = len(lines)


def save(prefix: str, session: MicSession) -> list[Path]:
    import soundfile as sf

    base = Path(prefix)
    base.parent.mkdir(parents=True, exist_ok=True)
    wav, npz = base.with_name(base.name + ".wav"), base.with_name(base.name + ".npz")
    sf.write(str(wav), session.audio(), session.sample_rate, subtype="FLOAT")
    np.savez(npz, **session.arrays())
    return [wav, npz]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m clients.mic", description=__doc__.split("\n\n")[0],
                                 epilog="Ctrl-C stops recording; the last frames still arrive before exit.")
    ap.add_argument("--list-devices", action="store_true", help="list input devices and exit")
    ap.add_argument("--device", help="input device: index or part of its name (default: the system default)")
    ap.add_argument("--block-ms", type=float, default=10.0, help="capture block and message size in ms "
                                                                 "(default %(default)s)")
    ap.add_argument("--levels", default="", help="comma-separated levels to return (default: all)")
    ap.add_argument("--logvar", action="store_true", help="also return (and save) log-variances")
    ap.add_argument("--view-level", default=TIMELINE_LEVEL, help="level whose OOD score is shown (default %(default)s)")
    ap.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    ap.add_argument("--save", metavar="PREFIX", help="write PREFIX.wav (the audio sent) and PREFIX.npz (latents)")
    add_connection_args(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.list_devices:
            print(list_devices())
            return 0
        if args.block_ms <= 0 or (args.duration is not None and args.duration <= 0):
            raise ClientError("--block-ms and --duration must be positive")
        device = resolve_device(args.device)
        conn = connect(args)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        served = fetch(conn)
        view_level = served.level(args.view_level, "--view-level")
    except ClientError as exc:
        conn.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rate = served.sample_rate
    session = MicSession(conn, rate, device=device, block_samples=max(1, int(round(args.block_ms * rate / 1000))),
                         levels=[lv for lv in args.levels.split(",") if lv], return_logvar=args.logvar,
                         view_level=args.view_level)
    view = LiveView(served.frame_seconds(args.view_level), level=args.view_level, threshold=view_level.threshold,
                    window_seconds=served.window_seconds(args.view_level))

    def started(stream) -> None:
        print(f"recording from {stream.device if device is not None else 'the default input'} at "
              f"{rate} Hz, sending to {args.server}; Ctrl-C to stop", flush=True)

    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda *_: session.stop())
    try:
        session.run(on_start=started, duration=args.duration, render=view)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGINT, previous)
        conn.close()
    if session.error is not None:
        print(f"error: the server ended the stream: {describe_rpc_error(session.error)}", file=sys.stderr)
    if session.overflows:
        print(f"warning: {session.overflows} input overflows (audio was lost)", file=sys.stderr)
    if args.save:
        for path in save(args.save, session):
            print(f"saved {path}")
    arrays = session.arrays()
    level = args.view_level
    if f"ood_{level}" in arrays:
        ood = arrays[f"ood_{level}"]
        print(f"{session.samples_sent / rate:.1f} s sent; {ood.size} frames ({level}), {int(ood.sum())} flagged")
    return 1 if session.error is not None else 0


if __name__ == "__main__":
    sys.exit(main())
