"""Decoders: shapes and alignment, save/load round trip, training reduces the loss, the CLI."""
from __future__ import annotations

import pytest
import soundfile as sf
import torch

from train.audio import frames_per_layer, level_frames
from train.checkpoint import CheckpointError, encoder_checkpoint, save_atomic
from train.decoder import (
    DECODER_LEVELS,
    Decoder,
    ReconstructionLoss,
    decoder_path,
    load_decoder,
    main,
    save_decoder,
    train_decoder,
)
from train.model import Encoder, ModelSpec

TINY = dict(channels=32, hidden=16)


@pytest.mark.parametrize("level", DECODER_LEVELS)
def test_shapes_mirror_the_encoder(level):
    torch.manual_seed(0)
    dec = Decoder(level, 32, width=16)
    n = 10240
    frames = level_frames(n)[level]
    out = dec(torch.randn(2, frames, 32))
    assert out.shape == (2, dec.natural_length(frames))
    assert n - 160 < out.shape[1] <= n  # at most the floor-division tail is missing
    assert dec(torch.randn(2, frames, 32), n).shape == (2, n)
    assert dec(torch.randn(1, frames, 32), 5000).shape == (1, 5000)
    n_transposed = sum(isinstance(m, torch.nn.ConvTranspose1d) for m in dec.net)
    assert n_transposed == {"m1": 2, "m2": 4, "m3": 5}[level]
    assert not isinstance(dec.net[-1], torch.nn.ReLU)  # no output activation


def test_transposed_layers_invert_each_layer_length():
    dec = Decoder("m3", 8, width=8)
    counts = [10240] + frames_per_layer(10240)
    for i, (k, s, p) in enumerate(dec.layers_spec):  # each transposed layer undoes its conv up to the floor
        n = (counts[i + 1] - 1) * s - 2 * p + k
        assert counts[i] - s < n <= counts[i]


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    dec = Decoder("m1", 32, width=24).eval()
    dims = ModelSpec("sim", **TINY).to_dict()
    path = save_decoder(dec, decoder_path(tmp_path, "m1"), dims, {"loss": "mse", "epochs": 3}, [0.5, 0.25])
    assert path.name == "decoder_m1.pt"
    raw = torch.load(path, weights_only=True)  # the format the export helper relies on
    assert raw["level"] == "m1" and raw["dims"] == dims
    loaded, meta = load_decoder(path)
    assert not loaded.training
    assert meta["level"] == "m1" and meta["dims"] == dims and meta["hop"] == 20
    assert meta["arch"]["width"] == 24 and meta["arch"]["extra"] == 2
    assert meta["config"]["loss"] == "mse" and meta["history"] == [0.5, 0.25]
    assert "model" not in meta
    z = torch.randn(2, 40, 32)
    assert torch.equal(loaded(z), dec(z))


def test_load_rejects_other_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        load_decoder(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_decoder(tmp_path / "junk.pt")
    save_atomic({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a sim-decoder"):
        load_decoder(tmp_path / "other.pt")


@pytest.mark.parametrize("loss", ["mse", "mse+logmel"])
def test_training_reduces_the_loss(loss):
    torch.manual_seed(0)
    t = torch.arange(4000) / 16000
    audio = torch.stack([0.3 * torch.sin(2 * torch.pi * f * t) for f in (220.0, 330.0, 440.0, 550.0)])
    z = torch.randn(4, level_frames(4000)["m3"], 8)
    dec, hist = train_decoder(z, audio, "m3", dims={}, epochs=40, lr=2e-3, batch=2, loss=loss, width=16,
                              progress=False)
    assert len(hist) == 40 and hist[-1] < 0.7 * hist[0]
    crit = ReconstructionLoss(loss)
    assert float(crit(audio, audio)) == pytest.approx(0.0, abs=1e-6)


def test_cli_trains_and_writes_wavs(small_corpus, tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "ck.pt"
    save_atomic(encoder_checkpoint(Encoder(ModelSpec("sim", **TINY)), {"method": "sim"}), ckpt)
    out = tmp_path / "dec"
    assert main(["--checkpoint", str(ckpt), "--corpus", str(small_corpus), "--level", "m2", "--epochs", "1",
                 "--examples", "2", "--out", str(out), "--device", "cpu"]) == 0
    dec, meta = load_decoder(out / "decoder_m2.pt")
    assert meta["config"]["epochs"] == 1 and meta["config"]["train_items"] == 40
    wavs = sorted(p.name for p in (out / "wav").glob("*.wav"))
    assert len(wavs) == 4 and sum(w.endswith("_original.wav") for w in wavs) == 2
    a, rate = sf.read(out / "wav" / wavs[0])
    assert rate == 16000 and len(a) == 10240


def test_cli_user_errors(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "x.pt"), "--out", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err
