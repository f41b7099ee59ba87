"""Faults around a real server, and that each one frees the stream's state: a client that never reads
its responses, one that vanishes with a TCP reset, a half-open connection (keepalive), an idle stream,
the server killed with SIGKILL under load. (A failing batched step: test_serve_units.)"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf

from clients.collector import FrameCollector
from clients.requests import audio_request, config_request, file_requests
from protos.sim.v2 import sim_pb2_grpc as pb_grpc
from serve.launch import ServerProcess
from support.serving import wait_for
from support.tcp_proxy import TcpProxy
from train.audio import SAMPLE_RATE
from train.corpus import load_corpus

KEEPALIVE_S = 1.0  # the faults server pings every second and waits a second for the answer
UNREAD_S = 2.0


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    srv = ServerProcess(model[0], "--keepalive", str(KEEPALIVE_S), "--keepalive-timeout", str(KEEPALIVE_S),
                        "--unread-timeout", str(UNREAD_S), "--idle-timeout", "60",
                        log_dir=tmp_path_factory.mktemp("log")).start()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def speech(small_corpus):
    return np.concatenate([sf.read(u.path, dtype="float32")[0] for u in load_corpus(small_corpus, "test")[:3]])


def open_stub(address: str):
    channel = grpc.insecure_channel(address)
    return pb_grpc.SimEncoderStub(channel), channel


def collect(stub, requests) -> dict[str, np.ndarray]:
    col = FrameCollector()
    for r in stub.StreamEncode(requests, timeout=60):
        col.add(r)
    return col.arrays()


def endless(stop: threading.Event, every_s: float = 0.05):
    """A stream that sends 10 ms of audio every every_s until stop is set (then half-closes)."""
    yield config_request(SAMPLE_RATE, levels=["m3"])
    noise = (0.1 * np.random.default_rng(0).standard_normal(160)).astype(np.float32)
    while not stop.wait(every_s):
        yield audio_request(noise)


def ended(srv: ServerProcess, outcome: str) -> float:
    return srv.metric("sim_streams_total", outcome=outcome)


def test_a_client_that_never_reads_is_bounded_and_ended_resource_exhausted(server, speech):
    """The writer waits on the client's flow-control window, the stream stops being stepped, its reads
    pause; after --unread-timeout the server frees the stream and the client, when it reads at last,
    gets RESOURCE_EXHAUSTED. Another stream meanwhile gets all its frames, equal to a solo run."""
    stub, channel = open_stub(server.address)
    solo = collect(stub, file_requests(speech, SAMPLE_RATE, 800))
    before_rss, before = server.rss_bytes(), ended(server, "resource_exhausted")
    sent = [0]
    noise = (0.1 * np.random.default_rng(1).standard_normal(1600)).astype(np.float32)

    def flood():
        yield config_request(SAMPLE_RATE)
        while True:  # 100 ms of audio per message, as fast as the server takes it
            sent[0] += 1
            yield audio_request(noise)

    stalled = stub.StreamEncode(flood())  # never read until the end
    try:
        time.sleep(0.5)
        other = collect(stub, file_requests(speech, SAMPLE_RATE, 800))  # while the stalled one floods
        assert {k: v.shape for k, v in other.items()} == {k: v.shape for k, v in solo.items()}
        for k in ("m1", "m2", "m3", "ar"):
            np.testing.assert_array_equal(other[k], solo[k])
        wait_for(lambda: ended(server, "resource_exhausted") > before, timeout=30, what="the stalled stream ended")
        growth = server.rss_bytes() - before_rss
        accepted = sent[0]
        time.sleep(1.0)
        assert sent[0] == accepted, "the server still reads a stream it ended"
        assert growth < 40 << 20, f"server RSS grew {growth / 2**20:.0f} MiB for one stalled stream"
        received = 0
        with pytest.raises(grpc.RpcError) as err:
            for _ in stalled:
                received += 1
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"not read its responses for {UNREAD_S:g} s" in err.value.details()
        assert received > 0  # what was already on its way still arrives, then the status
    finally:
        stalled.cancel()
        channel.close()
    wait_for(lambda: server.metric("sim_active_streams") == 0, what="no stream left open")


def test_a_client_that_vanishes_with_a_tcp_reset_frees_its_stream(server):
    proxy = TcpProxy(server.address).start()
    stub, channel = open_stub(proxy.address)
    stop = threading.Event()
    before = ended(server, "cancelled")
    call = stub.StreamEncode(endless(stop))
    try:
        wait_for(lambda: server.metric("sim_active_streams") == 1, what="the stream open")
        proxy.reset()
        wait_for(lambda: server.metric("sim_active_streams") == 0, timeout=5, what="the reset stream freed")
        assert ended(server, "cancelled") == before + 1
    finally:
        stop.set()
        call.cancel()
        channel.close()
        proxy.close()
    stub, channel = open_stub(server.address)  # and the server serves on
    try:
        assert "m3" in collect(stub, iter([config_request(SAMPLE_RATE), audio_request(np.zeros(1600, np.float32))]))
    finally:
        channel.close()


def test_a_half_open_connection_is_closed_by_keepalive(server):
    """The peer stops answering but nothing closes (no FIN, no RST): keepalive pings go unanswered
    and the server closes the connection and frees the stream within --keepalive + --keepalive-timeout
    (+ slack), long before the idle limit (60 s here)."""
    proxy = TcpProxy(server.address).start()
    stub, channel = open_stub(proxy.address)
    stop = threading.Event()
    call = stub.StreamEncode(endless(stop, every_s=0.2))
    try:
        wait_for(lambda: server.metric("sim_active_streams") == 1, what="the stream open")
        proxy.blackhole()
        t0 = time.monotonic()
        wait_for(lambda: server.metric("sim_active_streams") == 0, timeout=20, what="the half-open stream freed")
        assert time.monotonic() - t0 < 20
    finally:
        stop.set()
        call.cancel()
        channel.close()
        proxy.close()


def test_an_idle_stream_ends_out_of_range_and_frees_its_state(model, tmp_path):
    srv = ServerProcess(model[0], "--idle-timeout", "0.5", log_dir=tmp_path).start()
    stub, channel = open_stub(srv.address)
    stop = threading.Event()
    try:
        def silent():
            yield config_request(SAMPLE_RATE)
            yield audio_request(np.zeros(800, np.float32))
            stop.wait(30)  # then nothing

        with pytest.raises(grpc.RpcError) as err:
            collect(stub, silent())
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
        wait_for(lambda: srv.metric("sim_active_streams") == 0, what="the idle stream freed")
        assert srv.metric("sim_streams_total", outcome="out_of_range") == 1
    finally:
        stop.set()
        channel.close()
        srv.close()


def test_sigkill_under_load_ends_every_client_unavailable_in_bounded_time(model, speech, tmp_path):
    srv = ServerProcess(model[0], log_dir=tmp_path).start()
    audio = np.tile(speech, 20)  # longer than the test: the streams are mid-way when the server dies
    results: dict[int, tuple[grpc.StatusCode, float]] = {}
    n = 6

    def client(i: int) -> None:
        stub, channel = open_stub(srv.address)
        try:
            collect(stub, file_requests(audio, SAMPLE_RATE, 480, realtime=True))
            results[i] = (grpc.StatusCode.OK, time.monotonic())
        except grpc.RpcError as exc:
            results[i] = (exc.code(), time.monotonic())
        finally:
            channel.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: srv.metric("sim_active_streams") == n and srv.metric("sim_frames_total", level="m3") > 0,
                 timeout=30, what="all streams running")
        srv.signal(signal.SIGKILL)
        killed = time.monotonic()
        for t in threads:
            t.join(timeout=10)
        assert len(results) == n, "a client still hangs 10 s after the server died"
        assert {code for code, _ in results.values()} == {grpc.StatusCode.UNAVAILABLE}
        assert max(t for _, t in results.values()) - killed < 5.0
    finally:
        srv.close()


def test_a_worker_process_killed_ends_its_streams_unavailable_and_the_supervisor_fails(model, speech, tmp_path):
    """--workers 2, one worker SIGKILLed mid-stream: its streams end UNAVAILABLE at once, the other
    worker's streams drain and finish OK, and the supervisor exits non-zero (no half-running service)."""
    from serve.launch import metric_value

    srv = ServerProcess(model[0], "--workers", "2", log_dir=tmp_path).start()
    audio = np.tile(speech, 2)
    results: list[grpc.StatusCode] = []

    def one(i: int) -> None:
        with grpc.insecure_channel(srv.address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            try:
                collect(pb_grpc.SimEncoderStub(channel), file_requests(audio, SAMPLE_RATE, 480, realtime=True))
                results.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                results.append(exc.code())

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(6)]
    try:
        for t in threads:
            t.start()

        def open_per_worker() -> list[float]:
            return [metric_value(srv.metrics(p), "sim_active_streams") for p in srv.metrics_ports]

        wait_for(lambda: sum(open_per_worker()) == 6, timeout=30, what="six streams open")
        counts = open_per_worker()
        victim_port = srv.metrics_ports[int(np.argmax(counts))]  # the worker with more streams
        workers = [int(p) for task in Path(f"/proc/{srv.proc.pid}/task").iterdir()
                   for p in (task / "children").read_text().split()]
        victim = next(pid for pid in workers
                      if _listens_on(pid, victim_port))
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        for t in threads:
            t.join(timeout=30)
        assert len(results) == 6, "a client hangs"
        assert results.count(grpc.StatusCode.UNAVAILABLE) == max(counts)
        assert results.count(grpc.StatusCode.OK) == min(counts)
        assert srv.wait(timeout=30) != 0
        assert time.monotonic() - killed < 30
    finally:
        srv.close()


def _listens_on(pid: int, port: int) -> bool:
    """Whether process pid holds the listening socket of a TCP port (its metrics endpoint)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            parts = line.split()
            if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "0A" and parts[9] in inodes:
                return True
    return False
