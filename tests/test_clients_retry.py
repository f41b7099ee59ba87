"""--retry in clients.stream and clients.monitor: the server is killed mid-stream and started again
on the same port; both clients say they open a new stream, and their results equal an undisturbed run."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import soundfile as sf

from clients.retry import RetryPolicy, retryable, with_retry
from serve.launch import ServerProcess
from serve.workers import free_port
from support.serving import PY, ROOT, offline, wait_for
from train.corpus import load_corpus


def test_backoff_doubles_up_to_its_cap_and_only_unavailable_is_retried():
    p = RetryPolicy(retries=7, first_delay_s=0.5, max_delay_s=4.0, jitter=0.0)
    assert [p.delay(i) for i in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert all(0.4 <= RetryPolicy(jitter=0.2).delay(1) <= 0.6 for _ in range(50))

    import grpc

    class Ended(grpc.RpcError):
        def __init__(self, code, details="test"):
            self._code, self._details = code, details

        def code(self):
            return self._code

        def details(self):
            return self._details

    # a proxy's reset of a stream whose server died is retried; other INTERNAL errors are not
    reset = "Stream removed (RST_STREAM with error code 2)"
    assert retryable(Ended(grpc.StatusCode.INTERNAL, reset)) and retryable(Ended(grpc.StatusCode.UNAVAILABLE))
    assert not retryable(Ended(grpc.StatusCode.INTERNAL, "Exception iterating responses"))
    assert not retryable(Ended(grpc.StatusCode.RESOURCE_EXHAUSTED, reset))

    calls, said, slept = [], [], []

    def attempt():
        calls.append(1)
        raise Ended(grpc.StatusCode.UNAVAILABLE if len(calls) < 3 else grpc.StatusCode.INVALID_ARGUMENT)

    with pytest.raises(Ended) as err:
        with_retry(attempt, RetryPolicy(retries=5, jitter=0.0), said.append, sleep=slept.append)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # not retried
    assert len(calls) == 3 and slept == [0.5, 1.0] and len(said) == 2 and "retry 1 of 5" in said[0]

    def unavailable():
        calls.append(1)
        raise Ended(grpc.StatusCode.UNAVAILABLE)

    calls.clear()
    with pytest.raises(Ended) as err:
        with_retry(unavailable, RetryPolicy(retries=1), said.append, sleep=slept.append)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and len(calls) == 2  # retries spent: the last error


def test_stream_and_monitor_open_a_new_stream_after_the_server_is_killed(model, small_corpus, tmp_path):
    audio = np.concatenate([sf.read(u.path, dtype="float32")[0] for u in load_corpus(small_corpus, "test")[:4]])
    wav = tmp_path / "speech.wav"
    sf.write(wav, audio, 16000, subtype="FLOAT")
    port = free_port("127.0.0.1")
    srv = ServerProcess(model[0], "--port", str(port), log_dir=tmp_path).start()
    common = ["--server", srv.address, "--realtime", "--retry", "8", "--retry-backoff", "0.3"]
    events = tmp_path / "events.jsonl"
    procs = [subprocess.Popen([PY, "-m", "clients.stream", str(wav), "--out", str(tmp_path / "s.npz"), *common],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
             subprocess.Popen([PY, "-m", "clients.monitor", str(wav), "--once", "--events", str(events), *common],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    again = None
    try:
        wait_for(lambda: srv.metric("sim_active_streams") == 2 and srv.metric("sim_frames_total", level="m3") > 0,
                 timeout=60, what="both clients streaming")
        srv.kill()
        again = ServerProcess(model[0], "--port", str(port), log_dir=tmp_path).start()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
        srv.close()
        if again is not None:
            again.close()
    (_, stream_err), (_, monitor_err) = outs
    assert procs[0].returncode == 0, stream_err
    assert "UNAVAILABLE" in stream_err and "opening a new stream" in stream_err
    want = offline(model[1], audio)
    got = np.load(tmp_path / "s.npz")
    for level in ("m1", "m2", "m3", "ar"):
        np.testing.assert_allclose(got[level], want[level], atol=1e-4, rtol=1e-5, err_msg=level)
    assert procs[1].returncode in (0, 1), monitor_err  # 1: an alert fired (a random model's scores)
    log = [json.loads(line) for line in events.read_text().splitlines()]
    kinds = [e["event"] for e in log]
    assert "retry" in kinds and kinds[-1] == "end" and "error" not in kinds
    assert log[-1]["frames"] == want["m3"].shape[0]
