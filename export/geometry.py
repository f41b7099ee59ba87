"""Streaming geometry derived from train.audio.CONV_LAYERS: cache sizes, outputs per step and flush, state.

A fixed-shape streaming step consumes one hop (HOP = 160 samples) per stream and keeps, per conv
layer, a cache of the not-yet-consumed tail of that layer's input. docs/streaming.md explains why
these sizes reproduce the offline model's zero padding exactly.
"""
from __future__ import annotations

from train.audio import CONV_LAYERS, HOP

STEP_SAMPLES = HOP  # samples per stream consumed by one streaming step


def cache_sizes() -> tuple[int, ...]:
    """Frames of input cached per layer: stride + padding, minus the phantom frame after layer 0.

    Layer 0's input is the waveform itself (offset 0); every later layer's input stream starts
    with one phantom frame (offset 1), which stands in for that layer's last left-padding zero.
    """
    return tuple(s + p - (0 if i == 0 else 1) for i, (_, s, p) in enumerate(CONV_LAYERS))


def step_outputs() -> tuple[int, ...]:
    """Outputs of each conv layer per streaming step (32, 8, 4, 2, 1)."""
    out, n = [], STEP_SAMPLES
    for (k, s, _), c in zip(CONV_LAYERS, cache_sizes()):
        o = (c + n - k) // s + 1
        if o * s != n:  # the cache would not stay the same size from step to step
            raise AssertionError(f"layer geometry does not give a fixed-shape step (k={k}, s={s})")
        out.append(o)
        n = o
    return tuple(out)


def flush_outputs() -> tuple[int, ...]:
    """Largest number of outputs of each conv layer at end of stream (32, 8, 5, 4, 2).

    The flush buffer of layer i is its cache, the previous layer's fixed-size flush output and
    the layer's right padding (p zeros)."""
    out, n = [], STEP_SAMPLES
    for (k, s, p), c in zip(CONV_LAYERS, cache_sizes()):
        o = (c + n + p - k) // s + 1
        out.append(o)
        n = o
    return tuple(out)


def state_spec(channels: int, hidden: int) -> list[dict]:
    """Streaming state tensors, shapes without the batch axis. Zero is the initial value of each.
    Conv caches are time-major: (frames, channels)."""
    spec = []
    for i, c in enumerate(cache_sizes()):
        spec.append({"name": f"cache_{i}", "shape": [c, 1 if i == 0 else channels], "dtype": "float32"})
    spec.append({"name": "gru_h", "shape": [hidden], "dtype": "float32"})
    spec.append({"name": "started", "shape": [1], "dtype": "float32"})
    return spec


def level_frames_per_graph(dims) -> dict[str, dict[str, int]]:
    """Frames each graph emits per call and level: {"step": {level: n}, "flush": {level: n}}, for a
    model of these train.model.ModelSpec (its conv modules end at their levels' layers; ar follows m3)."""
    res = {}
    for graph, counts in (("step", step_outputs()), ("flush", flush_outputs())):
        per = {name: counts[layers[-1]] for name, layers in dims.modules}
        per["ar"] = per["m3"]
        res[graph] = per
    return res


assert cache_sizes() == (7, 5, 3, 3, 2)
assert step_outputs() == (32, 8, 4, 2, 1)
assert flush_outputs() == (32, 8, 5, 4, 2)
