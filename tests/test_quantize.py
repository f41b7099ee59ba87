"""export --int8: the statically quantized streaming step (export.quantize)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from export.quantize import STEP_FP32
from export.streams import encode_streaming, encode_streams
from serve.model_dir import MANIFEST, load_manifest
from serve.runtime import StreamingModel
from support.exports import one_torch_thread, write_checkpoint
from train.audio import SAMPLE_RATE, load_audio
from train.corpus import load_corpus


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory, small_corpus):
    from conftest import write_audio
    from export.onnx import main

    root = tmp_path_factory.mktemp("int8")
    ckpt = write_checkpoint(root / "sim.pt", "sim", seed=3)
    t = np.arange(24000) / 48000.0  # recordings unlike the words, at another rate: a chirp and a noise burst
    write_audio(root / "check" / "chirp.wav", 0, rate=48000,
                data=(0.3 * np.sin(2 * np.pi * (200 + 3000 * t) * t)).astype(np.float32)[:, None])
    write_audio(root / "check" / "burst.flac", 8000)
    # A random encoder's m3 quantizes worse than a trained one's (5.3 % relative RMS error with this
    # seed, from before the check on wider audio): the plumbing is tested here under a 10 % bar;
    # the 5 % bar itself is tested in test_an_int8_step_that_misses_the_accuracy_bar_...
    with one_torch_thread(), pytest.MonkeyPatch.context() as mp:
        mp.setattr("export.quantize.MAX_REL_RMS", 0.1)
        assert main([str(ckpt), "--out", str(root / "model"), "--corpus", str(small_corpus),
                     "--calibration-clips", "12", "--skip-verify", "--int8", "--int8-check", str(root / "check")]) == 0
    return root / "model"


def test_int8_export_writes_a_loadable_measured_manifest(int8_model):
    man = load_manifest(int8_model, verify=True)  # hashes of the int8 step and the kept fp32 step
    assert man["precision"]["step"] == "int8" and man["files"][STEP_FP32]["role"] == "step-fp32"
    q = man["quantization"]
    assert set(q["accuracy"]) == {"m1", "m2", "m3", "ar"}
    for level, acc in q["accuracy"].items():
        assert 0.0 < acc["rel_rms_err"] <= q["max_rel_rms_err"] and acc["min_cosine"] > 0.99, (level, acc)
    # measured on audio unlike the calibration words too, each within the bar
    by_signal = q["accuracy_by_signal"]
    assert set(by_signal) == {"calibration words", "white noise", "pure tones",
                              f"recordings in {int8_model.parent / 'check'}"}
    assert by_signal["calibration words"] == q["accuracy"]
    for name, per_level in by_signal.items():
        assert set(per_level) == {"m1", "m2", "m3", "ar"}
        assert all(0.0 < a["rel_rms_err"] <= q["max_rel_rms_err"] for a in per_level.values()), (name, per_level)
    assert man["calibration"]["measured_with"] == "int8 step"
    # the quantized Gemms are conv layers 2-5 (k x 32 inputs): not the first conv, the heads or the scorers
    graph = onnx.load(str(int8_model / STEP_FP32)).graph
    weights = {i.name: list(i.dims) for i in graph.initializer}
    gemms = {n.name: weights[n.input[1]] for n in graph.node if n.op_type == "Gemm"}
    assert [gemms[n] for n in q["nodes"]] == [[8 * 32, 32], [4 * 32, 32], [4 * 32, 32], [4 * 32, 32]]
    # per-row int8: the heads (32 inputs, mu and logvar: 64 outputs; m1's in two parts) and every scorer
    heads = [n for n, shape in gemms.items() if shape == [32, 64]]
    assert len(heads) == 3
    assert sorted(q["row_quantized"]) == sorted(heads + ["/m1/Gemm", "/m2/Gemm", "/m3/Gemm", "/ar/Gemm"])
    assert q["two_part"] == heads[:1]
    ops = [n.op_type for n in onnx.load(str(int8_model / "step.onnx")).graph.node]
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(ops) and ops.count("MatMulInteger") == 7
    assert ops.count("Gemm") == 1 + len(q["nodes"])  # fp32: the first conv; QDQ: the convs


def test_int8_step_tracks_fp32_on_unseen_audio_and_ignores_its_batch(int8_model, small_corpus):
    int8 = StreamingModel(int8_model)
    audios = [load_audio(u.path) for u in load_corpus(small_corpus, "train")[:3]]
    # the fp32 step of the same export, on the same audio: int8 stays close
    import shutil
    fp32_dir = int8_model.parent / "fp32_view"
    if not fp32_dir.exists():
        shutil.copytree(int8_model, fp32_dir)
        shutil.copyfile(fp32_dir / STEP_FP32, fp32_dir / "step.onnx")
    fp32 = StreamingModel(fp32_dir, verify=False)
    for audio in audios:
        a, b = encode_streaming(int8, audio, 160), encode_streaming(fp32, audio, 160)
        for level in int8.levels:
            err = np.linalg.norm(a[level] - b[level]) / np.linalg.norm(b[level])
            assert err < 0.1, (level, err)  # the random encoder's m3: about 5 % (see int8_model)
            assert not np.array_equal(a[level], b[level])  # it really is a different graph
    # fixed activation scales: a stream's int8 frames are the same alone and in any batch
    noise = (0.3 * np.random.default_rng(0).standard_normal(3000)).astype(np.float32)
    together = encode_streams(int8, audios + [noise], [[160], [333], [1000, 7], [50]])
    for audio, plan, got in zip(audios + [noise], [[160], [333], [1000, 7], [50]], together):
        alone = encode_streaming(int8, audio, plan)
        for key in alone:
            np.testing.assert_allclose(got[key], alone[key], rtol=1e-5, atol=1e-5 * max(1.0, np.abs(alone[key]).max()))


def test_the_server_serves_an_int8_model_and_says_so(int8_model, small_corpus, tmp_path, model):
    import grpc

    from serve.server import auto_threads

    # one onnxruntime thread for an int8 step unless asked otherwise; onnxruntime's default for fp32
    fp32_model = model[0]
    assert auto_threads(str(int8_model)) == 1 and auto_threads(str(fp32_model)) is None
    assert StreamingModel(int8_model).step_precision == "int8" and StreamingModel(fp32_model).step_precision == "fp32"

    from clients.collector import FrameCollector
    from clients.requests import file_requests
    from protos.sim.v2 import sim_pb2 as pb
    from protos.sim.v2 import sim_pb2_grpc as pb_grpc
    from serve.launch import ServerProcess

    audio = load_audio(load_corpus(small_corpus, "test")[0].path)
    srv = ServerProcess(int8_model, log_dir=tmp_path).start()
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.SimEncoderStub(channel)
            versions = stub.Info(pb.InfoRequest(), timeout=10).versions
            assert versions["step_precision"] == "int8" and versions["calibration_measured_with"] == "int8 step"
            col = FrameCollector()
            for resp in stub.StreamEncode(file_requests(audio, SAMPLE_RATE, 777), timeout=60):
                col.add(resp)
            got = col.arrays()
    finally:
        srv.close()
    expected = encode_streaming(StreamingModel(int8_model), audio, 777)
    for level in ("m1", "m2", "m3", "ar"):
        np.testing.assert_allclose(got[level], expected[level], rtol=1e-5, atol=1e-5)


def test_an_int8_step_that_misses_the_accuracy_bar_leaves_the_fp32_export_intact(tmp_path, small_corpus, monkeypatch,
                                                                                  capsys):
    import export.quantize
    from export.onnx import main

    monkeypatch.setattr(export.quantize, "MAX_REL_RMS", 1e-9)
    ckpt = write_checkpoint(tmp_path / "sim.pt", "sim", seed=4)
    out = tmp_path / "model"
    with one_torch_thread():
        assert main([str(ckpt), "--out", str(out), "--corpus", str(small_corpus), "--calibration-clips", "6",
                     "--int8"]) == 1
    assert "too far from fp32" in capsys.readouterr().err
    man = load_manifest(out, verify=True)  # the verified fp32 export, hashes and all
    assert "precision" not in man and not (out / STEP_FP32).exists() and (out / MANIFEST).is_file()
    audio = (0.1 * np.random.default_rng(1).standard_normal(2000)).astype(np.float32)
    encode_streaming(StreamingModel(out), audio, 160)  # and it runs


@pytest.mark.parametrize("non_negative,two_part", [(True, False), (False, False), (True, True), (False, True)])
def test_row_quantized_gemm_is_8_bit_accurate_and_keeps_rows_independent(non_negative, two_part):
    """export.rowquant: the rewritten Gemm equals numpy's per-row 8-bit arithmetic, stays within
    about 1 % of fp32, and a row's output does not depend on the other rows of the batch. With
    two-part weights only the inputs' 8-bit rounding is left."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export.rowquant import W_MAX, rowquant_gemms

    rng = np.random.default_rng(0)
    k, n = 64, 48
    w = (0.1 * rng.standard_normal((k, n))).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="/Relu")] if non_negative else \
        [helper.make_node("Identity", ["x"], ["h"], name="/Id")]
    nodes.append(helper.make_node("Gemm", ["h", "w", "b"], ["y"], name="/Gemm_5"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert rowquant_gemms(model, ["/Gemm_5"], frozenset(["/Gemm_5"] if two_part else [])) == ["/Gemm_5"]
    assert "Gemm" not in {nd.op_type for nd in model.graph.node}
    assert "w" not in {i.name for i in model.graph.initializer}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    x = rng.standard_normal((32, k)).astype(np.float32) * rng.gamma(1.0, 1.0, (32, 1)).astype(np.float32)
    h = np.maximum(x, 0) if non_negative else x
    got = session.run(None, {"x": x})[0]
    # numpy: weights per column, inputs per row, 255 levels for a Relu's output else 127 around 0
    w_scale = np.abs(w).max(axis=0) / W_MAX
    w_q = np.round(w / w_scale)
    s = np.maximum(np.abs(h).max(axis=1), 1e-12) / (255 if non_negative else 127)
    h_q = np.clip(np.round(h / s[:, None]), 0 if non_negative else -128, 255 if non_negative else 127)
    expected = (h_q @ w_q) * w_scale * s[:, None] + b
    if two_part:  # the second part: what the first one's rounding left, on a 2 * W_MAX finer grid
        lo_scale = w_scale / (2 * W_MAX)
        w_lo = np.clip(np.round((w - w_q * w_scale) / lo_scale), -W_MAX, W_MAX)
        expected += (h_q @ w_lo) * lo_scale * s[:, None]
        # the weights are then about exact: only the inputs' rounding differs from fp32
        on_grid = (h_q * s[:, None]) @ w + b
        assert np.linalg.norm(got - on_grid) / np.linalg.norm(on_grid) < 2e-4
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    exact = h @ w + b
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.01
    # a row's result is the same alone and next to rows a thousand times larger
    loud = x.copy()
    loud[1:] *= 1000.0
    np.testing.assert_array_equal(session.run(None, {"x": loud})[0][0], got[0])
    np.testing.assert_array_equal(session.run(None, {"x": x[:1]})[0][0], got[0])
