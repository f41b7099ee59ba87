"""Out-of-distribution separation (train.ood) and training curves (train.curves)."""
from __future__ import annotations

import numpy as np
import torch

from train.corpus import load_corpus
from train.curves import main as curves_main
from train.curves import read_scalars, smooth
from train.gaussian import fit_gaussian, ledoit_wolf, mahalanobis
from train.model import Encoder, ModelSpec
from train.ood import GaussianScore, auroc, format_tables, ood_separation, synthetic_signals


def test_auroc_counts_pairs_and_ties():
    assert auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auroc(np.array([1.0]), np.array([2.0])) == 0.0
    assert auroc(np.array([1.0, 3.0]), np.array([2.0])) == 0.5
    assert auroc(np.array([2.0]), np.array([2.0])) == 0.5


def test_gaussian_score_is_the_mahalanobis_distance_under_the_exported_estimator():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((500, 4)) @ rng.standard_normal((4, 4)) + 3.0
    score = GaussianScore(torch.from_numpy(ref))
    x = rng.standard_normal((5, 4))
    mean, cov, shrinkage = ledoit_wolf(ref)
    assert 0.0 <= shrinkage < 0.1
    d = x - mean
    expected = np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d)
    np.testing.assert_allclose(score(torch.from_numpy(x)), expected, rtol=1e-4)
    # the same numbers the export bakes into its graphs
    m, w, _ = fit_gaussian(ref)
    np.testing.assert_allclose(score(torch.from_numpy(x)), mahalanobis(x, m, w), rtol=1e-6)


def test_synthetic_signals_have_the_stated_levels():
    sig = synthetic_signals(6, seed=1)
    rms = [float(np.sqrt(np.mean(a.astype(np.float64) ** 2))) for a in sig["white noise"]]
    np.testing.assert_allclose(rms[:3], [0.01, 0.03, 0.1], rtol=0.05)
    assert max(float(np.abs(a).max()) for a in sig["pure tone"]) <= 0.3 + 1e-6


def test_ood_separation_on_real_words(small_corpus):
    torch.manual_seed(0)
    enc = Encoder(ModelSpec("sim", channels=16, hidden=8, batch_norm=True)).eval()
    utts = {s: load_corpus(small_corpus, s)[:6] for s in ("train", "test", "test_voice")}
    res = ood_separation(enc, utts, n_synthetic=6)
    assert set(res["auroc"]) == {"kl", "maha"}
    assert set(res["auroc"]["kl"]) == {"m1", "m2", "m3", "all"}  # the GRU has no posterior variance
    assert set(res["auroc"]["maha"]) == {"m1", "m2", "m3", "ar", "all"}
    signals = {"time-reversed words", "white noise", "pure tone", "held-out voice words"}
    for per_level in res["auroc"].values():
        for row in per_level.values():
            assert set(row) == signals and all(0.0 <= v <= 1.0 for v in row.values())
    assert res["n"]["white noise"] == 6 and res["n"]["test"] == 6
    text = "\n".join(format_tables(res))
    assert "| m1 |" in text and "score `kl`" in text


def test_curves_read_tensorboard_scalars_and_plot(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    (run).mkdir()
    (run / "config.json").write_text('{"batch_size": 4}')
    w = SummaryWriter(str(run / "tb"))
    for step in range(1, 31):
        w.add_scalar("train/nce_m1", 3.0 - step / 30, step)
        w.add_scalar("train/acc_m1", step / 100, step)
        w.add_scalar("train/klf_m1", 0.5, step)
    w.add_scalar("train/nce_m1", 9.0, 30)  # a resumed run logs step 30 again: the last value wins
    w.close()
    scalars = read_scalars(run)
    steps, values = scalars["nce_m1"]
    assert steps.tolist() == list(range(1, 31)) and values[-1] == 9.0
    np.testing.assert_allclose(smooth(np.arange(10.0), 3)[2:], np.arange(1.0, 9.0))
    out = tmp_path / "c.png"
    assert curves_main(["--run", f"a={run}", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert curves_main(["--run", f"a={tmp_path / 'missing'}", "--out", str(out)]) == 2
