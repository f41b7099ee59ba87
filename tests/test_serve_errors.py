"""Every StreamEncode error code, with its message, against the real server; and that one bad
stream never harms another."""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import soundfile as sf

from clients.collector import FrameCollector
from clients.requests import audio_request, file_requests
from protos.sim.v2 import codec
from protos.sim.v2 import sim_pb2 as pb
from protos.sim.v2 import sim_pb2_grpc as pb_grpc
from serve.launch import ServerProcess
from support.serving import wait_for
from train.audio import SAMPLE_RATE
from train.corpus import load_corpus

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    """Default limits, except a short idle timeout."""
    srv = ServerProcess(model[0], "--idle-timeout", "0.6", log_dir=tmp_path_factory.mktemp("log")).start()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def tight(model, tmp_path_factory):
    """Small limits: 64 KiB messages, 2 streams, 1 s of audio per stream."""
    srv = ServerProcess(model[0], "--max-message-bytes", "65536", "--max-streams", "2", "--max-stream-seconds", "1",
                        "--idle-timeout", "5", log_dir=tmp_path_factory.mktemp("log")).start()
    yield srv
    srv.close()


def stub(srv):
    channel = grpc.insecure_channel(srv.address)
    return pb_grpc.SimEncoderStub(channel), channel


@pytest.fixture(scope="module")
def speech(small_corpus):
    utts = load_corpus(small_corpus, "test")[:2]
    return np.concatenate([sf.read(u.path, dtype="float32")[0] for u in utts])


def run(stub_, requests) -> tuple[list, grpc.RpcError | None]:
    responses = []
    try:
        for r in stub_.StreamEncode(iter(requests), timeout=30):
            responses.append(r)
    except grpc.RpcError as exc:
        return responses, exc
    return responses, None


def cfg(**kw):
    base = dict(sample_rate=16000, encoding=pb.FLOAT32)
    base.update(kw)
    return pb.StreamEncodeRequest(config=pb.StreamConfig(**base))


AUDIO = audio_request(np.zeros(1600, np.float32))


@pytest.mark.parametrize("requests,text", [
    ([AUDIO], "audio before config"),
    ([cfg(), AUDIO, cfg()], "config sent twice"),
    ([cfg(sample_rate=44100), AUDIO], "sample_rate is 44100"),
    ([cfg(sample_rate=8000)], "sample_rate is 8000"),
    ([cfg(encoding=pb.AUDIO_ENCODING_UNSPECIFIED)], "AUDIO_ENCODING_UNSPECIFIED is not supported"),
    ([cfg(encoding=7)], "not supported"),
    ([cfg(levels=["m1", "m7"])], "'m7'"),
    ([cfg(levels=["m1", "m1"])], "twice"),
    ([cfg(encoding=pb.LINEAR16), pb.StreamEncodeRequest(audio=b"\x00\x01\x02")], "3 bytes, not a multiple of 2"),
    ([cfg(), pb.StreamEncodeRequest(audio=b"\x00" * 6)], "6 bytes, not a multiple of 4"),
    ([cfg(), audio_request(np.array([0.1, np.nan, 0.2], np.float32))], "NaN or infinite samples (first at sample 1 "),
    ([cfg(), AUDIO, audio_request(np.array([0.1, 0.2, np.nan], np.float32))], "first at sample 1602 of the stream"),
    ([cfg(), audio_request(np.array([0.1, np.inf], np.float32))], "NaN or infinite"),
    ([cfg(), AUDIO, audio_request(np.array([0.5, 1e30], np.float32))], "magnitude 1e+30, above the limit of 10 "
                                                                        "(audio is nominally in [-1, 1]; scale it) "
                                                                        "(first at sample 1601 "),
    ([cfg(), pb.StreamEncodeRequest()], "empty message"),
    ([pb.StreamEncodeRequest()], "got an empty message"),
], ids=["audio-first", "config-twice", "rate-44100", "rate-8000", "encoding-unspecified", "encoding-unknown",
        "level-unknown", "level-twice", "linear16-odd-bytes", "float32-odd-bytes", "nan", "nan-later", "inf", "huge",
        "empty", "empty-first"])
def test_invalid_argument(server, requests, text):
    s, ch = stub(server)
    try:
        _, err = run(s, requests)
    finally:
        ch.close()
    assert err is not None and err.code() == INVALID, err
    assert text in err.details()


def test_error_after_frames_keeps_the_frames_sent(server, speech):
    s, ch = stub(server)
    try:
        responses, err = run(s, [cfg(), audio_request(speech[:8000]), audio_request(np.array([np.nan], np.float32))])
    finally:
        ch.close()
    assert err.code() == INVALID
    # frames of the good audio may or may not have been sent before the error; any sent are valid
    for r in responses:
        for m in r.frames:
            assert np.isfinite(codec.frames_of(m).mu).all()


def test_idle_too_long(server):
    def requests():
        yield cfg()
        yield AUDIO
        time.sleep(1.5)  # longer than --idle-timeout 0.6
        yield AUDIO

    s, ch = stub(server)
    try:
        _, err = run(s, requests())
    finally:
        ch.close()
    assert err.code() == grpc.StatusCode.OUT_OF_RANGE and "idle too long" in err.details()


def test_idle_before_config(server):
    def requests():
        time.sleep(1.5)
        yield cfg()

    s, ch = stub(server)
    try:
        _, err = run(s, requests())
    finally:
        ch.close()
    assert err.code() == grpc.StatusCode.OUT_OF_RANGE and "config" in err.details()


def test_message_too_large(tight):
    before = tight.metric("sim_streams_total", outcome="resource_exhausted") or 0
    s, ch = stub(tight)
    try:
        _, err = run(s, [cfg(), audio_request(np.zeros(20000, np.float32))])  # 80 kB > 64 KiB
    finally:
        ch.close()
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in err.details()
    wait_for(lambda: tight.metric("sim_streams_total", outcome="resource_exhausted") == before + 1,
             what="the over-size stream counted as resource_exhausted")
    assert not tight.metric("sim_streams_total", outcome="cancelled")


def test_a_stream_without_audio_ends_ok_with_no_frames(server):
    s, ch = stub(server)
    try:
        responses, err = run(s, [cfg(), pb.StreamEncodeRequest(audio=b"")])
    finally:
        ch.close()
    assert err is None and responses == []


def test_a_client_that_sends_nothing_ends_ok_and_is_counted_ok(server):
    before = server.metric("sim_streams_total", outcome="ok") or 0
    s, ch = stub(server)
    try:
        responses, err = run(s, [])
    finally:
        ch.close()
    assert err is None and responses == []
    wait_for(lambda: server.metric("sim_streams_total", outcome="ok") == before + 1, what="the stream counted ok")
    assert not server.metric("sim_streams_total", outcome="internal")


def test_stream_too_long(tight, speech):
    s, ch = stub(tight)
    try:
        responses, err = run(s, [cfg(levels=["m3"])] + [audio_request(speech[:1600])] * 12)  # 1.2 s > 1 s
    finally:
        ch.close()
    assert err.code() == grpc.StatusCode.OUT_OF_RANGE and "exceeds the limit of 16000 samples" in err.details()


def test_too_many_streams(tight):
    s, ch = stub(tight)
    stop = threading.Event()

    def slow():
        yield cfg(levels=["m3"])
        while not stop.is_set():
            stop.wait(0.2)
            yield audio_request(np.zeros(16, np.float32))

    held = [s.StreamEncode(slow()) for _ in range(2)]
    try:
        wait_for(lambda: tight.metric("sim_active_streams") == 2, what="two open streams")
        _, err = run(s, [cfg(), AUDIO])
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 2" in err.details()
    finally:
        stop.set()
        for call in held:
            call.cancel()
        ch.close()
    wait_for(lambda: tight.metric("sim_active_streams") == 0, what="streams closed")
    assert tight.metric("sim_streams_total", outcome="resource_exhausted") >= 1


def test_a_bad_stream_does_not_harm_the_others(server, speech):
    """Good streams run while bad ones fail next to them; the good results equal a solo run."""
    s, ch = stub(server)

    def collect(requests):
        col = FrameCollector()
        for r in s.StreamEncode(requests):
            col.add(r)
        return col.arrays()

    solo = collect(file_requests(speech, SAMPLE_RATE, 480))
    results, errors = {}, []

    def good(i):
        results[i] = collect(file_requests(speech, SAMPLE_RATE, 480, realtime=False))

    def bad(i):
        nan = audio_request(np.full(160, np.nan, np.float32))
        _, err = run(s, [cfg(), audio_request(speech[:4000]), nan])
        errors.append(err.code())

    threads = [threading.Thread(target=good, args=(i,)) for i in range(3)] + \
              [threading.Thread(target=bad, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ch.close()
    assert errors == [INVALID] * 3
    for i in range(3):
        for level in ("m1", "m2", "m3", "ar"):
            np.testing.assert_allclose(results[i][level], solo[level], atol=1e-5, rtol=0)
