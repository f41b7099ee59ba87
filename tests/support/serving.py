"""Helpers for the service tests (test_serve*.py, test_clients.py, test_mic.py, test_quantize.py).

A small random SIM encoder (channels 32, GRU 16) with an m3 decoder, exported once per pytest
session into the session's base temp folder, and the real server (`python -m serve`) as a
subprocess on a free loopback port.
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

import numpy as np

from serve import announce

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
_build_lock = threading.Lock()


def model_dir(base: Path, corpus: Path) -> tuple[Path, Path]:
    """(exported model dir, checkpoint) built once under base; later calls reuse it."""
    import torch

    from train.checkpoint import encoder_checkpoint, save_atomic
    from train.decoder import Decoder, save_decoder
    from train.model import Encoder, ModelDims

    root = base / "serve_model"
    out, ckpt, done = root / "model", root / "ckpt.pt", root / "done"
    with _build_lock:
        if done.exists():
            return out, ckpt
        root.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(1234)
        enc = Encoder(ModelDims(method="sim", channels=32, hidden=16))
        save_atomic(encoder_checkpoint(enc, {"method": "sim", "beta": 0.0033}), ckpt)
        save_decoder(Decoder("m3", 32), root / "dec" / "decoder_m3.pt", enc.dims.to_dict())
        subprocess.run([PY, "-m", "export.onnx", str(ckpt), "--out", str(out), "--corpus", str(corpus),
                        "--decoders", str(root / "dec"), "--calibration-clips", "10", "--skip-verify"],
                       cwd=ROOT, check=True, capture_output=True, timeout=300)
        done.write_text("ok")
    return out, ckpt


class ServerProcess:
    """`python -m serve` in a subprocess; start() waits for its 'listening on' line."""

    def __init__(self, model: Path, *args: str, env: dict | None = None, log_dir: Path | None = None):
        self.cmd = [PY, "-m", "serve", "--model", str(model), "--port", "0", "--metrics-port", "0", *args]
        self.env = {**os.environ, "SIM_ORT_PROVIDER": "cpu", **(env or {})}
        self.log_path = (log_dir or Path("/tmp")) / f"serve-{os.getpid()}-{id(self)}.log"
        self.proc: subprocess.Popen | None = None
        self.port = self.metrics_port = None
        self.metrics_ports: list[int] = []  # one per process with --workers
        self.lines: list[str] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerProcess":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True)
        q: queue.Queue = queue.Queue()

        def pump():
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                q.put(line)
            q.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        workers = 1
        while self.port is None or len(self.metrics_ports) < workers:
            try:
                line = q.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.kill()
                raise RuntimeError(f"server did not start: {' '.join(self.cmd)}\n{self.log()}")
            ready = announce.parse(line)
            if ready is not None and ready.kind == "listening":
                self.port, workers = ready.port, ready.workers
            elif ready is not None:
                self.metrics_ports.append(ready.port)
                self.metrics_port = self.metrics_ports[0]
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def signal(self, sig=signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
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
        try:
            self.stop()
        finally:
            self.kill()
            self._log.close()
            self.log_path.unlink(missing_ok=True)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str, **labels) -> float:
        """Value of one sample of the metrics endpoint (0.0 when absent)."""
        return metric_value(self.metrics(), name, **labels)


def metric_value(text: str, name: str, **labels) -> float:
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


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def offline(ckpt: Path, audio: np.ndarray) -> dict[str, np.ndarray]:
    """The offline encoding, as `python -m train.encode` computes it."""
    from train.checkpoint import load_encoder
    from train.encode import encode_array

    encoder, _ = load_encoder(ckpt)
    return encode_array(encoder, audio)


def self_signed_cert(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """(cert.pem, key.pem) for `host` (and localhost): with the cryptography package if installed,
    else the openssl command."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=sim-test",
                        "-addext", f"subjectAltName=IP:{host},DNS:localhost"],
                       check=True, capture_output=True, timeout=60)
        return cert, key
    pkey = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sim-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    c = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(pkey.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=2))
         .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host)),
                                                     x509.DNSName("localhost")]), critical=False)
         .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
         .sign(pkey, hashes.SHA256()))
    cert.write_bytes(c.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(pkey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return cert, key
