"""`python -m clients.monitor`: anomaly monitoring of encodings.

Streams one or more sources through the service (audio files, a directory where new files
arrive, the microphone), keeps a rolling out-of-distribution rate per source (the fraction of
flagged frames of one level over the last --window seconds) and writes JSON-lines events:

  {"event": "alert", "source", "level", "time" (s into the source), "rate", "frames", "score", "wall"}
      when the rolling rate reaches --alert-rate (once per crossing); "score" is the server's window
      score of that frame (the mean per-frame OOD score over the model's window, which the server's
      flag compares with the calibrated threshold; null from a server without windows)
  {"event": "clear", ...}       when it drops below again
  {"event": "end", "source", "seconds", "frames", "flagged", "max_rate", "alerts", "wall"}
  {"event": "error", "source", "message", "wall"}
  {"event": "retry", "source", "message", "wall"}   (--retry: the stream is opened again from the start)

Exports its own Prometheus counters with --metrics-port. With --once it processes the files
given (and those already in --watch) and exits: 0 no alert, 1 at least one alert, 3 a source
failed (and no alert), 2 a usage or connection error. Without --once it runs until Ctrl-C or SIGTERM,
then ends the microphone's stream with its end event and exits 0.
"""
from __future__ import annotations

import argparse
import collections
import json
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import grpc

from clients.audio import AudioFileError, load_audio
from clients.collector import TIMELINE_LEVEL
from clients.connection import ClientError, add_connection_args, connect, describe_rpc_error
from clients.requests import file_requests
from clients.retry import RetryPolicy, add_retry_args, policy_from_args, with_retry
from clients.served_model import ServedModel, fetch
from protos.sim.v2 import codec

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"}
EXIT_OK, EXIT_ALERT, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3


class RollingRate:
    """Fraction of flagged frames over the last `window` frames, with alert / clear crossings."""

    def __init__(self, window: int, alert_rate: float, min_frames: int | None = None):
        self.window = window
        self.alert_rate = alert_rate
        # judge a rate only over enough frames (a quarter window), also in sources shorter than the window
        self.min_frames = max(1, window // 4) if min_frames is None else min_frames
        self._flags: collections.deque = collections.deque(maxlen=window)
        self._sum = 0
        self.alerting = False
        self.max_rate = 0.0

    @property
    def frames(self) -> int:
        """Frames in the window now."""
        return len(self._flags)

    @property
    def rate(self) -> float:
        return self._sum / len(self._flags) if self._flags else 0.0

    def push(self, flagged: bool) -> str | None:
        """Add one frame; returns "alert" or "clear" when the rate crosses --alert-rate."""
        if len(self._flags) == self._flags.maxlen:
            self._sum -= self._flags[0]
        self._flags.append(bool(flagged))
        self._sum += bool(flagged)
        if len(self._flags) < self.min_frames:
            return None
        rate = self.rate
        self.max_rate = max(self.max_rate, rate)
        if not self.alerting and rate >= self.alert_rate:
            self.alerting = True
            return "alert"
        if self.alerting and rate < self.alert_rate:
            self.alerting = False
            return "clear"
        return None


class MonitorMetrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        r = self.registry
        self.frames = Counter("sim_monitor_frames", "Frames of the monitored level received", registry=r)
        self.flagged = Counter("sim_monitor_flagged_frames", "Frames flagged out-of-distribution", registry=r)
        self.alerts = Counter("sim_monitor_alerts", "Rolling OOD rate crossings above --alert-rate", registry=r)
        self.sources = Counter("sim_monitor_sources", "Sources finished, by outcome", ["outcome"], registry=r)
        self.active = Gauge("sim_monitor_active_sources", "Sources being streamed now", registry=r)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        from prometheus_client import start_http_server

        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_address[1]


class EventLog:
    def __init__(self, out):
        self.out = out
        self._lock = threading.Lock()

    def emit(self, event: str, **fields) -> None:
        record = {"event": event, **fields, "wall": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
        with self._lock:
            self.out.write(json.dumps(record) + "\n")
            self.out.flush()


class Monitor:
    def __init__(self, conn, served: ServedModel, events: EventLog, metrics: MonitorMetrics, level: str,
                 window_s: float, alert_rate: float, realtime: bool = False, chunk_samples: int = 1600,
                 retry: RetryPolicy | None = None):
        self.conn = conn
        self.sample_rate = served.sample_rate
        self.events = events
        self.metrics = metrics
        self.level = served.level(level).name
        self.frame_s = served.frame_seconds(level)
        self.window = max(1, int(round(window_s / self.frame_s)))
        self.alert_rate = alert_rate
        self.realtime = realtime
        self.chunk_samples = chunk_samples
        self.retry = retry or RetryPolicy()
        self.alerts = 0
        self.failures = 0
        self._lock = threading.Lock()

    def tracker(self, source: str):
        """A per-source frame handler: feed it responses; .finish() emits the end event."""
        return _Tracker(self, source)

    def run_file(self, path: Path) -> None:
        source = str(path)
        self.metrics.active.inc()
        try:
            audio = load_audio(path, self.sample_rate)

            def attempt():
                tracker = self.tracker(source)
                requests = file_requests(audio, self.sample_rate, self.chunk_samples, realtime=self.realtime,
                                         levels=[self.level])
                for resp in self.conn.stub.StreamEncode(requests, metadata=self.conn.metadata):
                    tracker.add(resp)
                return tracker

            tracker = with_retry(attempt, self.retry, lambda msg: self.events.emit("retry", source=source, message=msg))
            tracker.finish(len(audio) / self.sample_rate)
        except AudioFileError as exc:
            self.failed(source, str(exc))
        except grpc.RpcError as exc:
            self.failed(source, describe_rpc_error(exc))
        finally:
            self.metrics.active.dec()

    def count_alert(self) -> None:
        with self._lock:
            self.alerts += 1
        self.metrics.alerts.inc()

    def failed(self, source: str, message: str) -> None:
        with self._lock:
            self.failures += 1
        self.metrics.sources.labels("error").inc()
        self.events.emit("error", source=source, message=message)


class _Tracker:
    def __init__(self, monitor: Monitor, source: str):
        self.m = monitor
        self.source = source
        self.rolling = RollingRate(monitor.window, monitor.alert_rate)
        self.frames = 0
        self.flagged = 0
        self.alerts = 0

    def add(self, resp) -> None:
        m = self.m
        for msg in resp.frames:
            if msg.level != m.level:
                continue
            frames = codec.frames_of(msg)
            flagged = int(frames.ood.sum())
            self.frames += frames.count
            self.flagged += flagged
            m.metrics.frames.inc(frames.count)
            if flagged:
                m.metrics.flagged.inc(flagged)
            for k, (index, ood) in enumerate(zip(frames.index.tolist(), frames.ood.tolist())):
                crossing = self.rolling.push(ood)
                if crossing is None:
                    continue
                if crossing == "alert":
                    self.alerts += 1
                    m.count_alert()
                score = None if frames.window_score is None else float(frames.window_score[k])
                m.events.emit(crossing, source=self.source, level=m.level, time=round((index + 1) * m.frame_s, 3),
                              rate=round(self.rolling.rate, 4), frames=self.rolling.frames,
                              score=round(score, 4) if score is not None and score == score else score)

    def finish(self, seconds: float) -> None:
        self.m.metrics.sources.labels("ok").inc()
        self.m.events.emit("end", source=self.source, level=self.m.level, seconds=round(seconds, 3),
                           frames=self.frames, flagged=self.flagged, max_rate=round(self.rolling.max_rate, 4),
                           alerts=self.alerts)


def audio_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)


class DirectoryWatcher:
    """New audio files in a directory, each reported once its size has stopped changing."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._seen: set[Path] = set()
        self._sizes: dict[Path, int] = {}

    def mark_seen(self, paths) -> None:
        self._seen.update(paths)

    def poll(self) -> list[Path]:
        ready = []
        for p in audio_files(self.directory):
            if p in self._seen:
                continue
            try:
                size = p.stat().st_size
            except OSError:
                continue
            if size > 0 and self._sizes.get(p) == size:
                ready.append(p)
                self._seen.add(p)
                self._sizes.pop(p, None)
            else:
                self._sizes[p] = size
        return ready


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m clients.monitor", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", help="audio files to stream")
    ap.add_argument("--watch", metavar="DIR", help="stream every new audio file that appears in DIR")
    ap.add_argument("--mic", action="store_true", help="also monitor the microphone (until Ctrl-C)")
    ap.add_argument("--device", help="microphone device (index or part of its name)")
    ap.add_argument("--once", action="store_true", help="process the files (and those already in --watch), then "
                                                        "exit: 1 if any alert fired")
    ap.add_argument("--level", default=TIMELINE_LEVEL, help="level whose OOD flags are monitored (default %(default)s)")
    ap.add_argument("--window", type=float, default=1.0, help="rolling window in seconds (default %(default)s)")
    ap.add_argument("--alert-rate", type=float, default=0.2,
                    help="alert when this fraction of the window's frames is flagged (default %(default)s)")
    ap.add_argument("--events", metavar="FILE", help="append JSON-lines events to FILE (default: stdout)")
    ap.add_argument("--metrics-port", type=int, help="serve the monitor's Prometheus counters on 127.0.0.1:PORT")
    ap.add_argument("--realtime", action="store_true", help="send files at the pace of live audio")
    ap.add_argument("--parallel", type=int, default=4, help="files streamed at once (default %(default)s)")
    ap.add_argument("--poll", type=float, default=1.0, help="seconds between looks at --watch (default %(default)s)")
    add_connection_args(ap)
    add_retry_args(ap)
    return ap


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def stop_on_signals() -> None:
    """SIGTERM (a service manager's stop) ends the monitor as Ctrl-C does. SIGINT gets the same handler
    unless it was ignored when the process started (a shell's background job), as Python itself does."""
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _interrupt)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)

    def usage(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_USAGE

    if not (args.files or args.watch or args.mic):
        return usage("nothing to monitor: give audio files, --watch DIR or --mic")
    if args.once and args.mic:
        return usage("--once works on files; the microphone runs until Ctrl-C")
    if not 0.0 < args.alert_rate <= 1.0:
        return usage("--alert-rate must be in (0, 1]")
    if args.window <= 0 or args.parallel < 1 or args.poll <= 0:
        return usage("--window, --parallel and --poll must be positive")
    try:
        retry = policy_from_args(args)
    except ValueError as exc:
        return usage(str(exc))
    missing = [f for f in args.files if not Path(f).is_file()]
    if missing:
        return usage(f"no such file: {', '.join(missing)}")
    watch = Path(args.watch) if args.watch else None
    if watch is not None and not watch.is_dir():
        return usage(f"--watch {watch}: not a directory")
    try:
        conn = connect(args)
    except ClientError as exc:
        return usage(str(exc))
    try:
        served = fetch(conn)
        served.level(args.level)
    except ClientError as exc:
        conn.close()
        return usage(str(exc))

    out = open(args.events, "a", encoding="utf-8") if args.events else sys.stdout
    metrics = MonitorMetrics()
    if args.metrics_port is not None:
        port = metrics.serve(args.metrics_port)
        print(f"monitor metrics on http://127.0.0.1:{port}/metrics", file=sys.stderr, flush=True)
    monitor = Monitor(conn, served, EventLog(out), metrics, args.level, args.window, args.alert_rate,
                      realtime=args.realtime, retry=retry)
    files = [Path(f) for f in args.files]
    watcher = DirectoryWatcher(watch) if watch is not None else None
    if watcher is not None and args.once:
        files += [p for p in audio_files(watch) if p not in files]
    pool = ThreadPoolExecutor(max_workers=args.parallel, thread_name_prefix="monitor")
    mic = None
    stop_on_signals()
    try:
        for f in files:
            pool.submit(monitor.run_file, f)
        if args.once or (watcher is None and not args.mic):
            pool.shutdown(wait=True)
            return EXIT_ALERT if monitor.alerts else (EXIT_FAILED if monitor.failures else EXIT_OK)
        if watcher is not None:
            watcher.mark_seen(files)
        mic = _start_mic(monitor, args) if args.mic else None
        while mic is None or not mic.done.is_set():
            time.sleep(args.poll)
            if watcher is not None:
                for p in watcher.poll():
                    pool.submit(monitor.run_file, p)
    except KeyboardInterrupt:
        if mic is not None:  # half-close the microphone stream, take its last frames, write its end event
            mic.stop()
            mic.done.wait(15)
    except ClientError as exc:
        return usage(str(exc))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        conn.close()
        if out is not sys.stdout:
            out.close()
    return EXIT_OK


def _start_mic(monitor: Monitor, args):
    """The microphone as one more source, in its own thread; returns its MicSession, whose `done`
    event is set once the source's last event is written."""
    from clients.mic import MicSession, resolve_device

    tracker = monitor.tracker("mic")
    session = MicSession(monitor.conn, monitor.sample_rate, device=resolve_device(args.device), levels=[monitor.level],
                         view_level=monitor.level, on_response=tracker.add)

    session.done = threading.Event()

    def run() -> None:
        monitor.metrics.active.inc()
        try:
            session.run(on_start=lambda _stream: print("monitoring the microphone", file=sys.stderr, flush=True))
            if session.error is not None:
                monitor.failed("mic", describe_rpc_error(session.error))
            else:
                tracker.finish(session.samples_sent / monitor.sample_rate)
        except ClientError as exc:
            monitor.failed("mic", str(exc))
        finally:
            monitor.metrics.active.dec()
            session.done.set()

    threading.Thread(target=run, name="monitor-mic", daemon=True).start()
    return session


if __name__ == "__main__":
    sys.exit(main())
