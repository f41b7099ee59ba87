"""Operations against the real server: TLS and bearer token, SIGTERM draining, command-line errors,
a decoder that changed on disk."""
from __future__ import annotations

import shutil
import subprocess
import threading

import grpc
import numpy as np
import pytest
import soundfile as sf
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.collector import FrameCollector
from clients.requests import audio_request, config_request, file_requests
from protos.sim.v2 import sim_pb2 as pb
from protos.sim.v2 import sim_pb2_grpc as pb_grpc
from serve.launch import ServerProcess
from support.serving import PY, ROOT, offline, self_signed_cert, wait_for
from train.audio import SAMPLE_RATE
from train.corpus import load_corpus


@pytest.fixture(scope="module")
def speech(small_corpus):
    utts = load_corpus(small_corpus, "test")[:2]
    return np.concatenate([sf.read(u.path, dtype="float32")[0] for u in utts])


def collect(stub, requests, metadata=()):
    col = FrameCollector()
    for r in stub.StreamEncode(requests, metadata=metadata, timeout=30):
        col.add(r)
    return col.arrays()


def test_tls_and_token(model, speech, tmp_path):
    cert, key = self_signed_cert(tmp_path / "tls")
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    srv = ServerProcess(model[0], "--tls-cert", str(cert), "--tls-key", str(key), "--token-file", str(token_file),
                        log_dir=tmp_path).start()
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        channel = grpc.secure_channel(srv.address, creds)
        stub = pb_grpc.SimEncoderStub(channel)
        good = (("authorization", "Bearer s3cret-token"),)
        got = collect(stub, file_requests(speech, SAMPLE_RATE, 1600), good)
        np.testing.assert_allclose(got["m3"], offline(model[1], speech)["m3"], atol=1e-4, rtol=0)
        assert stub.Info(pb.InfoRequest(), metadata=good).method == "sim"
        for metadata, text in [((), "missing authorization"), ((("authorization", "Bearer wrong"),), "invalid token"),
                               ((("authorization", "s3cret-token"),), "invalid token")]:
            with pytest.raises(grpc.RpcError) as err:
                collect(stub, file_requests(speech, SAMPLE_RATE, 1600), metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and text in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                stub.Info(pb.InfoRequest(), metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # the health service needs no token
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        channel.close()
        # a plaintext client cannot talk to the TLS port
        plain = grpc.insecure_channel(srv.address)
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.SimEncoderStub(plain).Info(pb.InfoRequest(), metadata=good, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        plain.close()
        assert srv.metric("sim_streams_total", outcome="unauthenticated") == 3
    finally:
        srv.close()


def test_sigterm_drains_then_exits_zero(model, speech, tmp_path):
    srv = ServerProcess(model[0], "--drain-grace", "20", log_dir=tmp_path).start()
    channel = grpc.insecure_channel(srv.address)
    stub = pb_grpc.SimEncoderStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    go_on = threading.Event()
    result = {}

    def open_stream():
        def requests():
            yield config_request(SAMPLE_RATE)
            yield audio_request(speech[:8000])
            go_on.wait(20)
            yield audio_request(speech[8000:])
        try:
            result["arrays"] = collect(stub, requests())
        except grpc.RpcError as exc:
            result["error"] = exc

    t = threading.Thread(target=open_stream)
    t.start()
    try:
        wait_for(lambda: srv.metric("sim_active_streams") == 1, what="the stream to open")
        srv.signal()
        wait_for(lambda: health.Check(health_pb2.HealthCheckRequest()).status ==
                 health_pb2.HealthCheckResponse.NOT_SERVING, what="health NOT_SERVING")
        with pytest.raises(grpc.RpcError) as err:
            collect(stub, file_requests(speech, SAMPLE_RATE, 1600))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
        assert srv.proc.poll() is None  # still serving the open stream
        go_on.set()
        t.join(30)
        assert "error" not in result, result.get("error")
        np.testing.assert_allclose(result["arrays"]["m3"], offline(model[1], speech)["m3"], atol=1e-4, rtol=0)
        assert srv.wait(30) == 0
        assert srv.lines[-1] == "stopped"
    finally:
        go_on.set()
        channel.close()
        srv.close()


def test_streams_still_open_after_the_grace_period_end_unavailable(model, speech, tmp_path):
    srv = ServerProcess(model[0], "--drain-grace", "0.5", "--idle-timeout", "0", log_dir=tmp_path).start()
    channel = grpc.insecure_channel(srv.address)
    stop = threading.Event()

    def requests():
        yield config_request(SAMPLE_RATE)
        yield audio_request(speech[:4000])
        stop.wait(20)

    try:
        call = pb_grpc.SimEncoderStub(channel).StreamEncode(requests())
        wait_for(lambda: srv.metric("sim_active_streams") == 1, what="the stream to open")
        srv.signal()
        with pytest.raises(grpc.RpcError) as err:
            for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "drain period" in err.value.details()
        assert srv.wait(30) == 0
    finally:
        stop.set()
        channel.close()
        srv.close()


def test_decoder_changed_on_disk_is_failed_precondition(model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(model[0], copy)
    srv = ServerProcess(copy, log_dir=tmp_path).start()
    try:
        (copy / "decoder_m3.onnx").write_bytes(b"not an onnx graph")
        channel = grpc.insecure_channel(srv.address)
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.SimEncoderStub(channel).Decode(pb.DecodeRequest(level="m3", num_frames=1, latents=bytes(4 * 32)))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "re-export" in err.value.details()
        channel.close()
    finally:
        srv.close()


@pytest.mark.parametrize("args,text", [
    (["--model", "/nonexistent/model"], "no such model directory"),
    (["--model", "{model}", "--tls-cert", "x.pem"], "--tls-cert and --tls-key go together"),
    (["--model", "{model}", "--token-file", "/nonexistent/token"], "no such file"),
    (["--model", "{model}", "--max-streams", "0"], "must be positive"),
    (["--model", "{tmp}"], "manifest.json: missing"),
])
def test_cli_errors_exit_2_without_traceback(model, tmp_path, args, text):
    args = [a.format(model=model[0], tmp=tmp_path) for a in args]
    proc = subprocess.run([PY, "-m", "serve", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and text in proc.stderr and "Traceback" not in proc.stderr


def test_port_in_use_is_a_clear_error(model, tmp_path):
    srv = ServerProcess(model[0], log_dir=tmp_path).start()
    try:
        proc = subprocess.run([PY, "-m", "serve", "--model", str(model[0]), "--port", str(srv.port)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "error: cannot start the server" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        srv.close()


def test_workers_share_one_port_and_drain_together(model, speech, tmp_path):
    """--workers 2: two server processes on one port (SO_REUSEPORT); streams on separate connections
    each equal the offline encoding wherever they land; every stream is counted by some worker;
    SIGTERM stops both and the supervisor exits 0."""
    from serve.launch import metric_value

    srv = ServerProcess(model[0], "--workers", "2", log_dir=tmp_path).start()
    try:
        assert "(2 workers;" in srv.lines[0]
        assert len(srv.metrics_ports) == 2
        expected = offline(model[1], speech)["m3"]
        results, errors = [], []

        def one(i):
            # a connection of its own (gRPC would otherwise share one among channels to one address)
            with grpc.insecure_channel(srv.address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                try:
                    results.append(collect(pb_grpc.SimEncoderStub(channel),
                                           file_requests(speech, SAMPLE_RATE, 777 + i))["m3"])
                except grpc.RpcError as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and len(results) == 6
        for got in results:
            np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)

        import urllib.request

        def ok_streams(port):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                return metric_value(r.read().decode(), "sim_streams_total", outcome="ok")

        wait_for(lambda: sum(ok_streams(p) for p in srv.metrics_ports) == 6, what="6 streams counted")
        assert srv.stop() == 0 and srv.lines[-1] == "stopped"
    finally:
        srv.close()
