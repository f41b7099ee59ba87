"""Small pieces of the server, checked against the reference implementations they replace."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from protos.sim.v2 import codec
from protos.sim.v2 import sim_pb2 as pb
from serve.metrics import SCORE_BUCKETS, Metrics
from serve.responses import ResponseBuilder
from serve.scoring import WindowHistory, p_value, rolling_mean


def _window_mean(score: np.ndarray, window: int) -> np.ndarray:
    """Frame i's mean over frames max(0, i - window + 1) .. i, one frame at a time."""
    return np.array([score[max(0, i - window + 1):i + 1].mean() for i in range(score.size)])


def _reference_response(manifest: dict, popped: dict, levels, return_logvar: bool) -> pb.StreamEncodeResponse:
    """The response written out field by field from the runtime's arrays and the manifest (the obvious way)."""
    cal = manifest["calibration"]["levels"]
    resp = pb.StreamEncodeResponse()
    for level in levels:
        frames = popped.get(level)
        if frames is None or not len(frames["index"]):
            continue
        c = cal.get(level)
        score = frames[c["score"] if c else ("kl" if "kl" in frames else "maha")].astype(np.float64)
        n, dim = frames["mu"].shape
        m = resp.frames.add(level=level, first_index=int(frames["index"][0]), count=n, dim=dim,
                            mu=frames["mu"].astype("<f4").tobytes(), maha=frames["maha"].astype("<f4").tobytes(),
                            ood_score=score.astype("<f4").tobytes())
        if return_logvar and "logvar" in frames:
            m.logvar = frames["logvar"].astype("<f4").tobytes()
        if "kl" in frames:
            m.kl = frames["kl"].astype("<f4").tobytes()
        if c:
            window = _window_mean(score, c.get("window_frames", 1))
            m.window_score = window.astype("<f4").tobytes()
            m.p_value = p_value(np.asarray(c["reference"]), window).astype("<f4").tobytes()
            m.ood = (window > c["threshold"]).astype(np.uint8).tobytes()
        else:
            m.ood = bytes(n)
    return resp


@pytest.mark.parametrize("return_logvar", [False, True])
def test_response_bytes_parse_to_the_message_written_field_by_field(return_logvar):
    rng = np.random.default_rng(3)
    reference = np.sort(rng.gamma(2.0, 50.0, 500))
    manifest = {"calibration": {"fpr": 0.01, "levels": {
        "m1": {"score": "kl", "reference": reference.tolist(), "threshold": float(reference[-5]), "window_frames": 1},
        "ar": {"score": "maha", "reference": reference.tolist(), "threshold": float(reference[-5])}}}}
    builder = ResponseBuilder(manifest, ["m1", "m3", "ar"])
    popped = {}
    # frame indices far from 0; m3 has no calibration (no p_value)
    for level, dim, start, n in (("m1", 512, 120, 12), ("m3", 7, 16380, 6), ("ar", 3, 0, 2)):
        frames = {"index": np.arange(start, start + n, dtype=np.int64),
                  "mu": rng.standard_normal((n, dim)).astype(np.float32),
                  "maha": rng.gamma(2.0, 50.0, n).astype(np.float32)}
        frames["mu"][0, 0] = -0.0
        frames["maha"][1] = 1e6  # flagged where maha is the score (ar)
        if level != "ar":
            frames["logvar"] = rng.standard_normal((n, dim)).astype(np.float32)
            frames["kl"] = rng.gamma(2.0, 60.0, n).astype(np.float32)
            frames["kl"][2] = 1e6  # flagged where kl is the score (m1)
        popped[level] = frames
    levels = ("m1", "m3", "ar")
    data, scored = builder.response(popped, levels, return_logvar, WindowHistory())
    parsed = pb.StreamEncodeResponse.FromString(data)
    expected = _reference_response(manifest, popped, levels, return_logvar)
    assert parsed == expected and [m.level for m in parsed.frames] == list(levels)
    assert sum(m.count for m in parsed.frames) == 20
    flags = b"".join(m.ood for m in parsed.frames)
    assert 1 in flags and 0 in flags
    assert [s.level for s in scored] == list(levels)
    # two responses written back to back are one response with the frames of both
    merged = pb.StreamEncodeResponse.FromString(data + data)
    assert list(merged.frames) == list(expected.frames) * 2
    assert builder.response({"m1": {**popped["m1"], "index": np.zeros(0, np.int64)}}, ("m1",), False,
                            WindowHistory())[0] is None


def test_bulk_histogram_exports_what_a_prometheus_histogram_would():
    values = {"m3": [0.05, 0.1, 0.2, 5.0, 1e7, 0.1, 3.3], "ar": [40.0, 0.0]}
    metrics = Metrics()
    reference = CollectorRegistry()
    hist = Histogram("sim_ood_score", "x", ["level"], buckets=SCORE_BUCKETS, registry=reference)
    for level, vals in values.items():
        metrics.ood_score.observe_many(level, np.asarray(vals[:3]))
        metrics.ood_score.observe_many(level, np.asarray(vals[3:]))
        for v in vals:
            hist.labels(level).observe(v)

    def samples(registry):
        return sorted(line for line in generate_latest(registry).decode().splitlines()
                      if line.startswith("sim_ood_score") and "_created" not in line)

    assert samples(metrics.registry) == samples(reference)


def test_batched_responses_equal_each_streams_own_response():
    """responses() scores a level's frames of all streams together: each stream must still get
    exactly its own frames, whatever its levels, logvar choice and index range."""
    rng = np.random.default_rng(5)
    reference = np.sort(rng.gamma(2.0, 50.0, 300))
    manifest = {"calibration": {"fpr": 0.01, "levels": {
        lv: {"score": "kl" if lv != "ar" else "maha", "reference": reference.tolist(),
             "threshold": float(reference[-3]), "window_frames": w} for lv, w in (("m1", 5), ("m3", 3), ("ar", 1))}}}
    builder = ResponseBuilder(manifest, ["m1", "m3", "ar"])
    dims = {"m1": 6, "m3": 5, "ar": 4}

    def popped(start: int) -> dict:
        out = {}
        for level in ("m1", "m3", "ar"):  # two hops: 16 m1 frames, 2 of m3 and ar
            s, n = (start * 8, 16) if level == "m1" else (start, 2)
            frames = {"index": np.arange(s, s + n, dtype=np.int64),
                      "mu": rng.standard_normal((n, dims[level])).astype(np.float32),
                      "maha": rng.gamma(2.0, 50.0, n).astype(np.float32)}
            if level != "ar":
                frames["logvar"] = rng.standard_normal((n, dims[level])).astype(np.float32)
                frames["kl"] = rng.gamma(2.0, 50.0, n).astype(np.float32)
            out[level] = frames
        return out

    requests = [(popped(0), ("m1", "m3", "ar"), False), (popped(2047), ("m1", "ar"), True),
                (popped(15), ("m1", "m3"), True), (popped(300000), ("m1", "m3", "ar"), False),
                ({}, ("m1",), False), (popped(7), ("ar",), False)]
    data, scored = builder.responses([(*r, WindowHistory()) for r in requests])
    assert data[4] is None
    for (p, levels, lv), got in zip(requests, data):
        if p:
            alone, _ = builder.response(p, levels, lv, WindowHistory())
            assert got == alone
            assert pb.StreamEncodeResponse.FromString(got) == _reference_response(manifest, p, levels, lv)
    n_frames = {lv: sum(len(p[lv]["index"]) for p, levels, _ in requests if lv in levels and p) for lv in dims}
    assert {lv: sum(s.score.size for s in parts) for lv, parts in scored.items()} == n_frames


def test_window_scores_continue_across_responses_and_streams_keep_their_own():
    """A stream's frames scored over several responses get the windows of the whole stream; a
    second stream in the same batches has its own history."""
    rng = np.random.default_rng(11)
    reference = np.sort(rng.gamma(2.0, 50.0, 400))
    manifest = {"calibration": {"fpr": 0.01, "levels": {"m3": {"score": "maha", "reference": reference.tolist(),
                                                               "threshold": float(reference[-4]), "window_frames": 7}}}}
    builder = ResponseBuilder(manifest, ["m3"])
    scores = [rng.gamma(2.0, 50.0, 23), rng.gamma(2.0, 50.0, 23)]
    scores[1][9] = 1e5  # one spike: raises the window of 7 frames, no more
    histories = [WindowHistory(), WindowHistory()]
    got = [[], []]
    for a, b in ((0, 1), (1, 6), (6, 7), (7, 16), (16, 23)):
        reqs = []
        for s in scores:
            n = b - a
            reqs.append(({"m3": {"index": np.arange(a, b), "mu": np.zeros((n, 2), np.float32),
                                 "maha": s[a:b].astype(np.float32)}}, ("m3",), False))
        data, _ = builder.responses([(*r, h) for r, h in zip(reqs, histories)])
        for i, d in enumerate(data):
            got[i].append(codec.frames_of(pb.StreamEncodeResponse.FromString(d).frames[0]))
    for s, parts in zip(scores, got):
        window = np.concatenate([f.window_score for f in parts])
        expected = _window_mean(s.astype(np.float32).astype(np.float64), 7)
        np.testing.assert_allclose(window, expected, rtol=1e-6)
        np.testing.assert_array_equal(np.concatenate([f.ood for f in parts]), expected > reference[-4])
    ood = np.concatenate([f.ood for f in got[1]])
    assert ood[9:16].all() and not ood[16:].any()


def test_rolling_mean_and_flags_of_non_finite_scores():
    s = np.array([1.0, 2.0, np.nan, 4.0, 5.0, 6.0, np.inf, 1.0, 1.0, 1.0])
    w = rolling_mean(s, 3)
    assert np.isnan(w[2:5]).all() and np.isinf(w[6:9]).all()  # only the windows that hold them
    np.testing.assert_allclose(w[[0, 1, 5, 9]], [1.0, 1.5, 5.0, 1.0])
    from serve.scoring import flags

    assert flags(w, 100.0).tolist() == [False, False, True, True, True, False, True, True, True, False]
    assert p_value(np.arange(10.0), np.array([np.nan]))[0] == pytest.approx(1 / 11)
    np.testing.assert_allclose(rolling_mean(s[5:], 3, history=s[:5][-2:] * 0 + [4.0, 5.0]), w[5:])
    with pytest.raises(ValueError):
        rolling_mean(s, 0)


def test_metrics_stay_finite_when_scores_are_not():
    from serve.scoring import ScoredFrames

    metrics = Metrics()
    score = np.array([1.0, np.nan, np.inf, 3.0])
    metrics.count_frames({"m3": [ScoredFrames("m3", score, score, None, np.array([False, True, True, False]))]})
    text = generate_latest(metrics.registry).decode()
    lines = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"}
    assert lines['sim_ood_score_sum{level="m3"}'] == 4.0
    assert lines['sim_ood_score_count{level="m3"}'] == 4.0
    assert lines['sim_ood_score_bucket{le="+Inf",level="m3"}'] == 4.0
    assert lines['sim_nonfinite_scores_total{level="m3"}'] == 2.0
    assert lines['sim_flagged_frames_total{level="m3"}'] == 2.0


def test_tick_hops_steps_real_time_streams_together_and_files_in_bulk():
    from serve.engine import tick_hops

    assert tick_hops([1] * 10 + [2] * 2, 8) == 1  # two early messages wait for the next tick
    assert tick_hops([2] * 7 + [1] * 5, 8) == 2  # most streams have two: two runs
    assert tick_hops([40], 8) == 8  # a lone file: up to the cap
    assert tick_hops([0, 0, 5, 5, 1], 8) == 5 and tick_hops([0, 0], 8) == 1 and tick_hops([], 8) == 1


def _tick_plan(hop: int, hops: list[int], rng):
    """A TickRequest opening len(hops) streams with the given hops of random audio each."""
    from serve.engine import TickRequest

    return TickRequest(opens=[(i, ("m1", "m3"), i % 2 == 0, pb.FLOAT32) for i in range(len(hops))],
                       audio={i: (0.1 * rng.standard_normal(n * hop + 7)).astype("<f4").tobytes()
                              for i, n in enumerate(hops)})


def test_engine_defers_an_early_hop_but_lets_a_stream_far_behind_catch_up(model):
    """Engine.tick on a real model: ten streams with one hop and one with two step one hop each
    (the second waits for the next tick); a stream CATCH_UP_HOPS or more behind steps all its hops."""
    from serve.engine import CATCH_UP_HOPS, Engine, TickRequest
    from serve.runtime import StreamingModel

    m = StreamingModel(model[0])
    engine = Engine(m, max_hops_per_tick=8)
    hops = [1] * 10 + [2, CATCH_UP_HOPS + 2]
    reply = engine.tick(_tick_plan(m.hop, hops, np.random.default_rng(0)))
    assert not reply.errors and reply.batch == len(hops) and reply.more
    assert reply.decoded == sum(n * m.hop + 7 for n in hops)
    stepped = [1] * 11 + [CATCH_UP_HOPS + 2]
    assert [(sid, done, processed) for sid, _, done, processed in reply.results] == \
        [(i, False, n * m.hop) for i, n in enumerate(stepped)]
    assert [engine.streams[i].runtime.frames_emitted("m3") for i in range(len(hops))] == \
        [n - 1 for n in stepped]  # the first hop has no m3 frame yet (phantom frames)
    reply = engine.tick(TickRequest())  # nothing new: the deferred hop
    assert [r[0] for r in reply.results] == [10] and not reply.more
    assert engine.streams[0].ready_samples() == 7
    reply = engine.tick(TickRequest(closed=[0], removed=[1]))  # a half-close flushes; a removal frees
    assert [(r[0], r[2]) for r in reply.results] == [(0, True)] and 0 not in engine.streams
    assert 1 not in engine.streams and len(engine.streams) == len(hops) - 2


def test_engine_reports_bad_audio_as_that_streams_error_only(model):
    from serve.engine import Engine, TickRequest
    from serve.runtime import StreamingModel

    m = StreamingModel(model[0])
    engine = Engine(m)
    bad = np.zeros(m.hop * 2, np.float32)
    bad[170] = np.nan
    reply = engine.tick(TickRequest(opens=[(1, ("m3",), False, pb.FLOAT32), (2, ("m3",), False, pb.FLOAT32)],
                                    audio={1: bad.tobytes(), 2: np.zeros(m.hop * 2, "<f4").tobytes()}))
    assert [(sid, code) for sid, code, _ in reply.errors] == [(1, grpc.StatusCode.INVALID_ARGUMENT)]
    assert "170" in reply.errors[0][2]  # the sample's position in the stream
    assert [r[0] for r in reply.results] == [2] and list(engine.streams) == [2]


def test_a_failing_step_ends_only_that_ticks_streams_and_the_engine_serves_on(model):
    """An exception inside the batched step (a server bug, or onnxruntime failing) ends the streams
    of that tick with INTERNAL; the engine thread keeps its other streams and serves the next tick
    (built on the event loop as in the server), and a new stream gives the frames a fresh model gives."""
    import asyncio

    from serve.engine import EngineThread, TickRequest
    from serve.runtime import StreamingModel

    m = StreamingModel(model[0])
    engine = EngineThread(m)
    real = m.decode_streams
    calls = []

    def failing_once(streams):
        calls.append(len(list(streams)))
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return real(streams)

    m.decode_streams = failing_once
    rng = np.random.default_rng(3)
    audio = (0.1 * rng.standard_normal(3 * m.hop)).astype("<f4").tobytes()

    async def main():
        try:
            first = engine.finish(await engine.tick(TickRequest(opens=[(1, ("m3",), False, pb.FLOAT32)],
                                                                audio={1: audio})))
            assert [(sid, code) for sid, code, _ in first.errors] == [(1, grpc.StatusCode.INTERNAL)]
            assert "injected failure" in first.errors[0][2] and first.results == [] and not engine.engine.streams
            second = engine.finish(await engine.tick(TickRequest(opens=[(2, ("m3",), False, pb.FLOAT32)],
                                                                 audio={2: audio}, closed=[2])))
            return second
        finally:
            await engine.stop()

    second = asyncio.run(main())
    assert not second.errors and [(sid, done) for sid, _, done, _ in second.results] == [(2, True)]
    got = pb.StreamEncodeResponse.FromString(second.results[0][1])
    fresh = StreamingModel(model[0])
    s = fresh.create_stream()
    s.accept_waveform(np.frombuffer(audio, "<f4"))
    s.input_finished()
    fresh.decode_streams([s])
    np.testing.assert_array_equal(np.concatenate([codec.frames_of(f).mu for f in got.frames]), s.pop_frames()["m3"]["mu"])


def test_ready_lines_parse_back_to_what_was_printed():
    from serve import announce

    one = announce.parse(announce.listening("::1", 50051, "plaintext; model m, method sim, levels m1 ar") + "\n")
    assert one == ("listening", 50051, 1, "plaintext; model m, method sim, levels m1 ar")
    two = announce.parse(announce.listening("127.0.0.1", 7, "2 workers; TLS, token; model m"))
    assert (two.port, two.workers, two.detail) == (7, 2, "TLS, token; model m")
    assert announce.parse("worker 1 " + announce.metrics("0.0.0.0", 9100)) == ("metrics", 9100, 1, "")
    assert announce.parse("stopped") is None and announce.parse("listening on nothing") is None
