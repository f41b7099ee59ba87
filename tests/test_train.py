"""The trainer end to end on real synthesised speech: loss goes down, resume is exact, errors are clear."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from train.checkpoint import CheckpointError, load, load_encoder
from train.config import TrainConfig
from train.loss import SimLoss
from train.sim import beta_at, build_datasets, parse_args, train, validate

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--channels", "32", "--hidden", "16", "--threads", "1"]


def tiny_args(corpus, out, *extra):
    return ["--corpus-dir", str(corpus), "--out", str(out), "--max-clips", "16", "--batch-size", "4", *TINY,
            *extra]


def test_short_training_run_lowers_the_loss(small_corpus, tmp_path):
    # float32: under bf16 this tiny model without BatchNorm learns about a quarter as much in its 40 steps
    cfg = parse_args(tiny_args(small_corpus, tmp_path / "run", "--method", "gim", "--epochs", "10", "--lr", "3e-3",
                               "--no-batch-norm", "--autocast", "off"))
    ckpt = train(cfg)
    trained, saved = load_encoder(ckpt)
    assert saved["epoch"] == 10 and saved["step"] == 10 * 4
    # Untrained encoder with the same seed = the starting point; compare on the training clips.
    torch.manual_seed(cfg.seed)
    from train.model import Encoder, ModelSpec

    start = Encoder(ModelSpec(**saved["dims"]))
    cfg = TrainConfig.from_dict(saved["config"])
    train_ds, _ = build_datasets(cfg)
    crit = SimLoss(start.dims)
    crit.load_state_dict(saved["loss"])
    before = validate(start, crit, train_ds, cfg, torch.device("cpu"))["loss"]
    after = validate(trained, crit, train_ds, cfg, torch.device("cpu"))["loss"]
    assert after < before - 0.1, (before, after)  # same RNG draws: the drop is the weights
    assert (tmp_path / "run" / "config.json").exists() and any((tmp_path / "run" / "tb").iterdir())


def test_the_checkpoint_records_the_autocast_auto_chose(small_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    ckpt = train(parse_args(tiny_args(small_corpus, tmp_path / "run", "--autocast", "auto", "--epochs", "1")))
    assert load(ckpt)["config"]["autocast"] == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    ckpt = train(parse_args(tiny_args(small_corpus, tmp_path / "run2", "--autocast", "auto", "--epochs", "1")))
    assert load(ckpt)["config"]["autocast"] == "off"
    # a resume with the default (auto) goes on as the run trained, even where auto would choose otherwise
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    ckpt = train(parse_args(tiny_args(small_corpus, tmp_path / "run2", "--epochs", "2", "--resume")))
    assert load(ckpt)["config"]["autocast"] == "off" and load(ckpt)["epoch"] == 2
    asked = tiny_args(small_corpus, tmp_path / "run2", "--epochs", "3", "--resume", "--autocast", "bf16")
    ckpt = train(parse_args(asked))
    assert load(ckpt)["config"]["autocast"] == "bf16"  # asked for: the step option changes


def test_batch_norm_is_on_by_default_and_can_be_turned_off(small_corpus, tmp_path):
    assert parse_args(tiny_args(small_corpus, tmp_path)).batch_norm is True
    assert parse_args(tiny_args(small_corpus, tmp_path, "--no-batch-norm")).batch_norm is False


def test_beta_warmup_is_linear_then_constant():
    assert [beta_at(s, 0.004, 4) for s in (0, 1, 2, 4, 100)] == [0.0, 0.001, 0.002, 0.004, 0.004]
    assert beta_at(0, 0.004, 0) == 0.004


def test_batch_norm_warmup_and_width_reach_the_checkpoint_and_resume(small_corpus, tmp_path):
    extra = ("--batch-norm", "--beta-warmup", "3", "--negatives", "window", "--epochs", "1")
    ckpt = train(parse_args(tiny_args(small_corpus, tmp_path / "bn", *extra)))
    enc, saved = load_encoder(ckpt)
    assert saved["dims"] == {"method": "sim", "channels": 32, "hidden": 16, "batch_norm": True}
    assert enc.convs["m1"].norms is not None
    assert saved["config"]["beta_warmup"] == 3 and saved["config"]["negatives"] == "window"
    # BatchNorm's running statistics were trained (they start at 0 / 1).
    assert float(enc.convs["m1"].norms[0].running_mean.abs().sum()) > 0
    resumed = train(parse_args(tiny_args(small_corpus, tmp_path / "bn", "--epochs", "2", "--resume")))
    again = load(resumed)
    assert again["epoch"] == 2 and again["dims"]["batch_norm"] and again["config"]["negatives"] == "window"


def _weights(path):
    return load(path)["model"]


def test_flags_default_to_the_chosen_preset():
    from train.config import CPU, PAPER

    assert parse_args([]) == CPU
    assert parse_args(["--preset", "paper"]) == PAPER
    assert parse_args(["--preset", "paper", "--batch-size", "16"]).batch_size == 16
    assert PAPER.epochs_for(680) == 1000 and CPU.epochs_for(4664) == 1 and CPU.epochs_for(1000) == 5
    for bad in (["--crop", "1000"], ["--epochs", "0"], ["--beta-warmup", "-1"], ["--lr", "0"]):
        with pytest.raises(SystemExit) as exc:
            parse_args(bad)
        assert exc.value.code == 2


def test_a_config_saved_before_the_newer_keys_reads_as_it_trained():
    old = {k: v for k, v in parse_args(["--preset", "paper"]).to_dict().items()
           if k not in ("beta_warmup", "batch_norm", "negatives", "clips_seen")}
    cfg = TrainConfig.from_dict({**old, "obsolete": 1})
    assert (cfg.beta_warmup, cfg.batch_norm, cfg.negatives, cfg.clips_seen) == (0, False, "window", 680_000)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_an_old_checkpoint_resumes_exactly(small_corpus, tmp_path):
    window = ("--negatives", "window", "--no-batch-norm")  # what a run from before these keys trained with
    full = train(parse_args(tiny_args(small_corpus, tmp_path / "a", "--epochs", "2", *window)))
    first = train(parse_args(tiny_args(small_corpus, tmp_path / "b", "--epochs", "1", *window)))
    ckpt = torch.load(first, weights_only=True)  # as a run from before the newer keys wrote it
    for key in ("beta_warmup", "batch_norm", "negatives", "clips_seen"):
        del ckpt["config"][key]
    del ckpt["dims"]["batch_norm"]
    torch.save(ckpt, first)
    resumed = train(parse_args(tiny_args(small_corpus, tmp_path / "b", "--epochs", "2", "--resume")))
    a, b = _weights(full), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load(resumed)["config"]["negatives"] == "window"


def test_resume_after_an_epoch_equals_an_uninterrupted_run(small_corpus, tmp_path):
    full = train(parse_args(tiny_args(small_corpus, tmp_path / "a", "--epochs", "2")))
    train(parse_args(tiny_args(small_corpus, tmp_path / "b", "--epochs", "1")))
    resumed = train(parse_args(tiny_args(small_corpus, tmp_path / "b", "--epochs", "2", "--resume")))
    a, b = _weights(full), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load(resumed)["epoch"] == 2


def test_ctrl_c_saves_and_resume_continues_exactly(small_corpus, tmp_path):
    epochs = "40"
    reference = train(parse_args(tiny_args(small_corpus, tmp_path / "ref", "--epochs", epochs)))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train.sim", *tiny_args(small_corpus, out, "--epochs", epochs)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err
    stopped_at = load(out / "checkpoint.pt")
    assert stopped_at["epoch"] < int(epochs)
    done = subprocess.run([sys.executable, "-m", "train.sim", "--resume", "--out", str(out), "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    a, b = _weights(reference), _weights(out / "checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_audio_folder_is_refused_before_training(tmp_path):
    data = tmp_path / "data"
    (data / "spk" / "ch").mkdir(parents=True)
    sf.write(data / "spk" / "ch" / "good.flac", np.zeros(20000, np.float32), 16000)
    sf.write(data / "spk" / "ch" / "loud44.wav", np.zeros(20000, np.float32), 44100)
    sf.write(data / "stereo.wav", np.zeros((20000, 2), np.float32), 16000)
    sf.write(data / "short.wav", np.zeros(1000, np.float32), 16000)
    (data / "broken.wav").write_bytes(b"RIFF not really a wav")
    res = subprocess.run([sys.executable, "-m", "train.sim", "--data", str(data), "--out", str(tmp_path / "o"),
                          *TINY], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    for name in ("loud44.wav", "stereo.wav", "short.wav", "broken.wav"):
        assert name in res.stderr, res.stderr
    assert "good.flac" not in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_training_on_a_folder_of_audio(small_corpus, tmp_path):
    from train.corpus import load_corpus

    data = tmp_path / "spk" / "chapter"
    data.mkdir(parents=True)
    for i, u in enumerate(load_corpus(small_corpus, "train")[:6]):
        audio, _ = sf.read(u.path, dtype="float32")
        sf.write(data / f"{i}.flac", np.concatenate([audio, audio]), 16000)
    ckpt = train(parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--epochs", "1",
                             "--batch-size", "2", "--crop", "3200", *TINY]))
    assert load(ckpt)["epoch"] == 1


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_encoder(bad)
    with pytest.raises(CheckpointError, match="no such"):
        load_encoder(tmp_path / "missing.pt")
    res = subprocess.run([sys.executable, "-m", "train.encode", str(bad), "--checkpoint", str(bad), "--out",
                          str(tmp_path / "x.npz")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "bad.pt" in res.stderr and "Traceback" not in res.stderr


def test_encode_cli_matches_the_encoder(small_corpus, tmp_path):
    from train.checkpoint import encoder_checkpoint, save_atomic
    from train.corpus import load_corpus
    from train.model import Encoder, ModelSpec

    torch.manual_seed(0)
    enc = Encoder(ModelSpec("sim", 32, 16)).eval()
    save_atomic(encoder_checkpoint(enc), tmp_path / "c.pt")
    wav = load_corpus(small_corpus, "test")[0].path
    res = subprocess.run([sys.executable, "-m", "train.encode", str(wav), "--checkpoint", str(tmp_path / "c.pt"),
                          "--out", str(tmp_path / "x.npz")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    got = np.load(tmp_path / "x.npz")
    assert sorted(got.files) == ["ar", "kl_m1", "kl_m2", "kl_m3", "m1", "m2", "m3"]
    audio, _ = sf.read(wav, dtype="float32")
    ref = enc.encode(torch.from_numpy(audio)[None])
    for k in got.files:
        np.testing.assert_allclose(got[k], ref[k][0].numpy(), rtol=1e-5, atol=1e-5)
    assert got["m1"].shape[1] == 32 and got["ar"].shape[1] == 16
