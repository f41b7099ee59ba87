"""int8 streaming step for CPU serving: `python -m export.onnx CHECKPOINT --out DIR --int8`.

The fp32 step graph spends most of its time in the Gemms of conv layers 2-5. Those are quantized
statically (onnxruntime QDQ): int8 weights per output channel, uint8 activations with FIXED
scales measured on the calibration audio, so every stream's frames still depend on that stream
alone (dynamic quantization would take its activation scale from the whole batch, i.e. from the
other streams). The Mahalanobis scorers and the posterior heads get int8 weights and a scale per
row computed at run time (export.rowquant: each row is one frame of one stream, so this too keeps
streams independent); with static scales the heads had doubled the error. The first module's heads
get two int8 parts per weight (see quantization_targets). The first conv (raw audio in, 10 inputs
per frame) and the GRU stay fp32.

Activation scales are the 0.01st and 99.99th percentiles of each quantized input on the
calibration clips rather than its min and max: a few outliers would otherwise stretch the scale of
every frame (the measurements, and what else was tried: docs/benchmarks.md).

The int8 model is an approximation of the fp32 one, so the export measures it instead of
asserting equality: per level, the relative RMS error and the lowest per-frame cosine similarity
of the int8 latents against the fp32 streaming latents, on the calibration words AND on audio
unlike them (check_signals: white noise at several levels, pure tones, and any recordings given
with --int8-check, e.g. real speech), written to the manifest's "quantization" entry per signal;
an export whose error on any of them exceeds MAX_REL_RMS fails. The activation scales are taken
over the same wider mix, so audio unlike the words does not fall outside them. The OOD
reference scores (p-values, thresholds) are then re-measured with the int8 step, so the
calibrated false-positive rate holds for what the server computes.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
from pathlib import Path

import numpy as np

from export import calibration
from export.streams import StepGraphs, encode_streams
from serve.runtime import StreamingModel

STEP, STEP_FP32 = "step.onnx", "step.fp32.onnx"
MAX_REL_RMS = 0.05  # int8 latents further than this from fp32 (relative RMS, any level) fail the export
CALIB_PERCENTILE = 99.99  # activation range: this percentile of |x| on the calibration feeds
MIX_SHARE = 0.25  # audio other than the words in the activation-scale calibration, relative to the words
MIN_GEMM_INPUTS = 64  # Gemms with fewer inputs per row (the first conv: 10 samples) stay fp32
_CONV_GEMM = re.compile(r"^/Gemm(_\d+)?$")  # conv layers and heads
_SCORER = re.compile(r"^/(m\d+|ar)/Gemm$")  # the Mahalanobis scorers


def quantization_targets(model_path: Path, conv_kernels: set[int], channels: int
                         ) -> tuple[list[str], list[str], list[str]]:
    """The step graph's Gemms to quantize, read in one pass: (static, per-row, two-part).

    - static QDQ: the conv layers, with inputs per row (kernel x input channels) in conv_kernels
      and at least MIN_GEMM_INPUTS (the first conv, 10 raw samples per row, stays fp32);
    - per-row (export.rowquant): the Mahalanobis scorers (/<level>/Gemm) and the posterior heads
      (`channels` inputs per row) of every module;
    - two-part: of those, the first module's heads get each weight as two int8 parts (about 15
      bits): the m1 latents are a small difference of large products there, which one int8 part
      rounds too coarsely (docs/benchmarks.md)."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    dims = {i.name: list(i.dims) for i in graph.initializer}
    convs, heads, scorers = [], [], []
    for node in graph.node:
        if node.op_type != "Gemm":
            continue
        inputs = (dims.get(node.input[1]) or [None])[0]
        if _SCORER.match(node.name):
            scorers.append(node.name)
        elif _CONV_GEMM.match(node.name) and inputs == channels:
            heads.append(node.name)
        elif _CONV_GEMM.match(node.name) and inputs in conv_kernels and inputs >= MIN_GEMM_INPUTS:
            convs.append(node.name)
    return convs, heads + scorers, heads[:1]


def conv_inputs(encoder) -> set[int]:
    """Inputs per output row (k x C_in) of the encoder's conv layers after the first."""
    convs = [c for m in encoder.convs.values() for c in m.convs]
    return {c.weight.shape[1] * c.weight.shape[2] for c in convs[1:]}


def step_feeds(model: StepGraphs, audios: list[np.ndarray], max_feeds: int, seed: int) -> list[dict]:
    """Inputs of the fp32 step graph while it streams the clips (batch of one), at most max_feeds of them."""
    feeds = []
    for audio in audios:
        state = model.initial_state(1)
        for t in range(audio.size // model.hop):
            hop = audio[None, t * model.hop:(t + 1) * model.hop].astype(np.float32)
            feeds.append({"audio": hop, **state})
            _, state = model.step(hop, state)
    if len(feeds) > max_feeds:
        keep = np.sort(np.random.default_rng(seed).choice(len(feeds), max_feeds, replace=False))
        feeds = [feeds[i] for i in keep]
    return feeds


def quantize_step(model_dir: Path, audios: list[np.ndarray], nodes: list[str], row_nodes: list[str],
                  two_part: list[str] = (), seed: int = 0, max_feeds: int = 2000) -> dict:
    """Quantize DIR/step.onnx (fp32, as written) in place; the fp32 graph is kept as step.fp32.onnx.
    `nodes`: Gemms quantized statically; `row_nodes`: Gemms given per-row scales (export.rowquant),
    those also in `two_part` with two-part weights.

    Returns the manifest's "quantization" entry (without the accuracy figures)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from export.rowquant import rowquant_gemms

    fp32_path, int8_path = model_dir / STEP_FP32, model_dir / STEP
    shutil.copyfile(int8_path, fp32_path)
    if not nodes:
        raise RuntimeError(f"{fp32_path}: found no conv Gemm nodes to quantize")
    feeds = step_feeds(StepGraphs(model_dir), audios, max_feeds, seed)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    tmp = model_dir / "step.int8.tmp.onnx"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its "consider pre-processing" advice does not apply here
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the percentile calibrator prints its progress
            quantize_static(str(fp32_path), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["Gemm"], nodes_to_quantize=nodes, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            reduce_range=True,  # 7-bit weights: no int16 saturation without VNNI (rowquant)
                            calibrate_method=CalibrationMethod.Percentile,
                            extra_options={"CalibPercentile": CALIB_PERCENTILE})
    finally:
        root.setLevel(level)
    row_done = []
    if row_nodes:
        graph = onnx.load(str(tmp))
        row_done = rowquant_gemms(graph, row_nodes, frozenset(two_part))
        onnx.save(graph, str(tmp))
    tmp.replace(int8_path)
    for extra in model_dir.glob("*-inferred.onnx"):  # the quantizer's scratch copies, if it leaves any
        extra.unlink()
    return {"graph": STEP, "fp32_graph": STEP_FP32, "method": "static QDQ: int8 per-channel weights, uint8 "
            f"activations with fixed scales (percentile {CALIB_PERCENTILE}), conv layers 2-5; int8 weights and "
            "a run-time scale per row (frame) for the Mahalanobis scorers and the posterior heads (the first "
            "module's heads with two int8 parts per weight)",
            "nodes": nodes, "row_quantized": row_done, "two_part": [n for n in row_done if n in two_part],
            "calibration_feeds": len(feeds)}


def accuracy(fp32: list[dict], int8: list[dict], levels: list[str]) -> dict:
    """Per level: relative RMS error and the lowest per-frame cosine of int8 vs fp32 latents."""
    out = {}
    for level in levels:
        a = np.concatenate([r[level] for r in int8]).astype(np.float64)
        b = np.concatenate([r[level] for r in fp32]).astype(np.float64)
        rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        ok = norms > 1e-12
        cos = np.sum(a * b, axis=1)[ok] / norms[ok]
        out[level] = {"rel_rms_err": rel, "min_cosine": float(cos.min()) if cos.size else 1.0,
                      "mean_cosine": float(cos.mean()) if cos.size else 1.0}
    return out


def recalibrate(calib: dict, int8: list[dict], levels: list[str], fpr: float) -> dict:
    """The calibration's reference scores and thresholds re-measured on the int8 step's outputs
    (same scoring half of the clips and windows as export.calibration; the baked Gaussians are unchanged)."""
    _, score_idx = calibration.split_halves(len(int8))
    new = {**calib, "levels": {}, "measured_with": "int8 step"}
    for level in levels:
        old = calib["levels"][level]
        scores = {kind: [int8[i][f"{kind}_{level}"] for i in score_idx]
                  for kind in ("maha", "kl") if f"{kind}_{level}" in int8[0]}
        new["levels"][level] = {**old, **calibration.reference_entry(scores, old["window_frames"], fpr)}
    return new


def check_signals(extra: dict[str, list[np.ndarray]] | None = None, per_kind: int = 6, seed: int = 0
                  ) -> dict[str, list[np.ndarray]]:
    """Audio unlike the calibration words the int8 step is calibrated and checked on: white noise at
    each level of export.ood_signals.NOISE_LEVELS, pure tones, and `extra` (name: clips)."""
    from export.ood_signals import NOISE_LEVELS, white_noise
    from train.ood import synthetic_signals

    out = {"white noise": [c for i, rms in enumerate(NOISE_LEVELS) for c in white_noise(rms, 2, seed + i)],
           "pure tones": synthetic_signals(per_kind, seed)["pure tone"]}
    out.update(extra or {})
    return out


def calibration_mix(words: list[np.ndarray], check: dict[str, list[np.ndarray]]) -> list[np.ndarray]:
    """The words and, taken in turn from every check signal, other clips of at most MIX_SHARE of the
    words' samples: the activation scales cover audio unlike the words while the words keep their
    resolution."""
    budget = MIX_SHARE * sum(w.size for w in words)
    queues = [list(clips) for clips in check.values()]
    mix, used = list(words), 0
    while any(queues):
        for q in queues:
            if q:
                clip = q.pop(0)
                if used + clip.size <= budget:
                    mix.append(clip)
                    used += clip.size
    return mix


def encode_hops(model: StreamingModel, audios: list[np.ndarray]) -> list[dict]:
    """The clips streamed one hop per chunk, as a live stream."""
    return encode_streams(model, audios, [[model.hop]] * len(audios))


def quantize_export(model_dir: Path, encoder, audios: list[np.ndarray], calib: dict, fpr: float,
                    seed: int, check: dict[str, list[np.ndarray]] | None = None) -> tuple[dict, dict]:
    """Quantize the step, measure it against the fp32 step on the calibration words and on `check`
    (name: clips, check_signals()), re-calibrate. Returns (quantization entry, calibration). On
    failure the fp32 step is put back."""
    check = check_signals() if check is None else check
    fp32_model = StreamingModel(model_dir, verify=False)
    signals = {"calibration words": audios, **check}
    fp32 = {name: encode_hops(fp32_model, clips) for name, clips in signals.items()}
    try:
        convs, rows, two_part = quantization_targets(model_dir / STEP, conv_inputs(encoder), encoder.dims.channels)
        entry = quantize_step(model_dir, calibration_mix(audios, check), convs, rows, two_part, seed)
        int8_model = StreamingModel(model_dir, verify=False)
        int8 = {name: encode_hops(int8_model, clips) for name, clips in signals.items()}
        by_signal = {name: accuracy(fp32[name], int8[name], int8_model.levels) for name in signals}
        entry["accuracy"] = by_signal["calibration words"]
        entry["accuracy_by_signal"] = by_signal
        entry["max_rel_rms_err"] = MAX_REL_RMS
        worst = {name: max(v["rel_rms_err"] for v in acc.values()) for name, acc in by_signal.items()}
        bad = {name: round(err, 4) for name, err in worst.items() if err > MAX_REL_RMS}
        if bad:
            raise RuntimeError(f"the int8 step is too far from fp32: relative RMS error above {MAX_REL_RMS} on "
                               + ", ".join(f"{name} ({err:.3g})" for name, err in bad.items())
                               + f"; per level on the calibration words: "
                               f"{ {k: round(v['rel_rms_err'], 4) for k, v in entry['accuracy'].items()} }")
    except BaseException:
        if (model_dir / STEP_FP32).is_file():
            (model_dir / STEP_FP32).replace(model_dir / STEP)
        raise
    return entry, recalibrate(calib, int8["calibration words"], int8_model.levels, fpr)
