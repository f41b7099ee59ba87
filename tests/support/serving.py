"""Helpers for the service tests (test_serve*.py, test_clients.py, test_mic.py, test_quantize.py).

A small random SIM encoder (channels 32, GRU 16) with an m3 decoder, exported once per pytest
session into the session's base temp folder; the real server runs as a subprocess through
serve.launch.ServerProcess.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
_build_lock = threading.Lock()


def model_dir(base: Path, corpus: Path) -> tuple[Path, Path]:
    """(exported model dir, checkpoint) of a small random SIM encoder (channels 32, GRU 16) with an m3
    decoder, built once under base; later calls reuse it."""
    from export.random_model import checkpoint_of, export_random_model
    from train.model import ModelSpec

    out = base / "serve_model" / "model"
    with _build_lock:
        export_random_model(out, corpus, ModelSpec(method="sim", channels=32, hidden=16), decoders=("m3",),
                            seed=1234, timeout=300)
    return out, checkpoint_of(out)


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
