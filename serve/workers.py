"""`python -m serve --workers N`: N server processes sharing one port (SO_REUSEPORT).

One Python process serves all its streams on one event loop and one GIL; on a small machine its
Python and gRPC work, not the model, is what runs out first (docs/benchmarks.md). With --workers
the kernel spreads incoming CONNECTIONS over N independent server processes (each loads the
model, batches its own streams, has its own health service, limits and metrics). A client's
streams over one channel all go to the worker that accepted that channel's connection.

This process only supervises: it picks the port (when --port 0), starts the workers with
`--reuse-port`, prints one `listening on` line once all are ready (and every worker's metrics
address), forwards SIGTERM / SIGINT so they drain, and exits with the worst exit status. If a
worker dies, the others are stopped too: a half-running service is worse than a restart.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading

from serve import announce


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def worker_argv(argv: list[str], port: int, metrics_port: int | None, index: int) -> list[str]:
    """The command line of worker `index`: the supervisor's own options, minus --workers / --port /
    --metrics-port, plus the shared port, its metrics port and --reuse-port."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--workers", "--port", "--metrics-port"):
            skip = "=" not in arg
            continue
        out.append(arg)
    out += ["--port", str(port), "--reuse-port"]
    if metrics_port is not None:
        out += ["--metrics-port", str(metrics_port + index if metrics_port else 0)]
    return [sys.executable, "-m", "serve", *out]


def supervise(argv: list[str], workers: int, host: str, port: int, metrics_port: int | None) -> int:
    port = port or free_port(host)
    # own sessions: a terminal's Ctrl-C reaches only this process, which signals each worker once
    procs = [subprocess.Popen(worker_argv(argv, port, metrics_port, i), stdout=subprocess.PIPE, text=True,
                              start_new_session=True) for i in range(workers)]
    ready = threading.Event()

    def worker_ready(ls: list[str]) -> bool:  # its "listening on" line, and its metrics line if any
        kinds = {r.kind for r in map(announce.parse, ls) if r is not None}
        return "listening" in kinds and (metrics_port is None or "metrics" in kinds)

    lines: list[list[str]] = [[] for _ in procs]
    first_exit = threading.Event()

    def pump(i: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            lines[i].append(line.rstrip("\n"))
            if all(worker_ready(ls) for ls in lines):
                ready.set()
        proc.wait()
        first_exit.set()

    threads = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
        t.start()

    signalled: set[int] = set()

    def stop(*_):  # each worker gets one SIGTERM: a second one could land after its drain and kill it
        for p in procs:
            if p.pid not in signalled and p.poll() is None:
                signalled.add(p.pid)
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not ready.is_set() and not first_exit.is_set():
        ready.wait(0.1)
    if ready.is_set() and not first_exit.is_set():
        first = next(r for r in map(announce.parse, lines[0]) if r is not None and r.kind == "listening")
        print(announce.listening(host, port, f"{workers} workers; {first.detail}"), flush=True)
        for i, ls in enumerate(lines):
            for ln in ls:
                if (r := announce.parse(ln)) is not None and r.kind == "metrics":
                    print(f"worker {i} {ln}", flush=True)
    first_exit.wait()
    stop()  # one worker ended (a signal, or a crash): end the rest
    codes = [p.wait() for p in procs]
    for t in threads:
        t.join(timeout=5)
    if all(c == 0 for c in codes):
        print("stopped", flush=True)
        return 0
    print(f"error: worker exit statuses {codes}", file=sys.stderr)
    return max(c if c > 0 else 1 for c in codes if c != 0)

