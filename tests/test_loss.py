"""InfoNCE: a vectorised implementation checked against a plain loop, and that it measures predictability."""
import math

import torch

from train.loss import InfoNCE, kl_term


def reference_infonce(nce: InfoNCE, context, targets, generator):
    """Slow per-position loop with the same random draws as InfoNCE.forward."""
    B, L, D = targets.shape
    W = min(L, nce.window)
    if L > W:
        start = int(torch.randint(0, L - W + 1, (1,), generator=generator))
        context, targets = context[:, start:start + W], targets[:, start:start + W]
    K = min(nce.steps, W - 1)
    idx = torch.randint(0, B * W, (B, W, nce.negatives), generator=generator)
    flat = targets.reshape(B * W, D)
    per_k = []
    for k in range(1, K + 1):
        losses = []
        for b in range(B):
            for t in range(W - k):
                pred = nce.predictor.weight[(k - 1) * D:k * D] @ context[b, t]
                cands = [targets[b, t + k]] + [flat[int(j)] for j in idx[b, t]]
                scores = torch.stack([pred @ c for c in cands])
                losses.append(torch.logsumexp(scores, 0) - scores[0])
        per_k.append(torch.stack(losses).mean())
    return torch.stack(per_k).mean()


def test_vectorised_matches_loop():
    torch.manual_seed(0)
    nce = InfoNCE(12, 8, steps=4, negatives=5, window=20).double()
    ctx, tgt = torch.randn(3, 30, 12, dtype=torch.float64), torch.randn(3, 30, 8, dtype=torch.float64)
    fast = nce(ctx, tgt, torch.Generator().manual_seed(7))
    slow = reference_infonce(nce, ctx, tgt, torch.Generator().manual_seed(7))
    assert torch.allclose(fast, slow, atol=1e-10)


def _fit(targets, steps=150):
    torch.manual_seed(0)
    nce = InfoNCE(targets.shape[-1], targets.shape[-1], steps=3, negatives=10, window=64)
    opt = torch.optim.Adam(nce.parameters(), lr=3e-2)
    for _ in range(steps):
        loss = nce(targets, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(nce(targets, targets))


def test_predictable_sequence_scores_lower_than_noise():
    torch.manual_seed(0)
    B, L, D = 8, 64, 16
    # A predictable sequence: each vector is a fixed rotation of the previous one.
    rot = torch.linalg.qr(torch.randn(D, D))[0]
    z = [torch.randn(B, D)]
    for _ in range(L - 1):
        z.append(z[-1] @ rot)
    predictable = 3 * torch.stack(z, 1)
    noise = 3 * torch.randn(B, L, D)
    chance = math.log(11)
    assert _fit(predictable) < 0.3 * chance
    assert _fit(noise) > 0.8 * chance


def test_kl_term_normalisation():
    mu, logvar = torch.ones(2, 5, 4), torch.zeros(2, 5, 4)
    # per element 0.5 * mu^2 = 0.5; summed over time and channels (20) / (batch 2 * channels 4)
    assert torch.isclose(kl_term(mu, logvar), torch.tensor(0.5 * 2 * 5 * 4 / (2 * 4)))
