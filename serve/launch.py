"""`python -m serve` in a subprocess, for whatever drives a real server from outside (the tests,
bench/serve_capacity.py): started on free loopback ports, ready once it has printed its ready
lines (serve.announce), its Prometheus metrics read back, its CPU time, memory and descriptors counted, stopped.
"""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class ServerProcess:
    """`python -m serve --model MODEL --port 0 --metrics-port 0 ARGS`; start() waits until every
    server process (one per --workers) is listening and has its metrics endpoint. stderr goes to a
    file in log_dir when given (read it with log(); close() removes it), else to this process's stderr."""

    def __init__(self, model: str | Path, *args: str, env: dict | None = None, log_dir: Path | None = None):
        self.cmd = [sys.executable, "-m", "serve", "--model", str(model), "--port", "0", "--metrics-port", "0", *args]
        # the CPU provider unless the caller says otherwise: results comparable from machine to machine
        self.env = {**os.environ, "SIM_ORT_PROVIDER": os.environ.get("SIM_ORT_PROVIDER", "cpu"), **(env or {})}
        self.log_path = None if log_dir is None else Path(log_dir) / f"serve-{os.getpid()}-{id(self)}.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.metrics_ports: list[int] = []  # one per server process
        self.lines: list[str] = []  # its stdout so far
        self._log = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_ports[0] if self.metrics_ports else None

    def start(self, timeout: float = 60.0) -> ServerProcess:
        from serve import announce

        self._log = open(self.log_path, "w") if self.log_path is not None else None
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True)
        lines: queue.Queue = queue.Queue()

        def pump() -> None:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        workers = 1
        while self.port is None or len(self.metrics_ports) < workers:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.kill()
                raise RuntimeError(f"the server did not start: {' '.join(self.cmd)}\n{self.log()}")
            ready = announce.parse(line)
            if ready is not None and ready.kind == "listening":
                self.port, workers = ready.port, ready.workers
            elif ready is not None:
                self.metrics_ports.append(ready.port)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text() if self.log_path is not None else ""
        except OSError:
            return ""

    def metrics(self, port: int | None = None) -> str:
        """The metrics page of one server process (default: the first)."""
        port = self.metrics_port if port is None else port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str, **labels) -> float:
        """One sample's value summed over the server processes (0.0 where absent)."""
        return sum(metric_value(self.metrics(port), name, **labels) for port in self.metrics_ports)

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process and its child processes have used so far."""
        pids = [self.proc.pid]
        tasks = Path(f"/proc/{self.proc.pid}/task")
        for task in tasks.iterdir() if tasks.exists() else ():  # any thread's children: --workers
            try:
                pids += [int(p) for p in (task / "children").read_text().split()]
            except FileNotFoundError:  # a thread that just ended
                pass
        total = 0.0
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def rss_bytes(self) -> int:
        """Resident memory of the server process now (VmRSS; with --workers: the supervisor only)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def open_fds(self) -> int:
        """File descriptors the server process holds now (sockets, files, pipes)."""
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def signal(self, sig=signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (the server drains), then its exit status; killed if it does not end in time."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def close(self) -> None:
        """Stop it and remove its log."""
        try:
            self.stop()
        finally:
            self.kill()
            if self._log is not None:
                self._log.close()
                self.log_path.unlink(missing_ok=True)


def metric_value(text: str, name: str, **labels) -> float:
    """The value of one sample (name and exactly these labels) on a Prometheus text page; 0.0 when absent."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = ",".join(sorted((m.group(2) or "{}")[1:-1].split(","))) if m.group(2) else ""
        if got == want:
            return float(m.group(3))
    return 0.0
