"""The OOD flag on real signals, scored as the server scores them (serve.runtime + serve.scoring).

The served test model is a random encoder calibrated on 10 held-out words of the small corpus;
the other 10 test words are the in-distribution check. A random encoder knows nothing about speech,
but its first module already responds to the spectrum and level of its input: at m1, loud white
noise, pure tones and hard-clipped words must be flagged on most frames, held-out words and silence
on few. (What a trained model flags, per signal and level: bench/ood_flags.py, docs/reliability.md.)
Measured with this model: m1 flags 100 % of the noise at RMS 0.1 and 0.3, ~50 % of the tones, ~98 %
of the clipped words, ~12 % of the held-out words' frames (its window reference is only five words)
and under 1 % of silence.
"""
from __future__ import annotations

import numpy as np
import pytest

from export.onnx import reference_indices
from export.ood_signals import signal_set
from export.streams import encode_streams
from serve.runtime import StreamingModel
from serve.scoring import Scorer
from train.audio import load_audio
from train.corpus import load_corpus


@pytest.fixture(scope="module")
def flag_rates(model, small_corpus) -> dict[str, dict[str, float]]:
    served = StreamingModel(model[0])
    exp = served.manifest["export"]
    test = load_corpus(small_corpus, "test")
    used = set(reference_indices(len(test), exp["calibration_clips"], exp["seed"]))
    words = [load_audio(u.path) for i, u in enumerate(test) if i not in used]
    assert len(words) == 10
    scorer = Scorer(served.manifest)
    rates = {}
    for name, clips in {"held-out words": words, **signal_set(words, 6, seed=0)}.items():
        encoded = encode_streams(served, clips, [[1600]] * len(clips))
        rates[name] = {lv: float(np.concatenate([scorer.score(lv, {"maha": e[f"maha_{lv}"]}).ood
                                                 for e in encoded]).mean()) for lv in served.levels}
    return rates


def test_loud_noise_tones_and_clipping_are_flagged_and_held_out_words_mostly_not(flag_rates):
    m1 = {name: r["m1"] for name, r in flag_rates.items()}
    assert m1["white noise, RMS 0.1"] >= 0.9 and m1["white noise, RMS 0.3"] >= 0.9
    assert m1["pure tone"] >= 0.3
    assert m1["clipped words"] >= 0.9
    assert m1["held-out words"] <= 0.2 and m1["silence"] <= 0.05
    # the deeper levels of a random encoder separate nothing, but they must not flag held-out words
    # much more often than the calibrated 1 % of windows
    assert all(flag_rates["held-out words"][lv] <= 0.05 for lv in ("m2", "m3", "ar"))


def test_the_window_flags_what_single_frames_miss(model, small_corpus):
    """Tones at m1: a per-frame threshold (a window of 1) at the same false-positive rate flags
    fewer of their frames than the served window does."""
    from export import calibration
    from serve.scoring import flags, rolling_mean

    served = StreamingModel(model[0])
    exp = served.manifest["export"]
    test = load_corpus(small_corpus, "test")
    ref_idx = reference_indices(len(test), exp["calibration_clips"], exp["seed"])
    _, scoring = calibration.split_halves(len(ref_idx))
    reference = encode_streams(served, [load_audio(test[ref_idx[i]].path) for i in scoring], [[1600]] * len(scoring))
    tones = encode_streams(served, signal_set([], 6, seed=0)["pure tone"], [[1600]] * 12)
    window = served.manifest["calibration"]["levels"]["m1"]["window_frames"]
    rates = {}
    for w in (1, window):
        thr = calibration.level_reference([r["maha_m1"] for r in reference], w, 0.01)["threshold"]
        if w == window:  # the export's own calibration, recomputed from the streamed frames
            assert thr == pytest.approx(served.manifest["calibration"]["levels"]["m1"]["threshold"], rel=1e-3)
        rates[w] = float(np.concatenate([flags(rolling_mean(t["maha_m1"], w), thr) for t in tones]).mean())
    assert rates[window] > rates[1] + 0.1
