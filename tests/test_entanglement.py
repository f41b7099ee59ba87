"""The batched entanglement score against its definition (paper Table 3)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from train.decoder import Decoder
from train.entanglement import default_ks, dim_ranks, mix, relative_errors, relative_errors_reference, sample_pairs


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    decoder = Decoder("m3", in_channels=12, width=8).eval()
    z = torch.randn(6, 7, 12)  # 6 words, 7 frames, 12 dims
    pairs = sample_pairs(6, 8, seed=1)
    return decoder, z, pairs


def test_ends_are_one_and_zero(case):
    decoder, z, pairs = case
    res = relative_errors(decoder, z, pairs, [0, 12, 50], batch=5)
    assert np.all(res["per_pair"][:, 0] == 1.0)
    assert np.all(res["per_pair"][:, 1] == 0.0)
    assert np.all(res["per_pair"][:, 2] == 0.0)  # k beyond the width copies everything too


def test_batched_agrees_with_reference_loop(case):
    decoder, z, pairs = case
    ks = [0, 1, 2, 3, 5, 8, 12]
    fast = relative_errors(decoder, z, pairs, ks, batch=4)  # several chunks, one partly filled
    slow = relative_errors_reference(decoder, z, pairs, ks)
    np.testing.assert_allclose(fast["per_pair"], slow, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fast["mean"], slow.mean(0), rtol=1e-4, atol=1e-6)
    assert fast["ks"] == ks
    # a real decoder gives intermediate values in between
    assert 0.0 < fast["mean"][3] < 1.0


def test_copying_the_differing_dims_first():
    z1 = torch.zeros(1, 4, 5)
    z2 = torch.zeros(1, 4, 5)
    z2[0, :, 3] = 5.0  # dim 3 differs most, then dim 1
    z2[0, :, 1] = -2.0
    ranks = dim_ranks(z1.mean(1), z2.mean(1))
    assert ranks[0, 3] == 0 and ranks[0, 1] == 1
    mixed = mix(z1, z2, ranks, torch.tensor([1]))
    assert torch.equal(mixed[0, :, 3], z2[0, :, 3]) and torch.equal(mixed[0, :, 1], z1[0, :, 1])


def test_default_ks_and_pairs():
    assert default_ks(512) == [2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert default_ks(24) == [2, 4, 8, 16, 24]
    pairs = sample_pairs(10, 30, seed=0)
    assert pairs.shape == (30, 2)
    assert np.all(pairs[:, 0] != pairs[:, 1])
    assert len({tuple(p) for p in pairs.tolist()}) == 30
    assert np.array_equal(pairs, sample_pairs(10, 30, seed=0))
    voices = ["a", "a", "b", "b", "b", "c"]
    grouped = sample_pairs(6, 100, seed=0, groups=voices)
    assert len(grouped) == 2 + 6  # all same-voice ordered pairs; "c" has none
    assert all(voices[a] == voices[b] for a, b in grouped)
    with pytest.raises(ValueError):
        sample_pairs(1, 3)
