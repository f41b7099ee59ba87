"""python -m export.onnx: graphs, manifest, calibration, verification and user errors (real onnxruntime)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from export.calibration import score_stats
from export.graphs import EncoderGraph, ModuleGraph
from export.onnx import main
from export.streams import CHUNK_PLANS
from export.verify import Report, VerificationError, audio_cases, verify_offline_graphs, verify_streaming
from serve.model_dir import ManifestError, load_manifest, sha256_file
from serve.onnx_sessions import make_session
from serve.runtime import StreamingModel
from serve.scoring import p_value
from support.exports import one_torch_thread, small_encoder, write_checkpoint, write_decoders
from train.checkpoint import load_encoder
from train.decoder import load_decoder
from train.gaussian import fit_gaussian, mahalanobis

GRAPHS = {"m1.onnx": "module", "m2.onnx": "module", "m3.onnx": "module", "ar.onnx": "module",
          "encoder.onnx": "encoder", "step.onnx": "step", "flush.onnx": "flush"}


def run_ort(path, **feeds):
    session = make_session(path)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def rel(got, ref):
    assert got.shape == ref.shape
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-6))


def test_sim_export_writes_every_graph_and_a_complete_manifest(exported):
    out = exported("sim", decoders=True)
    m = load_manifest(out)
    decoders = {f"decoder_{lv}.onnx": "decoder" for lv in ("m1", "m2", "m3")}
    assert {name: f["role"] for name, f in m["files"].items()} == {**GRAPHS, **decoders}
    for name, f in m["files"].items():
        assert f["sha256"] == sha256_file(out / name)
    assert m["format"] == "sim-export/1" and m["method"] == "sim" and m["beta"] == 0.0033
    assert m["dims"] == {"method": "sim", "channels": 32, "hidden": 16, "batch_norm": False} and m["opset"] == 17
    assert m["checkpoint_sha256"] == sha256_file(m["checkpoint"])
    assert m["config"]["method"] == "sim" and m["created"] and m["code_version"]
    g = m["geometry"]
    assert (g["sample_rate"], g["hop"], g["receptive_field"], g["left_reach"], g["lookahead"], g["step_samples"]) == \
        (16000, 160, 465, 212, 93, 160)
    assert g["level_hops"] == {"m1": 20, "m2": 80, "m3": 160, "ar": 160}
    assert [(s["name"], s["shape"]) for s in g["state"]] == [
        ("cache_0", [7, 1]), ("cache_1", [5, 32]), ("cache_2", [3, 32]), ("cache_3", [3, 32]), ("cache_4", [2, 32]),
        ("gru_h", [16]), ("started", [1])]
    assert m["levels"] == ["m1", "m2", "m3", "ar"]
    assert m["level_dims"] == {"m1": 32, "m2": 32, "m3": 32, "ar": 16}
    assert "verification" in m and "streaming" in m["verification"]


def test_calibration_in_the_manifest(exported):
    m = load_manifest(exported("sim", decoders=True))
    cal = m["calibration"]
    assert cal["fpr"] == 0.01 and cal["window_seconds"] == 0.3
    for level in m["levels"]:
        c = cal["levels"][level]
        assert c["score"] == "maha"  # the flag's per-frame score, averaged over 0.3 s
        assert c["window_frames"] == {"m1": 240, "m2": 60, "m3": 30, "ar": 30}[level]
        assert c["frame"]["n_ref"] == c["n_ref"] and "reference" not in c["frame"]
        ref = np.array(c["reference"])
        assert 0 < ref.size <= 4096 and np.all(np.diff(ref) >= 0)
        assert ref.size == min(c["n_ref"], 4096)
        # the threshold is the 99 % quantile: about 1 % of the reference lies above it
        above = np.mean(ref > c["threshold"])
        assert above <= 0.011 + 1.0 / ref.size
        assert p_value(ref, np.array([c["threshold"]]))[0] == pytest.approx(0.01, abs=0.01 + 2.0 / ref.size)
        if level != "ar":
            assert set(c["other"]) == {"kl"} and len(c["other"]["kl"]["reference"]) > 0
    # 10 clips to fit and 10 to score: the frames of the scoring half
    assert cal["levels"]["m3"]["n_clips_fit"] == cal["levels"]["m3"]["n_clips_ref"] == 10


def test_graph_metadata_and_dynamic_batch_axes(exported):
    out = exported("sim", decoders=True)
    m = load_manifest(out)
    for name in m["files"]:
        model = onnx.load(str(out / name), load_external_data=False)
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["format"] == "sim-export/1" and meta["hop"] == "160" and meta["receptive_field"] == "465"
        assert meta["role"] == m["files"][name]["role"]
        for value in list(model.graph.input) + list(model.graph.output):
            dim0 = value.type.tensor_type.shape.dim[0]
            assert dim0.dim_param and not dim0.HasField("dim_value"), f"{name}: {value.name} has a fixed batch"
        if name in ("step.onnx", "flush.onnx"):
            assert json.loads(meta["state"]) == m["geometry"]["state"]
            assert json.loads(meta["lookahead"]) == 93


def test_offline_graphs_at_other_batch_sizes_and_lengths(exported):
    out = exported("sim", decoders=True)
    encoder, _ = load_encoder(load_manifest(out)["checkpoint"])
    rng = np.random.default_rng(0)
    for batch, n in ((1, 777), (3, 2003)):
        audio = (0.2 * rng.standard_normal((batch, n))).astype(np.float32)
        with torch.no_grad():
            ref = encoder.encode(torch.from_numpy(audio))
        got = run_ort(out / "encoder.onnx", audio=audio)
        for level in ("m1", "m2", "m3", "ar"):
            assert rel(got[f"mu_{level}"], ref[level].numpy()) < 1e-4
        for level in ("m1", "m2", "m3"):
            assert rel(got[f"kl_{level}"], ref[f"kl_{level}"].numpy()) < 1e-4
        m1 = run_ort(out / "m1.onnx", audio=audio)
        assert rel(m1["mu"], ref["m1"].numpy()) < 1e-4
        m2 = run_ort(out / "m2.onnx", x=m1["mu"])
        assert rel(m2["mu"], ref["m2"].numpy()) < 1e-4 and m2["logvar"].shape == m2["mu"].shape
        ar = run_ort(out / "ar.onnx", x=ref["m3"].numpy())
        assert rel(ar["mu"], ref["ar"].numpy()) < 1e-4


def test_decoder_graphs_match_the_torch_decoders(exported, tmp_path):
    out = exported("sim", decoders=True)
    dec_dir = out.parent / "sim_dec_decoders"
    z = np.random.default_rng(1).standard_normal((2, 13, 32)).astype(np.float32)
    for level in ("m1", "m2", "m3"):
        decoder, meta = load_decoder(dec_dir / f"decoder_{level}.pt")
        with torch.no_grad():
            ref = decoder(torch.from_numpy(z)).numpy()
        got = run_ort(out / f"decoder_{level}.onnx", latents=z)["audio"]
        assert got.shape == ref.shape == (2, decoder.natural_length(13))
        assert rel(got, ref) < 1e-4


def test_gim_and_cpc_exports_have_their_own_levels_and_scores(exported):
    gim = load_manifest(exported("gim"))
    assert gim["levels"] == ["m1", "m2", "m3", "ar"] and not gim["variational"]
    assert {c["score"] for c in gim["calibration"]["levels"].values()} == {"maha"}
    outs = [o.name for o in make_session(exported("gim") / "step.onnx").get_outputs()]
    assert not any(n.startswith(("logvar_", "kl_")) for n in outs) and "maha_m1" in outs
    assert [o.name for o in make_session(exported("gim") / "m1.onnx").get_outputs()] == ["mu"]

    cpc_dir = exported("cpc", decoders=True)
    cpc = load_manifest(cpc_dir)
    assert cpc["levels"] == ["m3", "ar"] and cpc["level_dims"] == {"m3": 32, "ar": 16}
    assert set(cpc["files"]) == {"m3.onnx", "ar.onnx", "encoder.onnx", "step.onnx", "flush.onnx", "decoder_m3.onnx"}
    assert [i.name for i in make_session(cpc_dir / "m3.onnx").get_inputs()] == ["audio"]
    assert set(cpc["calibration"]["levels"]) == {"m3", "ar"}


def test_a_changed_or_missing_file_fails_clearly(exported, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(exported("gim"), copy)
    load_manifest(copy)  # intact
    with open(copy / "step.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match=r"step\.onnx: sha256 .* does not match"):
        load_manifest(copy)
    with pytest.raises(ManifestError, match="step.onnx"):
        StreamingModel(copy)
    assert load_manifest(copy, verify=False)["method"] == "gim"
    (copy / "m2.onnx").unlink()
    with pytest.raises(ManifestError, match=r"m2\.onnx: listed in .*manifest\.json but missing"):
        load_manifest(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="manifest.json: not readable JSON"):
        load_manifest(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="manifest.json: missing"):
        load_manifest(copy)


def test_verification_reports_mismatches_with_numbers(exported, small_corpus):
    """A graph from another model must fail verification, naming the graph and the error."""
    out = exported("sim", decoders=True)
    other = small_encoder("sim", seed=1)
    rng = np.random.default_rng(0)
    report = Report()
    with one_torch_thread():
        verify_offline_graphs(out, other, None, audio_cases([], rng), report)
    assert report.failures
    failure = r"m1\.onnx \[random\] mu: max abs error / scale = [0-9.e+-]+ > 0\.0001"
    with pytest.raises(VerificationError, match=failure):
        report.raise_if_failed("onnxruntime differs from torch")

    report = Report()
    audio = (0.1 * rng.standard_normal(1000)).astype(np.float32)
    with one_torch_thread():
        verify_streaming(StreamingModel(out), other, None, {"noise": audio}, {"160": CHUNK_PLANS["160"]}, report)
    with pytest.raises(VerificationError, match=r"stream \[noise, chunks 160\] m1 mu: max abs error"):
        report.raise_if_failed("streaming differs")


def test_cli_user_errors_exit_2_without_traceback(tmp_path, capsys, small_corpus):
    base = ["--out", str(tmp_path / "out"), "--corpus", str(small_corpus), "--calibration-clips", "4"]
    assert main([str(tmp_path / "nope.pt")] + base) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "nope.pt" in err and "Traceback" not in err

    ckpt = write_checkpoint(tmp_path / "sim.pt", "sim")
    assert main([str(ckpt), "--decoders", str(tmp_path / "no_decoders")] + base) == 2
    assert "no_decoders: no such decoder directory" in capsys.readouterr().err

    (tmp_path / "empty").mkdir()
    assert main([str(ckpt), "--decoders", str(tmp_path / "empty")] + base) == 2
    assert "no decoder_<level>.pt" in capsys.readouterr().err

    wide = write_decoders(tmp_path / "wide", levels=("m2",), channels=48)
    assert main([str(ckpt), "--decoders", str(wide)] + base) == 2
    assert "decodes 48-channel latents; the encoder has 32" in capsys.readouterr().err

    assert main([str(ckpt), "--out", str(tmp_path / "out"), "--corpus", str(tmp_path / "no_corpus")]) == 2
    assert "no_corpus: no such corpus directory" in capsys.readouterr().err

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main([str(tmp_path / "junk.pt")] + base) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err

    for bad in (["--fpr", "0.7"], ["--calibration-clips", "1"]):
        with pytest.raises(SystemExit) as exc:
            main([str(ckpt)] + base + bad)
        assert exc.value.code == 2
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_p_value_counts_reference_scores_at_or_above():
    ref = np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(p_value(ref, np.array([0.0, 1.0, 2.5, 4.0, 5.0])), [1.0, 1.0, 0.6, 0.4, 0.2])


def test_gaussian_fit_whitens_and_the_threshold_is_the_quantile():
    rng = np.random.default_rng(0)
    d = 8
    a = rng.standard_normal((d, d))
    cov = a @ a.T + 0.1 * np.eye(d)
    frames = rng.multivariate_normal(np.arange(d, dtype=float), cov, size=20000)
    mean, w, info = fit_gaussian(frames)
    np.testing.assert_allclose(mean, np.arange(d), atol=0.1)
    np.testing.assert_allclose(w @ cov @ w.T, np.eye(d), atol=0.05)
    held = rng.multivariate_normal(np.arange(d, dtype=float), cov, size=20000)
    scores = mahalanobis(held, mean, w)
    assert scores.mean() == pytest.approx(d, rel=0.05)  # chi-square with d degrees of freedom
    stats = score_stats(scores, 0.01)
    assert stats["threshold"] == pytest.approx(np.quantile(scores, 0.99))
    assert len(stats["reference"]) == 4096 and stats["n_ref"] == 20000
    assert stats["reference"][0] == pytest.approx(scores.min())
    assert stats["reference"][-1] == pytest.approx(scores.max())
    assert info["n_fit"] == 20000 and 0.0 <= info["shrinkage"] < 0.05


def test_module_graph_wrappers_use_the_encoders_weights():
    enc = small_encoder("sim")
    audio = torch.randn(1, 1000)
    with torch.no_grad():
        ref = enc.encode(audio)
        mu, logvar = ModuleGraph(enc, "m1")(audio)
        whole = dict(zip(EncoderGraph(enc).output_names(), EncoderGraph(enc)(audio)))
    torch.testing.assert_close(mu, ref["m1"])
    torch.testing.assert_close(whole["mu_ar"], ref["ar"])
    torch.testing.assert_close(whole["kl_m2"], ref["kl_m2"])
    torch.testing.assert_close(whole["maha_m3"], (ref["m3"] ** 2).sum(-1))  # no Gaussian: identity


def test_a_model_trained_on_a_folder_is_calibrated_on_its_held_out_tenth(tmp_path, capsys):
    """--data (or the checkpoint's own training folder): the reference clips are the tenth of the
    folder train.sim held out, not corpus words."""
    from conftest import write_audio
    from export.random_model import write_checkpoint as write_random
    from train.model import ModelSpec

    folder = tmp_path / "mine"
    for i in range(24):  # a held-out tenth of 2 files, 12,000 samples each
        write_audio(folder / f"{i:02d}.wav", 12_000 + i)
    ckpt = tmp_path / "own.pt"
    write_random(ckpt, ModelSpec("sim", 16, 8), seed=1)
    ck = torch.load(ckpt, weights_only=True)
    ck["config"] = {**ck.get("config", {}), "data": str(folder), "crop": 10_240}
    torch.save(ck, ckpt)
    with one_torch_thread():
        assert main([str(ckpt), "--out", str(tmp_path / "m"), "--skip-verify", "--corpus", "/nonexistent"]) == 0
    assert f"calibrating on the held-out tenth of {folder}" in capsys.readouterr().err
    man = load_manifest(tmp_path / "m")
    assert man["export"]["data"] == str(folder) and man["export"]["calibration_clips"] == 2
    m3 = man["calibration"]["levels"]["m3"]  # one clip fits the Gaussian, the other is the reference
    assert m3["n_clips_fit"] == m3["n_clips_ref"] == 1 and m3["n_ref"] > 70
    with one_torch_thread():
        assert main([str(ckpt), "--out", str(tmp_path / "few"), "--skip-verify", "--data", str(folder / "none")]) == 2
    assert "not a directory" in capsys.readouterr().err
