"""Hand-written numerics against the standard library for the job (both in the dev extra)."""
from __future__ import annotations

import numpy as np
import pytest

from train.decoder import mel_filterbank
from train.gaussian import ledoit_wolf


@pytest.mark.parametrize("n, d", [(500, 16), (40, 64), (3, 5)])
def test_ledoit_wolf_equals_scikit_learn(n, d):
    from sklearn.covariance import ledoit_wolf as sklearn_ledoit_wolf

    rng = np.random.default_rng(n + d)
    mixing = rng.standard_normal((d, d)) * rng.uniform(0.1, 3.0, d)  # correlated, unequal variances
    x = rng.standard_normal((n, d)) @ mixing + rng.standard_normal(d) * 5
    mean, cov, shrinkage = ledoit_wolf(x)
    ref_cov, ref_shrinkage = sklearn_ledoit_wolf(x)
    np.testing.assert_allclose(mean, x.mean(axis=0))
    assert shrinkage == pytest.approx(ref_shrinkage, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-9, atol=1e-12 * np.abs(ref_cov).max())


@pytest.mark.parametrize("n_fft, n_mels, rate", [(512, 64, 16_000), (400, 40, 16_000), (1024, 80, 22_050)])
def test_mel_filterbank_equals_librosa(n_fft, n_mels, rate):
    import librosa

    ref = librosa.filters.mel(sr=rate, n_fft=n_fft, n_mels=n_mels, fmin=0.0, fmax=rate / 2, htk=True, norm=None)
    got = mel_filterbank(n_fft, n_mels, rate).numpy()
    assert got.shape == ref.shape == (n_mels, n_fft // 2 + 1)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)

