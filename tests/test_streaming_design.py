"""The streaming design in torch (export/streaming.py): fixed-shape hops + caches reproduce the offline Encoder."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from export.geometry import cache_sizes, flush_outputs, level_frames_per_graph, state_spec, step_outputs
from export.offline import offline_levels
from export.scores import make_scorers
from export.streaming import StreamingFlush, StreamingStep, level_dims_of, stream_torch
from train.audio import CONV_LAYERS, HOP, LEFT_REACH, RECEPTIVE_FIELD, frames_per_layer, level_frames
from train.model import Encoder, ModelSpec

SMALL = dict(channels=32, hidden=16)
LENGTHS = sorted(set(range(1, 701, 9)) | {252, 253, 254, 413, 5000, 5003})


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny convolutions: one thread is fastest and does not stall when other processes load the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_encoder(method: str, seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(ModelSpec(method=method, **SMALL)).eval()


def random_gaussians(enc: Encoder, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {level: (rng.standard_normal(dim).astype(np.float32), rng.standard_normal((dim, dim)).astype(np.float32) / 4)
            for level, dim in level_dims_of(enc).items()}


def assert_close(got: np.ndarray, ref: np.ndarray, what: str, tol: float = 1e-4):
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    if ref.size:
        err = np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-6)
        assert err <= tol, f"{what}: max abs error / scale {err:.3g}"


def test_geometry_follows_from_the_layer_table():
    assert cache_sizes() == (7, 5, 3, 3, 2)
    assert step_outputs() == (32, 8, 4, 2, 1)
    assert flush_outputs() == (32, 8, 5, 4, 2)
    # a step consumes exactly its own input and keeps the cache size: outputs * stride == new inputs
    n = HOP
    for (k, s, _), c, o in zip(CONV_LAYERS, cache_sizes(), step_outputs()):
        assert (c + n - k) // s + 1 == o and o * s == n and k - s <= c < k
        n = o
    spec = state_spec(32, 16)
    assert [s["name"] for s in spec] == ["cache_0", "cache_1", "cache_2", "cache_3", "cache_4", "gru_h", "started"]
    assert [s["shape"] for s in spec][:2] == [[7, 1], [5, 32]] and spec[5]["shape"] == [16]
    assert level_frames_per_graph(ModelSpec("sim"))["step"] == {"m1": 8, "m2": 2, "m3": 1, "ar": 1}
    assert level_frames_per_graph(ModelSpec("cpc"))["flush"] == {"m3": 2, "ar": 2}


def test_offline_reference_is_the_encoder():
    enc = small_encoder("sim")
    audio = (0.3 * np.random.default_rng(1).standard_normal(3001)).astype(np.float32)
    ref = offline_levels(enc, audio)
    with torch.no_grad():
        out = enc.encode(torch.from_numpy(audio)[None])
    for key, value in out.items():
        name = key if key.startswith("kl_") else f"mu_{key}"
        np.testing.assert_array_equal(ref[name], value[0].numpy())


@pytest.mark.parametrize("method", ["sim", "gim", "cpc"])
def test_hop_by_hop_streaming_equals_offline_at_every_length(method):
    """Lengths 1..700 (below the first frame's 253 samples too), 5000 and 5003: same frames, first and last."""
    enc = small_encoder(method)
    gaussians = random_gaussians(enc)
    scorers = make_scorers(level_dims_of(enc), gaussians)
    rng = np.random.default_rng(2)
    for n in LENGTHS:
        audio = (0.3 * rng.standard_normal(n)).astype(np.float32)
        got, ref = stream_torch(enc, audio, gaussians), offline_levels(enc, audio, scorers)
        counts = level_frames(n)
        for level in enc.dims.levels:
            assert got[f"mu_{level}"].shape[0] == counts[level], (method, n, level)
        assert set(got) == set(ref)
        for key in ref:
            assert_close(got[key], ref[key], f"{method} n={n} {key}")


def test_frame_counts_at_the_end_of_a_stream():
    enc = small_encoder("sim")
    for n, top in ((5000, 31), (5003, 32), (252, 2), (10240, 64)):
        got = stream_torch(enc, np.zeros(n, np.float32))
        assert got["mu_m3"].shape[0] == got["mu_ar"].shape[0] == top == level_frames(n)["m3"]


def test_first_step_emits_phantom_then_one_top_frame_per_hop():
    """Step t (0-based) emits top frame t-1: the first step's top output is the phantom; m1/m2 lose one frame."""
    enc = small_encoder("sim")
    step = StreamingStep(enc).eval()
    names = step.output_names()
    state = step.initial_state(1)
    audio = torch.randn(1, 6 * HOP) * 0.3
    emitted = {"m1": [], "m2": [], "m3": []}
    with torch.no_grad():
        for t in range(6):
            out = dict(zip(names, step(audio[:, t * HOP:(t + 1) * HOP], *state)))
            for level in emitted:
                emitted[level].append(int(out[f"valid_{level}"].sum()))
            assert bool(out["valid_ar"].all()) == (t > 0)
            state = [out[f"next_{n}"] for n in step.state_names]
            assert float(state[-1]) == 1.0
    assert emitted == {"m1": [7, 8, 8, 8, 8, 8], "m2": [1, 2, 2, 2, 2, 2], "m3": [0, 1, 1, 1, 1, 1]}
    # top frame f comes out of step f+1, the earliest step whose samples reach its last input sample
    # (160 f - LEFT_REACH + RECEPTIVE_FIELD - 1 = 160 f + 252)
    for f in range(5):
        out_at = next(t for t in range(6) if sum(emitted["m3"][:t + 1]) > f)
        earliest = next(t for t in range(6) if (t + 1) * HOP >= HOP * f - LEFT_REACH + RECEPTIVE_FIELD)
        assert out_at == earliest == f + 1


def test_step_outputs_do_not_depend_on_other_streams_in_the_batch():
    enc = small_encoder("gim")
    step = StreamingStep(enc).eval()
    a = torch.randn(3, HOP)
    state = [torch.rand_like(s) for s in step.initial_state(3)]
    state[-1] = torch.tensor([[0.0], [1.0], [1.0]])
    with torch.no_grad():
        together = step(a, *state)
        for i in range(3):
            alone = step(a[i:i + 1], *[s[i:i + 1] for s in state])
            for x, y in zip(together, alone):
                torch.testing.assert_close(x[i:i + 1], y, rtol=1e-5, atol=1e-6)


def test_flush_ignores_samples_beyond_tail_len():
    enc = small_encoder("sim")
    flush = StreamingFlush(enc).eval()
    state = flush.initial_state(1)
    tail = torch.randn(1, HOP)
    noisy = tail.clone()
    noisy[0, 50:] = 7.0
    with torch.no_grad():
        a = flush(tail * (torch.arange(HOP) < 50), torch.tensor([50]), *state)
        b = flush(noisy, torch.tensor([50]), *state)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_full_size_shapes_and_equivalence():
    torch.manual_seed(0)
    enc = Encoder(ModelSpec(method="sim")).eval()
    step = StreamingStep(enc).eval()
    with torch.no_grad():
        out = dict(zip(step.output_names(), step(torch.randn(2, HOP), *step.initial_state(2))))
    assert out["mu_m1"].shape == (2, 8, 512) and out["logvar_m2"].shape == (2, 2, 512)
    assert out["mu_ar"].shape == (2, 1, 256) and out["kl_m3"].shape == (2, 1)
    assert out["next_cache_0"].shape == (2, 7, 1) and out["next_cache_4"].shape == (2, 2, 512)
    assert out["next_gru_h"].shape == (2, 256)
    audio = (0.3 * np.random.default_rng(3).standard_normal(1203)).astype(np.float32)
    got, ref = stream_torch(enc, audio), offline_levels(enc, audio, make_scorers(level_dims_of(enc), None))
    assert got["mu_m3"].shape == (level_frames(1203)["m3"], 512)
    for key in ref:
        assert_close(got[key], ref[key], f"full size {key}")


def test_flush_sizes_are_exactly_what_the_longest_tail_needs():
    """Frames left for the flush (offline count minus what the steps emitted) never exceed the flush graph's
    fixed outputs, and reach them: 32, 8, 5, 4, 2 once started (31, 7, 4, 3, 1 plus the phantom before)."""
    for hops in range(4):
        most = [0] * 5
        for tail in range(HOP):
            end = frames_per_layer(hops * HOP + tail)
            emitted = [hops * o - 1 if hops else 0 for o in step_outputs()]
            most = [max(m, e - d) for m, e, d in zip(most, end, emitted)]
            assert all(e >= d for e, d in zip(end, emitted))
        phantom = 0 if hops else 1
        assert [m + phantom for m in most] == list(flush_outputs()), hops
