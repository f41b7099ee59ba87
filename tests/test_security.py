"""Security against the real server (docs/security.md): mutual TLS with certificates made here,
limits on streams per connection and per client address and on metadata size, the token compared
in constant time, model files checked against their manifest hashes, and no unsafe
deserialisation (pickle) anywhere in the tree."""
from __future__ import annotations

import argparse
import ast
import shutil
import threading

import grpc
import numpy as np
import pytest
import soundfile as sf

from clients.collector import FrameCollector
from clients.connection import add_connection_args, connect
from clients.requests import audio_request, config_request, file_requests
from protos.sim.v2 import sim_pb2 as pb
from protos.sim.v2 import sim_pb2_grpc as pb_grpc
from serve.cli import main as serve_main
from serve.launch import ServerProcess
from serve.model_dir import ManifestError, load_manifest
from serve.servicer import peer_host
from support.serving import ROOT, offline, self_signed_cert, wait_for
from train.audio import SAMPLE_RATE
from train.corpus import load_corpus

TOL = 1e-4


@pytest.fixture(scope="module")
def speech(small_corpus):
    utts = load_corpus(small_corpus, "test")[:2]
    return np.concatenate([sf.read(u.path, dtype="float32")[0] for u in utts])


def collect(stub, requests) -> dict[str, np.ndarray]:
    col = FrameCollector()
    for r in stub.StreamEncode(requests, timeout=30):
        col.add(r)
    return col.arrays()


def client_args(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    add_connection_args(ap)
    return ap.parse_args(list(argv))


def test_mutual_tls_accepts_only_clients_with_a_certificate_the_server_trusts(model, speech, tmp_path):
    server_cert, server_key = self_signed_cert(tmp_path / "server")
    client_cert, client_key = self_signed_cert(tmp_path / "client")  # self-signed: its own CA
    rogue_cert, rogue_key = self_signed_cert(tmp_path / "rogue")
    srv = ServerProcess(model[0], "--tls-cert", str(server_cert), "--tls-key", str(server_key),
                        "--tls-client-ca", str(client_cert), log_dir=tmp_path).start()
    try:
        assert "mutual TLS" in srv.lines[0]
        good = connect(client_args("--server", srv.address, "--tls-ca", str(server_cert), "--tls-client-cert",
                                   str(client_cert), "--tls-client-key", str(client_key)))
        try:
            got = collect(good.stub, file_requests(speech, SAMPLE_RATE, 1600))
            np.testing.assert_allclose(got["m3"], offline(model[1], speech)["m3"], atol=TOL, rtol=0)
        finally:
            good.close()
        refused = [("--tls-ca", str(server_cert)),  # TLS, but no client certificate
                   ("--tls-ca", str(server_cert), "--tls-client-cert", str(rogue_cert),
                    "--tls-client-key", str(rogue_key))]  # a certificate the server does not trust
        for argv in refused:
            conn = connect(client_args("--server", srv.address, *argv), wait=False)
            try:
                with pytest.raises(grpc.RpcError) as err:
                    conn.stub.Info(pb.InfoRequest(), timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails: no call reaches it
            finally:
                conn.close()
        assert srv.metric("sim_streams_total", outcome="ok") == 1
        assert srv.proc.poll() is None
    finally:
        srv.close()


def test_mutual_tls_flags_are_checked(model, tmp_path, capsys):
    cert, key = self_signed_cert(tmp_path / "tls")
    assert serve_main(["--model", str(model[0]), "--tls-client-ca", str(cert)]) == 2
    assert "--tls-client-ca needs --tls-cert" in capsys.readouterr().err
    assert serve_main(["--model", str(model[0]), "--tls-cert", str(cert), "--tls-key", str(key),
                       "--tls-client-ca", str(key)]) == 2
    assert "not a PEM certificate" in capsys.readouterr().err
    with pytest.raises(Exception, match="go together"):
        connect(client_args("--server", "127.0.0.1:1", "--tls-client-cert", str(cert)), wait=False)


def own_connection(address: str) -> grpc.Channel:
    """A channel with its own TCP connection (grpc shares one between channels to the same target)."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def test_streams_per_connection_and_per_client_address(model, speech, tmp_path):
    srv = ServerProcess(model[0], "--max-streams-per-connection", "2", "--max-streams-per-peer", "3",
                        log_dir=tmp_path).start()
    gate = threading.Event()
    held: list = []

    def hold(channel) -> threading.Thread:
        def requests():
            yield config_request(SAMPLE_RATE)
            yield audio_request(speech[:1600])
            gate.wait(30)
            yield audio_request(speech[1600:])

        def run():
            try:
                held.append(collect(pb_grpc.SimEncoderStub(channel), requests()))
            except grpc.RpcError as exc:
                held.append(exc)
        t = threading.Thread(target=run)
        t.start()
        return t

    def refused(channel) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as err:
            collect(pb_grpc.SimEncoderStub(channel), file_requests(speech[:1600], SAMPLE_RATE, 1600))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        return err.value

    a, b = own_connection(srv.address), own_connection(srv.address)
    threads = []
    try:
        threads += [hold(a), hold(a)]
        wait_for(lambda: srv.metric("sim_active_streams") == 2, what="two streams on connection A")
        assert "too many streams on this connection: at most 2" in refused(a).details()
        threads.append(hold(b))
        wait_for(lambda: srv.metric("sim_active_streams") == 3, what="a stream on connection B")
        assert "too many streams from 127.0.0.1: at most 3" in refused(b).details()
        gate.set()
        for t in threads:
            t.join(30)
        assert len(held) == 3 and all(isinstance(h, dict) for h in held), held  # the held streams were untouched
        want = offline(model[1], speech)["m3"]
        for h in held:
            np.testing.assert_allclose(h["m3"], want, atol=TOL, rtol=0)
        # the counts are freed when streams end: a connection may open its streams again
        got = collect(pb_grpc.SimEncoderStub(a), file_requests(speech, SAMPLE_RATE, 1600))
        np.testing.assert_allclose(got["m3"], want, atol=TOL, rtol=0)
        assert srv.metric("sim_streams_total", outcome="resource_exhausted") == 2
    finally:
        gate.set()
        a.close()
        b.close()
        srv.close()


def test_peer_host():
    assert peer_host("ipv4:10.0.0.7:51234") == "10.0.0.7"
    assert peer_host("ipv6:[::1]:51234") == "::1"
    assert peer_host("unix:/tmp/s") == "unix:/tmp/s"


def test_metadata_larger_than_the_limit_is_refused(model, tmp_path):
    srv = ServerProcess(model[0], "--max-metadata-bytes", "2048", log_dir=tmp_path).start()
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.SimEncoderStub(ch)
            assert stub.Info(pb.InfoRequest(), metadata=(("x-note", "a" * 500),), timeout=10).method == "sim"
            with pytest.raises(grpc.RpcError) as err:
                stub.Info(pb.InfoRequest(), metadata=(("x-note", "a" * 6000),), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
            assert "metadata size exceeds" in err.value.details()
            assert stub.Info(pb.InfoRequest(), timeout=10).method == "sim"  # the server carries on
    finally:
        srv.close()


def test_token_is_compared_in_constant_time():
    """serve/auth.py compares the token with hmac.compare_digest and never with == or !=."""
    tree = ast.parse((ROOT / "serve" / "auth.py").read_text())
    calls = [ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert "hmac.compare_digest" in calls
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            text = ast.unparse(node)
            assert "token" not in text and "_expected" not in text and "sent" not in text, text


def test_every_model_file_is_checked_against_its_manifest_hash(model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(model[0], copy)
    manifest = load_manifest(copy)
    assert manifest["files"], "the manifest lists no files"
    for name in manifest["files"]:
        path = copy / name
        original = path.read_bytes()
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit changed
        with pytest.raises(ManifestError, match=f"{name}: sha256 .* does not match"):
            load_manifest(copy)
        path.write_bytes(original)
    load_manifest(copy)


# --- no unsafe deserialisation ---------------------------------------------------------------------
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
CHECKED = ("train", "export", "serve", "clients", "protos", "bench", "tests")


def unsafe_loads(path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"imports {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if func.endswith("torch.load") or func == "load" and "weights_only" in kw:
            if kw.get("weights_only") != "True":
                found.append(f"line {node.lineno}: {func} without weights_only=True")
        elif func.endswith(("np.load", "numpy.load")) and kw.get("allow_pickle", "False") != "False":
            found.append(f"line {node.lineno}: {func} with allow_pickle")
        elif func.endswith("yaml.load") or func.endswith("yaml.unsafe_load"):
            found.append(f"line {node.lineno}: {func} (use yaml.safe_load)")
        elif func.endswith(("torch.jit.load", "torch.package.PackageImporter")):
            found.append(f"line {node.lineno}: {func}")
    return found


def test_no_pickle_loading_anywhere():
    files = [p for d in CHECKED for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 50
    problems = {str(p.relative_to(ROOT)): f for p in files if (f := unsafe_loads(p))}
    assert problems == {}


def test_the_unsafe_load_check_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport torch\nimport numpy as np\nimport yaml\n"
                   "torch.load('x')\ntorch.load('x', weights_only=False)\nnp.load('x', allow_pickle=True)\n"
                   "yaml.load(open('x'))\n")
    found = unsafe_loads(bad)
    assert len(found) == 5, found
    good = tmp_path / "good.py"
    good.write_text("import torch\nimport numpy as np\ntorch.load('x', weights_only=True)\nnp.load('x')\n")
    assert unsafe_loads(good) == []
