"""serve.runtime: the streaming graphs in onnxruntime, per stream and batched, against the offline encoder."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from export.offline import offline_levels
from export.streams import CHUNK_PLANS, StepGraphs, encode_streaming, encode_streams, random_mix_plans
from serve.onnx_sessions import make_session, providers
from serve.runtime import StreamingModel, bucket
from support.exports import one_torch_thread
from train.audio import level_frames, load_audio
from train.checkpoint import load_encoder
from train.corpus import load_corpus
from train.encode import encode_array


def reference(model: StreamingModel, audio: np.ndarray) -> dict[str, np.ndarray]:
    """The offline run of the whole utterance by the torch Encoder of the exported checkpoint."""
    encoder, _ = load_encoder(model.manifest["checkpoint"])
    with one_torch_thread():
        return offline_levels(encoder, audio)


def offline_encoder_graph(model: StreamingModel, audio: np.ndarray) -> dict[str, np.ndarray]:
    s = make_session(model.dir / "encoder.onnx")
    names = [o.name for o in s.get_outputs()]
    return {n: v[0] for n, v in zip(names, s.run(names, {"audio": audio[None]}))}


def assert_matches(got: dict, model: StreamingModel, audio: np.ndarray, what: str, tol: float = 1e-4):
    """Streaming result (encode_streaming keys) equals the offline run: torch Encoder for mu / logvar / kl,
    encoder.onnx (same baked Gaussian) for maha; frame counts exactly the offline counts."""
    counts = level_frames(audio.size)
    ref = reference(model, audio)
    for level in model.levels:
        assert got[level].shape == (counts[level], model.level_dims[level]), (what, level)
        pairs = [(level, f"mu_{level}")]
        if level in model.logvar_levels:
            pairs += [(f"kl_{level}", f"kl_{level}"), (f"logvar_{level}", f"logvar_{level}")]
        for key, ref_key in pairs:
            r = ref[ref_key]
            if r.size:
                err = np.abs(got[key] - r).max() / max(np.abs(r).max(), 1e-6)
                assert err <= tol, f"{what} {key}: {err:.3g}"
    if audio.size >= 260:  # encoder.onnx needs a frame at every layer
        whole = offline_encoder_graph(model, audio)
        for level in model.levels:
            r = whole[f"maha_{level}"]
            assert np.abs(got[f"maha_{level}"] - r).max() <= tol * max(np.abs(r).max(), 1e-6), (what, level)


@pytest.fixture(scope="module")
def corpus_audio(small_corpus):
    utts = load_corpus(small_corpus, "test")
    return [load_audio(u.path) for u in utts[:2]]


def test_providers_choose_cpu_when_cuda_cannot_run(exported):
    chosen = providers()
    assert chosen[-1] == "CPUExecutionProvider" and chosen[0] in ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert providers() == chosen  # decided once
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 12, 13, 33, 64, 65)] == [1, 2, 4, 4, 8, 8, 12, 12, 16, 36, 64, 68]
    # batches are padded to those buckets on CUDA only: on the CPU every size costs the same to start
    model = StreamingModel(exported("sim"))
    assert model.pad_batches == (model.active_providers[0] == "CUDAExecutionProvider")


@pytest.mark.parametrize("method", ["sim", "gim", "cpc"])
def test_chunked_streaming_equals_offline_on_corpus_audio(exported, corpus_audio, method):
    """Chunks of 1, 159, 160, 161, 4000 samples and random mixes: every frame, first and last included."""
    model = StreamingModel(exported(method))
    plans = {**CHUNK_PLANS, **random_mix_plans(np.random.default_rng(3), 1)}
    audio = corpus_audio[0]
    results = encode_streams(model, [audio] * len(plans), list(plans.values()))
    for name, got in zip(plans, results):
        assert_matches(got, model, audio, f"{method} chunks {name}")
    # the same as train.encode's offline arrays, key for key
    encoder, _ = load_encoder(model.manifest["checkpoint"])
    with one_torch_thread():
        offline = encode_array(encoder, audio)
    for key, value in offline.items():
        assert results[0][key].shape == value.shape
        assert np.abs(results[0][key] - value).max() <= 1e-4 * np.abs(value).max()


def test_batch_norm_model_exports_folded_and_streams_like_offline(tmp_path, small_corpus, corpus_audio):
    """A model trained with BatchNorm: the export folds it into the convs; streamed frames equal the
    unfolded torch encoder (eval mode) on real speech, however the audio is chunked."""
    import torch

    from export.onnx import main
    from train.checkpoint import encoder_checkpoint, save_atomic
    from train.model import Encoder, ModelSpec

    torch.manual_seed(2)
    enc = Encoder(ModelSpec("sim", channels=32, hidden=16, batch_norm=True))
    with torch.no_grad():  # BatchNorm parameters and statistics far from the identity
        for module in enc.convs.values():
            for norm in module.norms:
                norm.running_mean.uniform_(-0.2, 0.2)
                norm.running_var.uniform_(0.3, 3.0)
                norm.weight.uniform_(0.5, 2.0)
                norm.bias.uniform_(-0.3, 0.3)
    ckpt = tmp_path / "bn.pt"
    save_atomic(encoder_checkpoint(enc.eval(), {"method": "sim", "beta": 0.0033, "batch_norm": True}), ckpt)
    with one_torch_thread():
        assert main([str(ckpt), "--out", str(tmp_path / "bn"), "--corpus", str(small_corpus),
                     "--calibration-clips", "20"]) == 0
    model = StreamingModel(tmp_path / "bn")
    assert model.manifest["dims"]["batch_norm"] is True
    audio = corpus_audio[1]
    plans = {**CHUNK_PLANS, **random_mix_plans(np.random.default_rng(8), 1)}
    results = encode_streams(model, [audio] * len(plans), list(plans.values()))
    for name, got in zip(plans, results):
        assert_matches(got, model, audio, f"batch-norm chunks {name}")
    with one_torch_thread():  # and the encoder's own forward pass, BatchNorm layers and all
        offline = encode_array(enc.eval(), audio)
    for key, value in offline.items():
        assert np.abs(results[0][key] - value).max() <= 1e-4 * np.abs(value).max(), key


@pytest.mark.parametrize("method", ["sim", "cpc"])
def test_every_length_from_one_sample(exported, method):
    """Lengths 1..700 (many shorter than the 253 samples of a first frame), 5000 and 5003, all streamed at once."""
    model = StreamingModel(exported(method))
    rng = np.random.default_rng(4)
    lengths = sorted(set(range(1, 701, 23)) | {252, 253, 5000, 5003})
    audios = [(0.2 * rng.standard_normal(n)).astype(np.float32) for n in lengths]
    plans = [[1 + (i * 37) % 200, 160, 7] for i in range(len(lengths))]
    for n, audio, got in zip(lengths, audios, encode_streams(model, audios, plans)):
        assert_matches(got, model, audio, f"{method} n={n}")
    assert encode_streaming(model, audios[lengths.index(5000)], 333)["m3"].shape[0] == 31
    assert encode_streaming(model, audios[lengths.index(5003)], 333)["m3"].shape[0] == 32


def test_batched_streams_get_the_same_output_as_alone(exported, corpus_audio):
    """Streams of different lengths and chunkings, decoded in shared batches, each equal to running alone."""
    model = StreamingModel(exported("sim"))
    rng = np.random.default_rng(5)
    audios = [corpus_audio[0], corpus_audio[1][:3001], (0.1 * rng.standard_normal(777)).astype(np.float32),
              corpus_audio[1], (0.1 * rng.standard_normal(100)).astype(np.float32)]
    plans = [[160], [1000, 3], [161], [4000], [50]]
    together = encode_streams(model, audios, plans)
    for audio, plan, got in zip(audios, plans, together):
        alone = encode_streaming(model, audio, plan)
        assert set(alone) == set(got)
        for key in alone:
            np.testing.assert_allclose(got[key], alone[key], rtol=1e-5, atol=1e-6 * max(1.0, np.abs(alone[key]).max()))


def test_state_pool_grows_and_reuses_rows_without_mixing_streams(exported):
    """More streams than the pool's first 16 rows, some closed halfway and replaced by new ones that
    take their rows: every stream that ran to the end equals running alone."""
    model = StreamingModel(exported("sim"))
    rng = np.random.default_rng(8)
    audios = [(0.1 * rng.standard_normal(int(n))).astype(np.float32) for n in rng.integers(1500, 3000, 24)]
    streams = [model.create_stream() for _ in range(20)]
    rows_before = {s._row for s in streams}
    assert len(rows_before) == 20 and 0 not in rows_before  # row 0 is the padding row
    pos = [0] * 24
    got = {i: {lv: [] for lv in model.levels} for i in range(24)}
    owner = list(range(20))  # audio index each open stream carries
    for rnd in range(60):
        if rnd == 4:  # close streams 3 and 7 mid-way; two new streams take the freed rows
            freed = {streams[3]._row, streams[7]._row}
            streams[3].close(), streams[7].close()
            assert streams[3].state is None
            for j, a in ((3, 20), (7, 21)):
                streams[j], owner[j], got[a] = model.create_stream(), a, {lv: [] for lv in model.levels}
            assert {streams[3]._row, streams[7]._row} == freed
        for j, s in enumerate(streams):
            a = owner[j]
            if not s.finished:
                s.accept_waveform(audios[a][pos[a]:pos[a] + 97])
                pos[a] += 97
                if pos[a] >= audios[a].size:
                    s.input_finished()
        model.decode_streams(streams)
        for j, s in enumerate(streams):
            for lv, f in s.pop_frames().items():
                if f["index"].size:
                    got[owner[j]][lv].append(f["mu"])
    assert all(s.flushed for s in streams)
    for a in owner:
        alone = encode_streaming(model, audios[a], 97)
        for lv in model.levels:
            np.testing.assert_allclose(np.concatenate(got[a][lv]), alone[lv], rtol=1e-5, atol=1e-5)


def test_frames_come_out_at_each_levels_own_rate(exported):
    model = StreamingModel(exported("sim"))
    s = model.create_stream()
    rng = np.random.default_rng(6)
    total = {lv: 0 for lv in model.levels}
    for k in range(1, 6):
        s.accept_waveform((0.1 * rng.standard_normal(160)).astype(np.float32))
        model.decode_streams([s])
        frames = s.pop_frames()
        for lv, f in frames.items():
            assert f["index"].tolist() == list(range(total[lv], total[lv] + f["index"].size))
            assert f["mu"].shape == (f["index"].size, model.level_dims[lv]) and f["maha"].shape == f["index"].shape
            if lv != "ar":
                assert f["kl"].shape == f["index"].shape and f["logvar"].shape == f["mu"].shape
            total[lv] += f["index"].size
        # after k hops: top frames 0..k-2 (frame f needs sample 160 f + 252), m1 8k-1, m2 2k-1
        assert total == {"m1": 8 * k - 1, "m2": 2 * k - 1, "m3": k - 1, "ar": k - 1}
        assert all(v["index"].size == 0 for v in s.pop_frames().values())  # nothing twice
    s.accept_waveform(np.zeros(40, np.float32))
    s.input_finished()
    model.decode_streams([s])
    assert s.flushed
    for lv, f in s.pop_frames().items():
        total[lv] += f["index"].size
    assert total == level_frames(5 * 160 + 40)
    with pytest.raises(RuntimeError, match="after input_finished"):
        s.accept_waveform(np.zeros(3, np.float32))


def test_a_stream_ending_on_a_hop_boundary_flushes_an_empty_tail(exported):
    """Audio of exactly k hops: the flush gets no samples and still gives the offline frame counts."""
    model = StreamingModel(exported("sim"))
    audio = (0.1 * np.random.default_rng(9).standard_normal(3 * 160)).astype(np.float32)
    for plan in ([160], [480], [7]):
        assert {lv: v.shape[0] for lv, v in encode_streaming(model, audio, plan).items() if lv in model.levels} == \
            level_frames(audio.size)


def test_low_level_step_flush_and_state_helpers(exported):
    """export.streams.StepGraphs: the step and flush graphs with the state passed in and out."""
    runtime = StreamingModel(exported("gim"))
    assert runtime.hop == 160 and runtime.levels == ["m1", "m2", "m3", "ar"] and not runtime.variational
    model = StepGraphs(exported("gim"))
    state = model.initial_state(3)
    assert {k: v.shape for k, v in state.items()} == {
        "cache_0": (3, 7, 1), "cache_1": (3, 5, 32), "cache_2": (3, 3, 32), "cache_3": (3, 3, 32),
        "cache_4": (3, 2, 32), "gru_h": (3, 16), "started": (3, 1)}
    audio = (0.1 * np.random.default_rng(7).standard_normal((3, 160))).astype(np.float32)
    outputs, new = model.step(audio, state)
    assert outputs["mu_m1"].shape == (3, 8, 32) and outputs["valid_m3"].tolist() == [[False]] * 3
    assert np.all(new["started"] == 1)
    parts = model.split_state(new)
    assert len(parts) == 3 and parts[1]["cache_2"].shape == (1, 3, 32)
    restacked = model.stack_states(parts)
    for k in new:
        np.testing.assert_array_equal(restacked[k], new[k])
    # one stream alone from its split state gives that stream's row of the batched step
    out1, _ = model.step(audio[1:2], parts[1])
    out3, _ = model.step(audio, new)
    np.testing.assert_allclose(out1["mu_m2"][0], out3["mu_m2"][1], rtol=1e-5, atol=1e-6)
    flushed = model.flush(np.zeros((3, 160), np.float32), np.array([0, 50, 159]), new)
    assert flushed["mu_m3"].shape == (3, 2, 32) and "next_gru_h" not in flushed
    assert flushed["valid_m1"].sum(axis=1).tolist() == [
        level_frames(160 + n)["m1"] - 7 for n in (0, 50, 159)]
    with pytest.raises(ValueError, match=r"\(streams, 160\)"):
        model.step(audio[:, :100], state)
    with pytest.raises(ValueError, match="tail_len"):
        model.flush(audio, np.array([0, 160, 3]), state)
    with pytest.raises(ValueError, match="cache_1"):
        model.step(audio, {**state, "cache_1": state["cache_1"][:2]})
    with pytest.raises(ValueError, match="1-D"):
        runtime.create_stream().accept_waveform(np.zeros((2, 2), np.float32))


def test_runtime_and_manifest_import_without_torch(exported):
    """serve/ and clients/ must never import torch: the runtime works with torch made unimportable."""
    model_dir = exported("cpc")
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from serve.runtime import StreamingModel\n"
        "from export.streams import encode_streaming\n"
        f"m = StreamingModel({str(model_dir)!r})\n"
        "out = encode_streaming(m, np.zeros(1000, np.float32), [100, 60])\n"
        "print(out['m3'].shape, 'torch' in sys.modules and sys.modules['torch'] is not None)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["(6,", "32)", "False"]


def test_step_graph_has_fixed_time_shapes(exported):
    """The step's time lengths are fixed, so its reshapes need no Shape/Gather chains (each a
    few small onnxruntime nodes per step); only `started`'s ones_like reads a shape."""
    import onnx

    for method in ("sim", "cpc"):
        graph = onnx.load(str(exported(method) / "step.onnx")).graph
        shapes = [n for n in graph.node if n.op_type == "Shape"]
        assert [n.input[0] for n in shapes] == ["started"], (method, [n.input[0] for n in shapes])
