"""The real server (`python -m serve`) on a loopback port, driven through real gRPC calls.

Streamed frames equal the offline encoding for several chunkings; concurrent streams equal
their solo results; Info, Decode, health, reflection, metrics; disconnects free their state.
Error codes and limits: test_serve_errors.py; TLS, token and draining: test_serve_ops.py.
"""
from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import soundfile as sf

from clients.collector import FrameCollector
from clients.connection import Connection
from clients.requests import audio_request, config_request, file_requests
from protos.sim.v2 import codec
from protos.sim.v2 import sim_pb2 as pb
from protos.sim.v2 import sim_pb2_grpc as pb_grpc
from serve.launch import ServerProcess
from support.serving import offline, wait_for
from train.audio import SAMPLE_RATE, level_frames
from train.corpus import load_corpus

TOL = 1e-4
LEVELS = ("m1", "m2", "m3", "ar")


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    srv = ServerProcess(model[0], log_dir=tmp_path_factory.mktemp("serve_log")).start()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def conn(server):
    channel = grpc.insecure_channel(server.address)
    grpc.channel_ready_future(channel).result(timeout=10)
    yield Connection(channel, pb_grpc.SimEncoderStub(channel), ())
    channel.close()


@pytest.fixture(scope="module")
def speech(small_corpus):
    """About 1.6 s of real synthesised speech: three test-split words back to back."""
    utts = load_corpus(small_corpus, "test")[:3]
    return np.concatenate([sf.read(u.path, dtype="float32")[0] for u in utts])


def stream(conn, audio, chunks=1600, **kw) -> dict[str, np.ndarray]:
    col = FrameCollector()
    for resp in conn.stub.StreamEncode(file_requests(audio, SAMPLE_RATE, chunks, **kw), metadata=conn.metadata):
        col.add(resp)
    return col.arrays()


def stream_plan(conn, audio, plan, **kw) -> dict[str, np.ndarray]:
    """Stream audio cut by a cycle of chunk sizes."""
    def requests():
        yield config_request(SAMPLE_RATE, **kw)
        pos, i = 0, 0
        while pos < len(audio):
            n = plan[i % len(plan)]
            yield audio_request(audio[pos:pos + n])
            pos, i = pos + n, i + 1

    col = FrameCollector()
    for resp in conn.stub.StreamEncode(requests()):
        col.add(resp)
    return col.arrays()


def assert_matches_offline(got, ref, n_samples):
    counts = level_frames(n_samples)
    for level in LEVELS:
        assert got[level].shape == ref[level].shape == (counts[level], ref[level].shape[1]), level
        np.testing.assert_allclose(got[level], ref[level], atol=TOL, rtol=0, err_msg=level)
        # first and last frames, the ones the zero padding and the flush produce
        np.testing.assert_allclose(got[level][[0, -1]], ref[level][[0, -1]], atol=TOL, rtol=0)
    for level in ("m1", "m2", "m3"):
        np.testing.assert_allclose(got[f"kl_{level}"], ref[f"kl_{level}"], atol=TOL, rtol=1e-5)


@pytest.mark.parametrize("plan", [[1600], [160], [333], [1], [7, 1000, 161, 2, 4000, 159]],
                         ids=["1600", "160", "333", "1", "mixed"])
def test_streamed_equals_offline(conn, model, speech, plan):
    audio = speech if plan != [1] else speech[:4003]  # one message per sample: keep it short
    got = stream_plan(conn, audio, plan)
    assert_matches_offline(got, offline(model[1], audio), len(audio))


@pytest.mark.parametrize("n", [1, 252, 253, 5003])
def test_short_and_odd_lengths_equal_offline(conn, model, speech, n):
    """Shorter than the first frame (253 samples), exactly one frame, and 5003 (32 frames, not 31)."""
    audio = speech[2000:2000 + n]
    got = stream(conn, audio, 100)
    ref = offline(model[1], audio) if level_frames(n)["m3"] > 0 else None
    counts = level_frames(n)
    for level in LEVELS:
        assert got.get(level, np.zeros((0, 1))).shape[0] == counts[level], level
        if ref is not None:
            np.testing.assert_allclose(got[level], ref[level], atol=TOL, rtol=0)


def test_linear16_equals_offline_of_quantised_audio(conn, model, speech):
    q = np.clip(np.round(speech * 32768), -32768, 32767).astype(np.int16)
    got = stream(conn, speech, 800, encoding=pb.LINEAR16)
    assert_matches_offline(got, offline(model[1], q.astype(np.float32) / 32768), len(speech))


def test_frames_carry_index_scores_and_logvar_on_request(conn, model, speech):
    col = FrameCollector()
    responses = list(conn.stub.StreamEncode(file_requests(speech, SAMPLE_RATE, 480, levels=["m2", "ar"],
                                                          return_logvar=True)))
    messages = [m for r in responses for m in r.frames]
    assert {m.level for m in messages} == {"m2", "ar"}
    for r in responses:  # a response may hold several ticks' frames (queued responses are merged)
        col.add(r)
    arrays = col.arrays()
    ref = offline(model[1], speech)
    manifest = __import__("json").loads((model[0] / "manifest.json").read_text())
    cal = manifest["calibration"]["levels"]
    next_index = {"m2": 0, "ar": 0}
    for m in messages:
        assert m.first_index == next_index[m.level] and m.count > 0 and m.dim == (32 if m.level == "m2" else 16)
        next_index[m.level] += m.count
        f = codec.frames_of(m)
        c = cal[m.level]
        score = f.kl if c["score"] == "kl" else f.maha
        np.testing.assert_allclose(f.ood_score, score, rtol=1e-6)
        ref_scores = np.asarray(c["reference"])
        expected_p = (1 + np.sum(ref_scores[None, :] >= f.window_score[:, None], axis=1)) / (len(ref_scores) + 1)
        np.testing.assert_allclose(f.p_value, expected_p, atol=2.0 / len(ref_scores))
        np.testing.assert_array_equal(f.ood, f.window_score > c["threshold"])
        assert (f.kl is not None) == (m.level == "m2")
        assert len(m.logvar) == (4 * 32 * m.count if m.level == "m2" else 0)
    assert next_index == {"m2": ref["m2"].shape[0], "ar": ref["ar"].shape[0]}
    # the window score of frame i is the mean of the per-frame scores of the stream's frames i - W + 1 .. i
    for level in ("m2", "ar"):
        w, score = cal[level]["window_frames"], arrays[f"score_{level}"].astype(np.float64)
        expected = [score[max(0, i - w + 1):i + 1].mean() for i in range(score.size)]
        np.testing.assert_allclose(arrays[f"window_{level}"], expected, rtol=1e-5)
    # log-variances equal the offline posterior's: kl recomputed from them matches
    lv, mu = arrays["logvar_m2"], arrays["m2"]
    kl = 0.5 * (mu ** 2 + np.exp(lv) - 1 - lv).sum(-1)
    np.testing.assert_allclose(kl, ref["kl_m2"], rtol=1e-4, atol=1e-4)


def test_eight_concurrent_streams_equal_their_solo_results(conn, server, speech):
    rng = np.random.default_rng(0)
    audios = [speech[rng.integers(0, 4000):][: 12000 + 997 * i] * (0.5 + 0.1 * i) for i in range(8)]
    chunks = [160, 333, 1600, 800, 161, 4000, 100, 2000]
    solo = [stream(conn, a, c) for a, c in zip(audios, chunks)]
    batches_before = server.metric("sim_batch_size_count") - server.metric("sim_batch_size_bucket", le="1.0")
    results: list = [None] * 8
    barrier = threading.Barrier(8)

    def run(i):
        barrier.wait()
        results[i] = stream(conn, audios[i], chunks[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(8):
        for level in LEVELS:
            np.testing.assert_allclose(results[i][level], solo[i][level], atol=1e-5, rtol=0,
                                       err_msg=f"stream {i} level {level}")
    batched = server.metric("sim_batch_size_count") - server.metric("sim_batch_size_bucket", le="1.0")
    assert batched > batches_before, "no step served more than one stream at once"


def test_info_describes_model_calibration_and_limits(conn, model):
    info = conn.stub.Info(pb.InfoRequest())
    assert info.method == "sim" and info.sample_rate == 16000
    assert (info.hop, info.receptive_field, info.lookahead) == (160, 465, 93)
    levels = {lv.name: lv for lv in info.levels}
    assert list(levels) == list(LEVELS)
    assert [levels[n].dim for n in LEVELS] == [32, 32, 32, 16]
    assert [levels[n].hop_samples for n in LEVELS] == [20, 80, 160, 160]
    assert [levels[n].has_logvar for n in LEVELS] == [True, True, True, False]
    assert [levels[n].has_decoder for n in LEVELS] == [False, False, True, False]
    assert levels["m3"].calibration.score == "maha" and levels["ar"].calibration.score == "maha"
    assert [levels[n].calibration.window_frames for n in LEVELS] == [240, 60, 30, 30]  # 0.3 s at each rate
    assert levels["m3"].calibration.n_ref > 0 and levels["m3"].calibration.fpr == pytest.approx(0.01)
    assert info.versions["api"] == "sim.v2" and info.versions["onnxruntime"]
    assert info.versions["step_precision"] == "fp32" and info.versions["calibration_measured_with"] == "fp32 step"
    assert info.limits.max_streams == 64 and "CPUExecutionProvider" in info.providers


def test_decode_returns_the_exported_decoders_audio(conn, model, speech):
    import torch

    from export.random_model import decoders_of
    from train.decoder import load_decoder

    z = offline(model[1], speech)["m3"]
    resp = conn.stub.Decode(pb.DecodeRequest(level="m3", num_frames=z.shape[0], latents=codec.pack(z)))
    dec, _ = load_decoder(decoders_of(model[0]) / "decoder_m3.pt")
    with torch.no_grad():
        ref = dec(torch.from_numpy(z)[None])[0].numpy()
    assert resp.sample_rate == 16000
    np.testing.assert_allclose(codec.unpack(resp.audio, len(resp.audio) // 4), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("req,code,text", [
    (dict(level="m1", num_frames=1, latents=bytes(4 * 32)), grpc.StatusCode.NOT_FOUND, "no decoder for level 'm1'"),
    (dict(level="ar", num_frames=1, latents=bytes(4 * 16)), grpc.StatusCode.NOT_FOUND, "has no decoder"),
    (dict(level="m9", num_frames=1, latents=bytes(4 * 32)), grpc.StatusCode.INVALID_ARGUMENT, "unknown level"),
    (dict(level="m3", num_frames=2, latents=bytes(4 * 32)), grpc.StatusCode.INVALID_ARGUMENT, "needs num_frames x 32"),
    (dict(level="m3", num_frames=1, latents=bytes(4 * 32 + 2)), grpc.StatusCode.INVALID_ARGUMENT, "not a multiple of 4"),
    (dict(level="m3", num_frames=0), grpc.StatusCode.INVALID_ARGUMENT, "at least 1"),
    (dict(level="m3", num_frames=1, latents=codec.pack(np.full(32, np.nan))), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
])
def test_decode_errors(conn, req, code, text):
    with pytest.raises(grpc.RpcError) as err:
        conn.stub.Decode(pb.DecodeRequest(**req))
    assert err.value.code() == code and text in err.value.details()


def test_disconnect_mid_stream_frees_its_state(conn, server, speech):
    cancelled_before = server.metric("sim_streams_total", outcome="cancelled")
    stop = threading.Event()

    def endless():
        yield config_request(SAMPLE_RATE)
        i = 0
        while not stop.is_set():
            yield audio_request(speech[(i * 160) % 16000:][:160])
            i += 1
            stop.wait(0.002)

    call = conn.stub.StreamEncode(endless())
    next(iter(call))  # frames are flowing
    assert server.metric("sim_active_streams") == 1
    call.cancel()
    stop.set()
    wait_for(lambda: server.metric("sim_active_streams") == 0, what="active streams back to 0")
    wait_for(lambda: server.metric("sim_streams_total", outcome="cancelled") == cancelled_before + 1,
             what="the cancelled stream counted")
    # the server still serves
    assert stream(conn, speech[:3200])["m3"].shape[0] == level_frames(3200)["m3"]


def test_health_reflection_and_metrics(server, conn, speech):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    health = health_pb2_grpc.HealthStub(conn.channel)
    for service in ("", "sim.v2.SimEncoder"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    services = set(ProtoReflectionDescriptorDatabase(conn.channel).get_services())
    assert {"sim.v2.SimEncoder", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    desc = ProtoReflectionDescriptorDatabase(conn.channel).FindFileContainingSymbol("sim.v2.SimEncoder")
    assert [m.name for m in desc.service[0].method] == ["StreamEncode", "Info", "Decode"]

    frames_before = server.metric("sim_frames_total", level="m3")
    ok_before = server.metric("sim_streams_total", outcome="ok")
    audio_before = server.metric("sim_audio_seconds_total")
    got = stream(conn, speech, 1600)
    text = server.metrics()
    for name in ("sim_frame_latency_seconds_bucket", "sim_batch_size_bucket", "sim_active_streams",
                 "sim_ood_score_bucket", "sim_flagged_frames_total", "sim_streams_total", "sim_audio_seconds_total"):
        assert name in text, name
    from serve.launch import metric_value

    assert metric_value(text, "sim_frames_total", level="m3") == frames_before + got["m3"].shape[0]
    assert metric_value(text, "sim_streams_total", outcome="ok") == ok_before + 1
    assert metric_value(text, "sim_audio_seconds_total") == pytest.approx(audio_before + speech.size / 16000)
    assert metric_value(text, "sim_frame_latency_seconds_count") > 0
    assert metric_value(text, "sim_ood_score_count", level="m3") >= got["m3"].shape[0]
    assert "stream_id" not in text and "peer" not in text  # no per-stream labels
