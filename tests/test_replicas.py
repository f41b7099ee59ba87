"""Two real server processes behind a real nginx (deploy/nginx/nginx.conf, grpc_pass): streams
through the balancer equal the offline encoding; killing one replica ends only the streams it was
serving (within seconds; nginx resets them, which gRPC reports as INTERNAL "Stream removed"), the
other streams lose no frame, and new streams go to the survivor.

Skipped where nginx is not installed (.ci/run installs the Debian package when run as root).
"""
from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.collector import FrameCollector
from clients.requests import file_requests
from protos.sim.v2 import sim_pb2_grpc as pb_grpc
from serve.launch import ServerProcess
from support.serving import ROOT, offline, wait_for
from train.audio import SAMPLE_RATE
from train.corpus import load_corpus

NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx; .ci/run does "
                                                      "it as root)")
TOL = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def balancer_config(upstreams: list[str], port: int, run_dir: Path) -> str:
    """deploy/nginx/nginx.conf with its replica lines, listen port, pid and temp paths for this test."""
    text = NGINX_CONF.read_text()
    lines = re.findall(r"^\s*server \S+:\d+ (.*);$", text, re.M)
    assert len(lines) >= 1, "no replica lines in the shipped config"
    text = re.sub(r"^(\s*)server \S+:\d+ .*;\n", "", text, flags=re.M)
    replicas = "".join(f"        server {u} {lines[0]};\n" for u in upstreams)
    text = text.replace("upstream sim_serve {\n", "upstream sim_serve {\n" + replicas, 1)
    text, n = re.subn(r"listen \d+ http2;", f"listen 127.0.0.1:{port} http2;", text)
    assert n == 1
    temp = "".join(f"    {kind}_temp_path {run_dir / kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    text = text.replace("http {\n", "http {\n" + temp, 1)
    return f"pid {run_dir / 'nginx.pid'};\nerror_log {run_dir / 'error.log'} info;\n" + text


class Nginx:
    def __init__(self, upstreams: list[str], run_dir: Path):
        self.port = free_port()
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.conf = run_dir / "nginx.conf"
        self.conf.write_text(balancer_config(upstreams, self.port, run_dir))
        check = subprocess.run([NGINX, "-t", "-q", "-c", str(self.conf), "-e", str(run_dir / "error.log")],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen([NGINX, "-c", str(self.conf), "-e", str(run_dir / "error.log"),
                                      "-g", "daemon off;"], stderr=subprocess.PIPE, text=True)
        wait_for(self._listening, timeout=20, what="nginx to listen")

    def _listening(self) -> bool:
        assert self.proc.poll() is None, self.proc.stderr.read()
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def replicas(model, tmp_path):
    # idle timeout above the longest a held stream waits for the others to open (a busy CI machine)
    servers = [ServerProcess(model[0], "--idle-timeout", "60", log_dir=tmp_path) for _ in range(2)]
    balancer = None
    try:
        for s in servers:
            s.start()
        balancer = Nginx([s.address for s in servers], tmp_path / "nginx")
        yield servers, balancer
    finally:
        if balancer is not None:
            balancer.close()
        for s in servers:
            s.close()


@pytest.fixture(scope="module")
def speech(small_corpus):
    """About 1.6 s of real synthesised speech: three test-split words back to back."""
    utts = load_corpus(small_corpus, "test")[:3]
    return np.concatenate([sf.read(u.path, dtype="float32")[0] for u in utts])


def stream(stub, audio, realtime=False) -> dict[str, np.ndarray]:
    col = FrameCollector()
    for resp in stub.StreamEncode(file_requests(audio, SAMPLE_RATE, 800, realtime=realtime), timeout=60):
        col.add(resp)
    return col.arrays()


def test_streams_through_the_balancer_equal_offline_on_both_replicas(replicas, model, speech):
    servers, balancer = replicas
    want = offline(model[1], speech)
    with grpc.insecure_channel(balancer.address) as ch:
        stub = pb_grpc.SimEncoderStub(ch)
        for _ in range(4):
            got = stream(stub, speech)
            for level in ("m1", "m2", "m3", "ar"):
                np.testing.assert_allclose(got[level], want[level], atol=TOL, rtol=0)
        # the health service answers through the balancer too
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    served = [s.metric("sim_streams_total", outcome="ok") for s in servers]
    assert sum(served) == 4 and min(served) >= 1, served  # round robin: both replicas served streams


def test_killing_one_replica_ends_only_its_streams(replicas, model, speech):
    servers, balancer = replicas
    want = offline(model[1], speech)
    n = 6
    results: list = [None] * n
    ended_at: list = [None] * n
    answered = [threading.Event() for _ in range(n)]
    gate = threading.Event()

    def one(i: int) -> None:
        def requests():
            it = file_requests(speech, SAMPLE_RATE, 800, realtime=True)
            yield next(it)  # config
            yield next(it)
            gate.wait(30)  # hold every stream open until the replica is killed
            yield from it
        col = FrameCollector()
        try:
            with grpc.insecure_channel(balancer.address) as ch:  # a connection per client
                for resp in pb_grpc.SimEncoderStub(ch).StreamEncode(requests(), timeout=60):
                    col.add(resp)
                    answered[i].set()
            results[i] = col.arrays()
        except grpc.RpcError as exc:
            results[i] = exc
        ended_at[i] = time.monotonic()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: sum(s.metric("sim_active_streams") for s in servers) == n, timeout=30,
                 what=f"{n} streams open through the balancer")
        # every stream has had a response: nginx will not move it to another replica (it retries a
        # call on the next replica only while the client has received nothing)
        wait_for(lambda: all(e.is_set() for e in answered), timeout=30, what="a first response on every stream")
        on_victim = int(servers[0].metric("sim_active_streams"))
        assert 1 <= on_victim < n, f"round robin put {on_victim} of {n} streams on one replica"
        servers[0].proc.send_signal(signal.SIGKILL)
        servers[0].proc.wait(10)
        killed_at = time.monotonic()
        gate.set()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a client hung after the replica died"
    finally:
        gate.set()
    failed = [r for r in results if isinstance(r, grpc.RpcError)]
    done = [r for r in results if isinstance(r, dict)]
    assert len(failed) == on_victim, [f"{e.code().name}: {e.details()}" for e in failed]
    for err in failed:
        # The replica's connection to nginx broke after the stream's first response: nginx can then
        # only reset the client's HTTP/2 stream (RST_STREAM INTERNAL_ERROR, which gRPC reports as
        # INTERNAL "Stream removed"); before any response it answers UNAVAILABLE itself.
        assert err.code() == grpc.StatusCode.UNAVAILABLE or \
            (err.code() == grpc.StatusCode.INTERNAL and "RST_STREAM" in err.details()), \
            f"{err.code().name}: {err.details()}"
    for i, r in enumerate(results):
        if isinstance(r, grpc.RpcError):
            assert ended_at[i] - killed_at < 10, "a stream of the dead replica took long to end"
    for got in done:  # the survivor's streams: every frame, equal to offline (lost: 0)
        for level in ("m1", "m2", "m3", "ar"):
            np.testing.assert_allclose(got[level], want[level], atol=TOL, rtol=0)
    # new streams all reach the survivor
    before = servers[1].metric("sim_streams_total", outcome="ok")
    with grpc.insecure_channel(balancer.address) as ch:
        stub = pb_grpc.SimEncoderStub(ch)
        for _ in range(4):
            got = stream(stub, speech)
            np.testing.assert_allclose(got["m3"], want["m3"], atol=TOL, rtol=0)
    assert servers[1].metric("sim_streams_total", outcome="ok") - before == 4
