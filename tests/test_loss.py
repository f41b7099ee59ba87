"""InfoNCE: a vectorised implementation checked against a plain loop, and that it measures predictability."""
import math

import pytest
import torch

from train.loss import SCORINGS, WINDOW, InfoNCE, kl_term


def reference_infonce(nce: InfoNCE, context, targets, generator):
    """Slow per-position loop with the same random draws as InfoNCE.forward."""
    B, L, D = targets.shape
    full_targets = targets
    W = min(L, nce.window)
    if L > W:
        start = int(torch.randint(0, L - W + 1, (1,), generator=generator))
        context, targets = context[:, start:start + W], targets[:, start:start + W]
    K = min(nce.steps, W - 1)
    pool = full_targets if nce.negatives_from == "sequence" else targets
    idx = torch.randint(0, B * pool.shape[1], (B, W, nce.negatives), generator=generator)
    flat = pool.reshape(-1, D)
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


@pytest.mark.parametrize("scoring", SCORINGS)
@pytest.mark.parametrize("negatives_from", ["sequence", "window"])
def test_vectorised_matches_loop(negatives_from, scoring):
    torch.manual_seed(0)
    nce = InfoNCE(12, 8, steps=4, negatives=5, window=20, negatives_from=negatives_from, scoring=scoring).double()
    ctx, tgt = torch.randn(3, 30, 12, dtype=torch.float64), torch.randn(3, 30, 8, dtype=torch.float64)
    fast, _ = nce(ctx, tgt, torch.Generator().manual_seed(7))
    slow = reference_infonce(nce, ctx, tgt, torch.Generator().manual_seed(7))
    assert torch.allclose(fast, slow, atol=1e-10)


@pytest.mark.parametrize("negatives_from", ["sequence", "window"])
def test_lean_scoring_equals_the_reference_in_float32(negatives_from):
    """Same draws (same generator seed), float32, the model's window: the loss and every gradient agree
    to 1e-5, the accuracy up to a near-tie."""
    torch.manual_seed(0)
    B, L, D = 3, 300, 64
    ctx, tgt = torch.randn(B, L, 32), torch.randn(B, L, D) * 0.3
    results = []
    for scoring in ("reference", "lean"):
        torch.manual_seed(1)
        nce = InfoNCE(32, D, negatives_from=negatives_from, scoring=scoring)
        c, t = ctx.clone().requires_grad_(), tgt.clone().requires_grad_()
        loss, acc = nce(c, t, torch.Generator().manual_seed(7))
        loss.backward()
        results.append((loss.detach(), acc, c.grad, t.grad, nce.predictor.weight.grad))
    (ref_loss, ref_acc, *ref_grads), (loss, acc, *grads) = results
    assert abs(float(ref_loss - loss)) <= 1e-5
    for ref, lean in zip(ref_grads, grads):
        assert float((ref - lean).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))
    assert abs(float(ref_acc - acc)) < 1e-3  # a count of strict wins: a near-tie may flip after rounding
    assert float(results[0][0]) > 1.0  # a real loss (untrained: near log 11), not zeros compared with zeros


def test_unknown_scoring_is_refused():
    with pytest.raises(ValueError, match="scoring"):
        InfoNCE(4, 4, scoring="fast")


def test_negatives_come_from_the_whole_sequence_by_default():
    """A sequence 10x longer than the window whose frames outside the window score huge: drawn
    as negatives (sequence pool, the default) they dominate the loss; the window pool never
    sees them."""
    B, L, D = 2, 1280, 4
    targets = torch.ones(B, L, D, dtype=torch.float64)
    nce = InfoNCE(D, D, steps=1, negatives=10).double()
    nce.predictor.weight.data.fill_(0.1)
    g = torch.Generator().manual_seed(5)
    start = int(torch.randint(0, L - WINDOW + 1, (1,), generator=torch.Generator().manual_seed(5)))
    outside = torch.ones(L, dtype=torch.bool)
    outside[start:start + WINDOW] = False
    targets[:, outside] = 1000.0
    loss, _ = nce(targets, targets, g)
    assert float(loss.detach()) > 100
    window = InfoNCE(D, D, steps=1, negatives=10, negatives_from="window").double()
    window.predictor.weight.data.fill_(0.1)
    loss, _ = window(targets, targets, torch.Generator().manual_seed(5))
    assert abs(float(loss.detach()) - math.log(11)) < 1e-9  # every candidate equal: chance


def rotating_sequence(B: int, L: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A predictable sequence (B, L, D): each vector is a fixed rotation of the previous one; and the rotation."""
    rot = torch.linalg.qr(torch.randn(D, D))[0]
    z = [torch.randn(B, D)]
    for _ in range(L - 1):
        z.append(z[-1] @ rot)
    return 3 * torch.stack(z, 1), rot


def test_accuracy_counts_positives_ranked_first():
    torch.manual_seed(0)
    D = 16
    seq, rot = rotating_sequence(4, 64, D)
    nce = InfoNCE(D, D, steps=1, negatives=10, window=64)
    nce.predictor.weight.data.copy_(rot.T * 10)  # predicts z_{t+1} = z_t @ rot exactly (scaled)
    loss, acc = nce(seq, seq)
    assert float(acc) > 0.95 and float(loss.detach()) < 0.5
    nce.predictor.weight.data.zero_()  # every score ties at 0: nothing ranks strictly first
    _, acc = nce(seq, seq)
    assert float(acc) == 0.0


def _fit(targets, steps=150):
    torch.manual_seed(0)
    nce = InfoNCE(targets.shape[-1], targets.shape[-1], steps=3, negatives=10, window=64)
    opt = torch.optim.Adam(nce.parameters(), lr=3e-2)
    for _ in range(steps):
        loss, _ = nce(targets, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(nce(targets, targets)[0])


def test_predictable_sequence_scores_lower_than_noise():
    torch.manual_seed(0)
    B, L, D = 8, 64, 16
    predictable, _ = rotating_sequence(B, L, D)
    noise = 3 * torch.randn(B, L, D)
    chance = math.log(11)
    assert _fit(predictable) < 0.3 * chance
    assert _fit(noise) > 0.8 * chance


def test_kl_term_normalisation():
    mu, logvar = torch.ones(2, 5, 4), torch.zeros(2, 5, 4)
    # per element 0.5 * mu^2 = 0.5; summed over time and channels (20) / (batch 2 * channels 4)
    assert torch.isclose(kl_term(mu, logvar), torch.tensor(0.5 * 2 * 5 * 4 / (2 * 4)))
