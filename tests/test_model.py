"""The encoder's geometry, determinism and greedy gradient isolation."""
import pytest
import torch

from train.audio import HOP, LEFT_REACH, RECEPTIVE_FIELD, level_frames
from train.loss import SimLoss
from train.model import Encoder, ModelSpec, fold_batch_norm, kl_to_standard_normal

SMALL = dict(channels=32, hidden=16)


def test_frame_counts_full_size():
    enc = Encoder(ModelSpec("sim")).eval()
    out = enc(torch.randn(2, 10240))
    assert {k: v.mu.shape for k, v in out.items()} == {
        "m1": (2, 511, 512), "m2": (2, 129, 512), "m3": (2, 64, 512), "ar": (2, 64, 256)}
    assert out["m1"].logvar.shape == (2, 511, 512)


@pytest.mark.parametrize("n", [100, 252, 253, 1000, 5000, 5003, 10240])
def test_frame_counts_match_the_constants(n):
    enc = Encoder(ModelSpec("gim", **SMALL)).eval()
    out = enc.encode(torch.randn(1, n))
    assert {k: v.shape[1] for k, v in out.items()} == level_frames(n)


def test_receptive_field_and_left_reach():
    """Frame f of m3 depends exactly on samples [160 f - 212, 160 f + 252]."""
    torch.manual_seed(0)
    enc = Encoder(ModelSpec("cpc", **SMALL)).double().eval()  # no gradient cut
    n = 3200
    x = torch.randn(1, n, dtype=torch.float64, requires_grad=True)
    m3 = enc(x)["m3"].mu
    for f in (0, 5, 10):
        (g,) = torch.autograd.grad(m3[0, f].sum(), x, retain_graph=True)
        nz = torch.nonzero(g[0]).flatten()
        lo, hi = HOP * f - LEFT_REACH, HOP * f - LEFT_REACH + RECEPTIVE_FIELD - 1
        assert int(nz.min()) == max(0, lo) and int(nz.max()) == hi


def test_gim_and_inference_are_deterministic_sim_training_samples():
    torch.manual_seed(0)
    x = torch.randn(2, 2000)
    gim = Encoder(ModelSpec("gim", **SMALL))
    a, b = gim(x, sample=True), gim(x, sample=True)
    assert all(torch.equal(a[k].z, b[k].z) for k in a)
    sim = Encoder(ModelSpec("sim", **SMALL))
    a, b = sim(x, sample=True), sim(x, sample=True)
    assert not torch.equal(a["m1"].z, b["m1"].z)
    assert not torch.equal(a["m1"].z, a["m1"].context)  # context is a second, independent sample
    e1, e2 = sim.encode(x), sim.encode(x)
    assert all(torch.equal(e1[k], e2[k]) for k in e1)
    assert torch.equal(e1["m1"], a["m1"].mu)


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(3, 7, 16), torch.randn(3, 7, 16)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    ref = torch.distributions.kl_divergence(q, p).sum(-1)
    assert torch.allclose(kl_to_standard_normal(mu, logvar), ref, atol=1e-5)


def _grads_of(method, level):
    torch.manual_seed(0)
    dims = ModelSpec(method, **SMALL)
    enc, crit = Encoder(dims), SimLoss(dims)
    nce, _, kl = crit.module_losses(enc(torch.randn(2, 4000), sample=True))[level]
    (nce if kl is None else nce + kl).backward()
    return enc


@pytest.mark.parametrize("method", ["sim", "gim"])
def test_greedy_modules_are_isolated(method):
    enc = _grads_of(method, "m2")
    first = enc.convs["m1"].convs[0].weight.grad
    assert first is None or torch.count_nonzero(first) == 0
    assert torch.count_nonzero(enc.convs["m2"].convs[0].weight.grad) > 0
    enc = _grads_of(method, "ar")
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in enc.convs.parameters())
    assert torch.count_nonzero(enc.gru.weight_ih_l0.grad) > 0


def test_cpc_trains_end_to_end():
    enc = _grads_of("cpc", "ar")
    assert torch.count_nonzero(enc.convs["m3"].convs[0].weight.grad) > 0


def test_kl_term_backpropagates_to_its_module_only():
    torch.manual_seed(0)
    dims = ModelSpec("sim", **SMALL)
    enc, crit = Encoder(dims), SimLoss(dims, beta=1.0)
    total, stats = crit(enc(torch.randn(2, 4000), sample=True))
    assert set(stats) >= {"nce_m1", "kl_m1", "nce_m2", "kl_m2", "nce_m3", "kl_m3", "nce_ar", "loss"}
    total.backward()
    assert torch.count_nonzero(enc.convs["m1"].logvar.weight.grad) > 0


def test_batch_norm_sits_between_conv_and_relu_and_folds_exactly():
    torch.manual_seed(0)
    enc = Encoder(ModelSpec("sim", batch_norm=True, **SMALL))
    assert all(len(m.norms) == len(m.convs) for m in enc.convs.values())
    enc.train()
    for _ in range(3):  # move the running statistics away from their initial values
        enc(torch.randn(4, 4000) * 0.3, sample=True)
    enc.eval()
    norm = enc.convs["m1"].norms[0]
    assert not torch.allclose(norm.running_mean, torch.zeros_like(norm.running_mean))
    folded = fold_batch_norm(enc)
    assert not folded.dims.batch_norm and all(m.norms is None for m in folded.convs.values())
    x = torch.randn(2, 5003) * 0.3
    a, b = enc.encode(x), folded.encode(x)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), key
    plain = Encoder(ModelSpec("gim", **SMALL))
    assert fold_batch_norm(plain) is plain
