"""Linear probes: the training loop on toy features, the task data built from the real corpus,
frozen features for every method's levels, and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from train.audio import level_frames
from train.checkpoint import encoder_checkpoint, save_atomic
from train.concentration import near_zero, scaled, top_share
from train.corpus import SYLLABLES, VOWELS, load_corpus
from train.features import encode_levels, fit_length
from train.model import Encoder, ModelSpec
from train.probe import (
    ProbeData,
    accuracy,
    main,
    split_validation,
    spread,
    summarise,
    train_linear_probe,
    train_linear_probes,
)

TINY = dict(channels=32, hidden=16)


def blobs(n_per_class: int, n_classes: int, dim: int, noise_seed: int):
    """Gaussian blobs around fixed class centres (the same for every call), fresh noise per noise_seed."""
    centres = 4 * torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(0))
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = centres[y] + 0.3 * torch.randn(len(y), dim, generator=torch.Generator().manual_seed(noise_seed))
    return x, y


@pytest.mark.parametrize("bias", [True, False])
def test_probe_separates_toy_classes(bias):
    x, y = blobs(40, 9, 16, noise_seed=1)
    xt, yt = blobs(10, 9, 16, noise_seed=2)  # held-out examples of the same classes
    probe = train_linear_probe(x, y, 9, bias=bias, epochs=50, seed=0)
    assert (probe.bias is not None) == bias
    assert accuracy(probe, x, y) == 100.0
    assert accuracy(probe, xt, yt) >= 99.0


def test_batched_seeds_equal_separate_runs():
    x, y = blobs(20, 3, 6, noise_seed=3)
    x = x + 2.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))  # not separable: weights keep moving
    feats = torch.stack([x, x.flip(1)])  # two feature sets, e.g. two levels
    w, b = train_linear_probes(feats, y, 3, [5, 7], epochs=4, batch=16)
    for g, seed in enumerate([5, 7]):
        alone = train_linear_probe(feats[g], y, 3, epochs=4, batch=16, seed=seed)
        torch.testing.assert_close(w[g], alone.weight.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b[g], alone.bias.detach(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(w[0], w[1])


def test_probe_is_at_chance_on_random_labels():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 8, generator=g), torch.randint(0, 3, (300,), generator=g)
    xt, yt = torch.randn(600, 8, generator=g), torch.randint(0, 3, (600,), generator=g)
    probe = train_linear_probe(x, y, 3, epochs=20)
    assert 20.0 < accuracy(probe, xt, yt) < 46.0


def test_summarise():
    s = summarise([90.0, 92.0, 94.0])
    assert s["mean"] == pytest.approx(92.0) and s["std"] == pytest.approx(2.0)  # sample std
    assert summarise([50.0])["std"] == 0.0
    assert np.isnan(summarise([float("nan")])["mean"])


def test_concentration_numbers():
    spread = np.ones((3, 100))
    assert top_share(spread) == pytest.approx(0.10)
    peaked = np.zeros((3, 100))
    peaked[:, 7] = [1.0, -2.0, 0.5]
    assert top_share(peaked) == pytest.approx(1.0)
    assert near_zero(peaked) == pytest.approx(297 / 300)
    assert np.abs(scaled(peaked)).max() == 1.0 and scaled(peaked)[1, 7] == -1.0


def test_fit_length_centres_and_crops():
    a = np.arange(1, 5, dtype=np.float32)
    assert fit_length(a, 8, centre=True).tolist() == [0, 0, 1, 2, 3, 4, 0, 0]
    assert fit_length(a, 6).tolist() == [1, 2, 3, 4, 0, 0]
    assert fit_length(a, 2, centre=True).tolist() == [2, 3]


def test_probe_data_from_corpus(small_corpus):
    data = ProbeData.from_corpus(small_corpus)
    utts = {s: sorted(load_corpus(small_corpus, s), key=lambda u: u.id) for s in ("train", "test", "test_voice")}
    utts["train"], utts["val"] = split_validation(utts["train"])
    assert utts["val"] and not {u.word for u in utts["train"]} & {u.word for u in utts["val"]}
    assert data.meta["word_overlap_train_test"] == 0
    assert data.length % 160 == 0
    assert data.length >= max(e - s for u in utts["train"] for s, e in u.bounds)
    for split, syl in data.splits.items():
        assert syl.audio.shape == (3 * len(utts[split]), data.length)
        u = utts[split][0]
        assert [SYLLABLES[i] for i in syl.syllable[:3]] == list(u.syllables)
        assert [VOWELS[i] for i in syl.vowel[:3]] == list(u.vowels)
        # each syllable label's vowel is its vowel label
        assert all(SYLLABLES[s][1] == VOWELS[v] for s, v in zip(syl.syllable.tolist(), syl.vowel.tolist()))
        # the crop holds the syllable's audio, centred
        assert float(syl.audio[0].abs().sum()) > 0
        assert float(syl.audio[0, :10].abs().sum()) == 0.0


@pytest.mark.parametrize("method", ["sim", "gim", "cpc"])
def test_features_every_level(method):
    torch.manual_seed(0)
    enc = Encoder(ModelSpec(method, **TINY)).eval()
    audio = torch.randn(3, 4000)
    out = encode_levels(enc, audio, ("m1", "m2", "m3", "ar"), batch=2)
    frames = level_frames(4000)
    for lv in ("m1", "m2", "m3", "ar"):
        assert out[lv].shape == (3, frames[lv], 16 if lv == "ar" else 32)
    pooled = encode_levels(enc, audio, ("m2",), pooled=True)["m2"]
    torch.testing.assert_close(pooled, out["m2"].mean(1))
    if method != "cpc":
        torch.testing.assert_close(out["m3"], enc.encode(audio)["m3"])
    else:  # CPC's m1 is the ReLU output of its second conv
        convs = enc.convs["m3"].convs
        ref = torch.relu(convs[1](torch.relu(convs[0](audio[:, None])))).transpose(1, 2)
        torch.testing.assert_close(out["m1"], ref)


def test_cli_writes_json(small_corpus, tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "ck.pt"
    save_atomic(encoder_checkpoint(Encoder(ModelSpec("gim", **TINY)), {"method": "gim"}), ckpt)
    out = tmp_path / "probe.json"
    assert main(["--checkpoint", str(ckpt), "--corpus", str(small_corpus), "--seeds", "2", "--epochs", "3",
                 "--level", "m2", "--no-bias", "--out", str(out), "--device", "cpu"]) == 0
    res = json.loads(out.read_text())
    assert res["level"] == "m2" and res["bias"] is False and res["seeds"] == [0, 1]
    for task in ("vowel", "syllable"):
        for split in ("train", "test", "test_voice"):
            assert len(res["probe"][task][split]["runs"]) == 2
            assert 0.0 <= res["probe"][task][split]["mean"] <= 100.0
    assert "vowel" in capsys.readouterr().out


def test_cli_user_errors(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # a bad flag value is argparse's usage error
        main(["--checkpoint", str(tmp_path / "missing.pt"), "--seeds", "0"])
    assert exc.value.code == 2


def test_spread_keeps_every_voice(small_corpus):
    utts = sorted(load_corpus(small_corpus, "train"), key=lambda u: u.id)
    voices = {u.voice for u in utts}
    picked = spread(utts, len(voices) * 2)
    assert len(picked) == len(voices) * 2 and {u.voice for u in picked} == voices
    assert spread(utts, 10 ** 6) == utts
