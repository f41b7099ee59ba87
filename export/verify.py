"""Checks that an exported directory computes what the torch model computes.

1. Every graph, onnxruntime vs torch, on corpus audio and random audio (and, for the step and
   flush graphs, on the states a real stream goes through): max abs error / signal scale <= TOL.
2. The streaming graphs through the serving runtime (serve.runtime) over whole utterances, in chunks of 1, 159, 160,
   161, 4000 samples and random mixes, all streams batched together: frame counts equal the offline
   counts and every frame (first and last included) equals the offline run of the whole utterance.
Any failure raises VerificationError listing every failing comparison with its numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from export.graphs import ArGraph, DecoderGraph, EncoderGraph, ModuleGraph
from export.offline import offline_levels
from export.scores import make_scorers
from export.streaming import StreamingFlush, StreamingStep, level_dims_of
from export.streams import encode_streams
from serve.onnx_sessions import make_session
from serve.runtime import StreamingModel
from train.audio import HOP, level_frames
from train.model import Encoder

TOL = 1e-4


class VerificationError(RuntimeError):
    pass


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref| (inf on a shape mismatch; 0 for empty arrays)."""
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape:
        return float("inf")
    if ref.size == 0:
        return 0.0
    if ref.dtype == bool:
        return float(np.any(got != ref))
    scale = max(float(np.abs(ref).max()), 1e-6)
    return float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max() / scale)


@dataclass
class Report:
    checks: int = 0
    worst: float = 0.0
    failures: list[str] = field(default_factory=list)

    def compare(self, what: str, got, ref, tol: float = TOL) -> None:
        got, ref = np.asarray(got), np.asarray(ref)
        err = rel_err(got, ref)
        self.checks += 1
        if got.shape != ref.shape:
            self.failures.append(f"{what}: shape {got.shape} != expected {ref.shape}")
        elif err > tol:
            self.failures.append(f"{what}: max abs error / scale = {err:.3g} > {tol:g} "
                                 f"(max abs error {np.abs(got.astype(np.float64) - ref).max():.3g}, "
                                 f"scale {np.abs(ref).max():.3g})")
        if np.isfinite(err):
            self.worst = max(self.worst, err)

    def raise_if_failed(self, title: str) -> None:
        if self.failures:
            shown = "\n  ".join(self.failures[:40])
            more = f"\n  ... and {len(self.failures) - 40} more" if len(self.failures) > 40 else ""
            raise VerificationError(f"{title}: {len(self.failures)} of {self.checks} comparisons failed:\n"
                                    f"  {shown}{more}")

    def summary(self) -> str:
        return f"{self.checks} comparisons, worst max-abs-error/scale {self.worst:.2e} (tolerance {TOL:g})"


def _ort(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = make_session(path)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _torch(module, *args) -> tuple[np.ndarray, ...]:
    with torch.no_grad():
        out = module(*[torch.as_tensor(a) for a in args])
    out = out if isinstance(out, tuple) else (out,)
    return tuple(o.numpy() for o in out)


def audio_cases(corpus_audio: list[np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Batched test inputs: corpus clips cut to a common length, and random audio of an odd length."""
    cases = {}
    if corpus_audio:
        n = min(a.size for a in corpus_audio[:2])
        cases["corpus"] = np.stack([a[:n] for a in corpus_audio[:2]]).astype(np.float32)
    cases["random"] = (0.1 * rng.standard_normal((3, 4321))).astype(np.float32)
    return cases


def verify_offline_graphs(out_dir: Path, encoder: Encoder, gaussians: dict | None, cases: dict[str, np.ndarray],
                          report: Report) -> None:
    """m*.onnx, ar.onnx and encoder.onnx against torch."""
    for case, audio in cases.items():
        x = audio
        for level in encoder.convs:
            graph = ModuleGraph(encoder, level).eval()
            ref = _torch(graph, x)
            got = _ort(out_dir / f"{level}.onnx", {graph.input_names()[0]: x})
            for name, r in zip(graph.output_names(), ref):
                report.compare(f"{level}.onnx [{case}] {name}", got[name], r)
            x = ref[0]  # the next module consumes this module's mu
        ar = ArGraph(encoder).eval()
        report.compare(f"ar.onnx [{case}] mu", _ort(out_dir / "ar.onnx", {"x": x})["mu"], _torch(ar, x)[0])
        whole = EncoderGraph(encoder, gaussians).eval()
        got = _ort(out_dir / "encoder.onnx", {"audio": audio})
        for name, r in zip(whole.output_names(), _torch(whole, audio)):
            report.compare(f"encoder.onnx [{case}] {name}", got[name], r)


def verify_step_graphs(out_dir: Path, encoder: Encoder, gaussians: dict | None, cases: dict[str, np.ndarray],
                       report: Report, max_hops: int = 24) -> None:
    """step.onnx / flush.onnx against torch, call by call, on the states a real stream goes through.

    Flush is run from every state reached (fresh and after each hop) with varied tail lengths. Each
    output is compared over all calls of a case at once (the signal scale is the case's)."""
    step, flush = StreamingStep(encoder, gaussians).eval(), StreamingFlush(encoder, gaussians).eval()
    step_s, flush_s = make_session(out_dir / "step.onnx"), make_session(out_dir / "flush.onnx")
    out_names = step.output_names()
    n_state = len(step.state_names)
    for case, audio in cases.items():
        batch = audio.shape[0]
        state = [s.numpy() for s in step.initial_state(batch)]
        n_hops = min(audio.shape[1] // HOP, max_hops)
        got = {"step": {n: [] for n in out_names}, "flush": {n: [] for n in out_names}}
        ref = {"step": {n: [] for n in out_names}, "flush": {n: [] for n in out_names}}

        for t in range(n_hops + 1):
            tail = audio[:, t * HOP:(t + 1) * HOP]
            tail = np.pad(tail, ((0, 0), (0, HOP - tail.shape[1])))
            tail_len = np.array([(t * 37 + 59 * i) % HOP for i in range(batch)], np.int64)
            feeds = dict(zip(flush.input_names(), [tail, tail_len] + state))
            _keep(got["flush"], ref["flush"], out_names, flush_s.run(out_names, feeds),
                  _torch(flush, tail, tail_len, *state))
            if t == n_hops:
                break
            hop = audio[:, t * HOP:(t + 1) * HOP]
            feeds = dict(zip(step.input_names(), [hop] + state))
            r = _torch(step, hop, *state)
            _keep(got["step"], ref["step"], out_names, step_s.run(out_names, feeds), r)
            state = list(r[len(out_names) - n_state:])
        for graph in ("step", "flush"):
            for name in out_names:
                report.compare(f"{graph}.onnx [{case}, {n_hops} hops] {name}",
                               np.stack(got[graph][name]), np.stack(ref[graph][name]))


def _keep(got: dict[str, list], ref: dict[str, list], names: list[str], values_got, values_ref) -> None:
    """Append one call's outputs, onnxruntime's to got and torch's to ref, by output name."""
    for name, g, r in zip(names, values_got, values_ref):
        got[name].append(g)
        ref[name].append(r)


def verify_decoder_graphs(out_dir: Path, encoder: Encoder, decoders: dict[str, torch.nn.Module],
                          cases: dict[str, np.ndarray], report: Report, rng: np.random.Generator) -> None:
    """decoder_<level>.onnx against torch on encoded audio and on random latents."""
    for level, decoder in decoders.items():
        graph = DecoderGraph(decoder).eval()
        inputs = {}
        for case, audio in cases.items():
            with torch.no_grad():
                inputs[case] = encoder(torch.from_numpy(audio))[level].mu.numpy()
        inputs["random latents"] = rng.standard_normal((2, 37, encoder.dims.channels)).astype(np.float32)
        for case, z in inputs.items():
            got = _ort(out_dir / f"decoder_{level}.onnx", {"latents": z})["audio"]
            report.compare(f"decoder_{level}.onnx [{case}] audio", got, _torch(graph, z)[0])


def verify_streaming(model: StreamingModel, encoder: Encoder, gaussians: dict | None,
                     utterances: dict[str, np.ndarray], plans: dict[str, list[int]], report: Report) -> None:
    """Every utterance x every chunk plan streamed together in one set of batched calls."""
    scorers = make_scorers(level_dims_of(encoder), gaussians).eval()
    names, audios, sizes = [], [], []
    for u, audio in utterances.items():
        for p, plan in plans.items():
            names.append((u, p))
            audios.append(audio)
            sizes.append(plan)
    results = encode_streams(model, audios, sizes)
    refs = {u: offline_levels(encoder, a, scorers) for u, a in utterances.items()}
    for (u, p), res in zip(names, results):
        ref = refs[u]
        counts = level_frames(utterances[u].size)
        for level in model.levels:
            if res[level].shape[0] != counts[level]:
                report.checks += 1
                report.failures.append(f"stream [{u}, chunks {p}] {level}: {res[level].shape[0]} frames, "
                                       f"offline has {counts[level]}")
                continue
            report.compare(f"stream [{u}, chunks {p}] {level} mu", res[level], ref[f"mu_{level}"])
            for key in ("logvar", "kl", "maha"):
                if f"{key}_{level}" in ref:
                    report.compare(f"stream [{u}, chunks {p}] {level} {key}", res.get(f"{key}_{level}"),
                                   ref[f"{key}_{level}"])
