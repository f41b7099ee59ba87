"""The evaluation end to end on a tiny model and the small real corpus, plus interpolation and
traversal building blocks."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import soundfile as sf
import torch

from train.checkpoint import encoder_checkpoint, save_atomic
from train.corpus import load_corpus
from train.decoder import Decoder, load_decoder
from train.interpolate import interpolate, pick_words
from train.model import Encoder, ModelSpec
from train.report import main
from train.seeds import main as seeds_main
from train.traverse import rank_dims, set_dims, sweep

TINY = dict(channels=32, hidden=16)


def make_run(root, method: str, seed: int = 0):
    torch.manual_seed(seed)
    run = root / method
    save_atomic(encoder_checkpoint(Encoder(ModelSpec(method, **TINY)), {"method": method, "beta": 0.0033}),
                run / "checkpoint.pt")
    return run


def test_report_end_to_end(small_corpus, tmp_path):
    sim, gim = make_run(tmp_path, "sim"), make_run(tmp_path, "gim", seed=1)
    out = tmp_path / "report"
    argv = ["--run", f"sim={sim}", "--run", f"gim={gim}", "--out", str(out), "--corpus", str(small_corpus),
            "--seeds", "2", "--probe-epochs", "3", "--decoder-epochs", "1", "--supervised-epochs", "1",
            "--pairs", "12", "--traverse-dims", "2", "--traverse-steps", "3", "--interp-steps", "3",
            "--ood-words", "5", "--decoder-lr", "1e-3", "--decoder-batch", "16", "--device", "cpu"]
    assert main(argv) == 0
    index = (out / "index.md").read_text()
    for heading in ("Classification (paper Table 2)", "Vowel concentration (paper Fig. 2)",
                    "Entanglement (paper Table 3)", "Paper targets", "Decoders", "Interpolation", "traversal",
                    "Out-of-distribution separation", "vowel (val)"):
        assert heading in index
    assert "92.58 ± 2.06" in index and "83.32 ± 2.06" in index  # the paper's numbers beside ours
    assert re.search(r"\| random init \| \d", index) and re.search(r"\| supervised \(1 epochs\) \| \d", index)
    assert "| k=2 | k=4 | k=8 | k=16 | k=32 |" in index
    assert "Decoders: 1 epochs (paper 200), Adam 0.001 (paper 2e-4), batch 16 (paper 64)" in index
    # every image the index links exists and is a PNG
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", index)
    assert {"concentration.png", "entanglement.png"} <= set(images) and len(images) == 6
    for rel in images:
        assert (out / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for rel in re.findall(r"\]\(([^)]+\.wav)\)", index):
        assert sf.info(str(out / rel)).samplerate == 16000
    res = json.loads((out / "results.json").read_text())
    for name in ("sim", "gim"):
        r = res["runs"][name]
        assert set(r["entanglement"]) == {"m1", "m2", "m3"}
        e = r["entanglement"]["m3"]
        assert e["ks"] == [2, 4, 8, 16, 32] and e["mean"][-1] == 0.0 and e["pairs"] == 12
        assert set(r["concentration"]) == {"m1", "m2", "m3"}
        assert len(r["probe"]["vowel"]["test"]["runs"]) == 2
        assert len(r["probe"]["vowel"]["val"]["runs"]) == 2
        assert 0.0 <= r["ood"]["auroc"]["maha"]["all"]["white noise"] <= 1.0
        assert (r["decoders"]["m1"]["lr"], r["decoders"]["m1"]["batch"]) == (1e-3, 16)  # trained as asked
    assert any("k = 8" in t for t in res["targets"])
    # decoders were trained into the run folders and are reused on the next call
    assert (sim / "decoders" / "decoder_m1.pt").is_file()
    stamp = (sim / "decoders" / "decoder_m3.pt").stat().st_mtime_ns
    assert main(["--run", f"sim={sim}", "--out", str(tmp_path / "again"), "--corpus", str(small_corpus),
                 "--seeds", "1", "--probe-epochs", "1", "--pairs", "2", "--no-baselines", "--traverse-steps", "2",
                 "--traverse-dims", "1", "--interp-steps", "2", "--ood-words", "0", "--device", "cpu"]) == 0
    assert (sim / "decoders" / "decoder_m3.pt").stat().st_mtime_ns == stamp
    assert "random init" not in (tmp_path / "again" / "index.md").read_text()

    # training seeds: the two reports' runs summarised per setting, mean ± std over runs
    table = tmp_path / "seeds.md"
    assert seeds_main(["--setting", f"both={out}", "--setting", f"sim again, N = 1={tmp_path / 'again'}",
                       "--out", str(table)]) == 0
    text = table.read_text()
    assert "| measure | both (n = 2) | sim again, N = 1 (n = 1) |" in text
    summary = json.loads(table.with_suffix(".json").read_text())
    vowel = [res["runs"][name]["probe"]["vowel"]["test"]["mean"] for name in ("sim", "gim")]
    got = summary["vowel test, GRU"]["both"]
    assert got["n"] == 2 and got["mean"] == pytest.approx(sum(vowel) / 2)
    assert got["std"] == pytest.approx(abs(vowel[0] - vowel[1]) / 2 ** 0.5)
    assert set(summary["OOD maha all: white noise"]) == {"both"}  # the second report skipped OOD
    assert seeds_main(["--setting", f"x={tmp_path / 'nothing'}"]) == 2


def test_report_user_errors(tmp_path, capsys):
    assert main(["--run", "sim", "--out", str(tmp_path / "o")]) == 2
    assert "NAME=DIR" in capsys.readouterr().err
    assert main(["--run", f"sim={tmp_path}", "--out", str(tmp_path / "o")]) == 2
    assert "checkpoint.pt does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # a bad flag value is argparse's usage error
        main(["--run", f"sim={tmp_path}", "--out", str(tmp_path / "o"), "--pairs", "0"])
    assert exc.value.code == 2


def test_interpolation_ends_are_the_two_words():
    torch.manual_seed(0)
    enc = Encoder(ModelSpec("sim", **TINY)).eval()
    dec = Decoder("m2", 32, width=8).eval()
    a, b = torch.randn(4000), torch.randn(4000)
    out = interpolate(enc, dec, "m2", a, b, [0.0, 0.5, 1.0])
    z = enc.encode(torch.stack([a, b]))["m2"]
    ends = dec(z, 4000).detach().numpy()
    np.testing.assert_allclose(out[0], ends[0], atol=1e-6)
    np.testing.assert_allclose(out[2], ends[1], atol=1e-6)
    mid = dec(0.5 * (z[:1] + z[1:]), 4000).detach().numpy()[0]
    np.testing.assert_allclose(out[1], mid, atol=1e-6)


def test_pick_words_prefers_bidi_and_baga_of_one_voice(small_corpus):
    utts = load_corpus(small_corpus)
    a, b = pick_words(utts)
    assert a.word != b.word and a.voice == b.voice
    if any(u.word.startswith("bidi") for u in utts) and any(u.word.startswith("baga") for u in utts):
        assert a.word.startswith("bidi") and b.word.startswith("baga")


def test_traversal_sets_one_dim_and_ranks_the_one_that_matters():
    z = torch.zeros(5, 4)
    zs = set_dims(z, [1, 3], [-3.0, 3.0])
    assert zs.shape == (4, 5, 4)
    assert torch.all(zs[0, :, 1] == -3) and torch.all(zs[3, :, 3] == 3)
    assert torch.all(zs[0, :, [0, 2, 3]] == 0)
    centre, scale = torch.tensor([0.0, 1.0, 0.0, 0.0]), torch.tensor([1.0, 2.0, 1.0, 1.0])
    assert torch.all(set_dims(z, [1], [3.0], centre, scale)[0, :, 1] == 7.0)
    torch.manual_seed(0)
    dec = Decoder("m3", 4, width=4).eval()
    with torch.no_grad():  # the decoder reads dim 2 only
        first = dec.net[0]
        first.weight.zero_()
        first.weight[2] = 1.0
    scores = rank_dims(dec, torch.randn(5, 4), values=(-3.0, 3.0), batch=3)
    assert int(np.argmax(scores)) == 2 and scores[[0, 1, 3]].max() < 1e-9 * scores[2]
    grid = sweep(dec, torch.randn(5, 4), [2, 0], np.linspace(-3, 3, 4), n_samples=800)
    assert grid.shape == (2, 4, 800)
    assert np.ptp(grid[1], axis=0).max() < 1e-6 < np.ptp(grid[0], axis=0).max()


def test_interpolate_and_traverse_clis(small_corpus, tmp_path):
    from train.decoder import main as decoder_main
    from train.interpolate import main as interpolate_main
    from train.traverse import main as traverse_main

    run = make_run(tmp_path, "gim")
    assert decoder_main(["--checkpoint", str(run / "checkpoint.pt"), "--corpus", str(small_corpus), "--level", "m3",
                         "--epochs", "1", "--examples", "0", "--out", str(tmp_path / "dec"), "--device", "cpu"]) == 0
    args = ["--checkpoint", str(run / "checkpoint.pt"), "--decoder", str(tmp_path / "dec" / "decoder_m3.pt"),
            "--corpus", str(small_corpus), "--device", "cpu"]
    assert interpolate_main(args + ["--steps", "3", "--out", str(tmp_path / "i")]) == 0
    assert len(list((tmp_path / "i").glob("interp_m3_a*.wav"))) == 3
    assert (tmp_path / "i" / "interpolation_m3.png").is_file()
    assert traverse_main(args + ["--dims", "0,5", "--steps", "3", "--out", str(tmp_path / "t")]) == 0
    assert len(list((tmp_path / "t").glob("traverse_m3_d*.wav"))) == 6
    assert traverse_main(args + ["--dims", "99", "--out", str(tmp_path / "t")]) == 2
    assert load_decoder(tmp_path / "dec" / "decoder_m3.pt")[1]["level"] == "m3"
