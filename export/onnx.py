"""Export a trained encoder to ONNX with a verified manifest: `python -m export.onnx CHECKPOINT --out DIR`.

Writes m1/m2/m3/ar.onnx (per module), encoder.onnx (all levels with OOD scores), step.onnx and
flush.onnx (streaming, explicit state), decoder_<level>.onnx (with --decoders) and manifest.json
(hashes, geometry, OOD calibration). Then verifies every graph against torch and the streaming
graphs against the offline model; on a mismatch it prints the numbers, renames the manifest to
manifest.json.failed (the directory is then not loadable) and exits 1.
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from export import calibration
from export.geometry import cache_sizes, level_frames_per_graph, state_spec
from export.graphs import OPSET, ArGraph, DecoderGraph, EncoderGraph, ModuleGraph, write_onnx
from export.manifest import write_manifest
from export.offline import offline_levels
from export.streaming import StreamingFlush, StreamingStep, level_dims_of
from export.streams import CHUNK_PLANS, random_mix_plans
from export.verify import (
    Report,
    VerificationError,
    audio_cases,
    verify_decoder_graphs,
    verify_offline_graphs,
    verify_step_graphs,
    verify_streaming,
)
from serve.model_dir import FORMAT, MANIFEST, sha256_file
from serve.onnx_sessions import providers
from serve.runtime import StreamingModel
from train.audio import (
    CROP_SAMPLES,
    HOP,
    LEFT_REACH,
    LOOKAHEAD,
    RECEPTIVE_FIELD,
    SAMPLE_RATE,
    AudioError,
    level_hops,
    load_audio,
)
from train.checkpoint import CheckpointError, code_version, load_encoder
from train.cli import int_at_least, positive_float
from train.model import Encoder, fold_batch_norm

# Extra random utterance lengths streamed in verification: shorter than the first frame's 253
# samples, around it, and the 5000 / 5003 pair whose frame counts differ (31 / 32).
VERIFY_LENGTHS = (1, 5, 100, 252, 253, 413, 5000, 5003)


class ExportError(RuntimeError):
    """A user error (bad input, missing files); printed as `error: ...`, exit status 2."""


class Int8Error(RuntimeError):
    """--int8 could not make a step accurate enough; the fp32 export is intact. Exit status 1."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def geometry(dims) -> dict:
    return {"sample_rate": SAMPLE_RATE, "hop": HOP, "receptive_field": RECEPTIVE_FIELD, "left_reach": LEFT_REACH,
            "lookahead": LOOKAHEAD, "level_hops": {k: v for k, v in level_hops().items() if k in dims.levels},
            "step_samples": HOP, "cache_sizes": list(cache_sizes()),
            "frames_per_call": level_frames_per_graph(dims),
            "state": state_spec(dims.channels, dims.hidden)}


def reference_indices(n_utterances: int, n_clips: int, seed: int) -> list[int]:
    """Which utterances of the test split the calibration uses (the benchmarks leave them out)."""
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n_utterances, size=min(n_clips, n_utterances), replace=False))


def load_reference_audio(corpus_dir: str | None, n_clips: int, seed: int) -> list[np.ndarray]:
    """n_clips utterances of the corpus's held-out "test" split (words the encoder never trained on)."""
    from train.corpus import CorpusError, find_corpus, load_corpus

    try:
        root = find_corpus(corpus_dir)
        utts = load_corpus(root, "test")
    except CorpusError as exc:
        raise ExportError(str(exc)) from None
    if len(utts) < 2:
        raise ExportError(f"{root}: the test split has {len(utts)} utterances; calibration needs at least 2")
    return _read_clips([u.path for u in utts], n_clips, seed)


def held_out_folder_audio(data_dir: str, n_clips: int, seed: int, crop: int) -> list[np.ndarray]:
    """n_clips files of the tenth of an audio folder that `python -m train.sim --data DIR` held out
    for validation (the first tenth of its sorted usable files; the encoder never trained on them)."""
    from train.data import DataError, scan_audio_dir

    try:
        files = scan_audio_dir(data_dir, min_samples=crop)
    except DataError as exc:
        raise ExportError(str(exc)) from None
    held = files[:max(1, len(files) // 10)] if len(files) > 1 else []
    if len(held) < 2:
        raise ExportError(f"--data {data_dir}: its held-out tenth has {len(held)} files; calibration needs at "
                          "least 2 (the folder needs 20 or more usable files)")
    return _read_clips(held, n_clips, seed)


def _read_clips(paths: list, n_clips: int, seed: int) -> list[np.ndarray]:
    audio = []
    for i in tqdm(reference_indices(len(paths), n_clips, seed), desc="reading reference audio", unit="clip",
                  file=sys.stderr, leave=False):
        try:
            audio.append(load_audio(paths[i]))
        except AudioError as exc:
            raise ExportError(str(exc)) from None
    return audio


def load_check_audio(directory: str, max_seconds: float = 10.0) -> list[np.ndarray]:
    """The audio files of a directory (any rate, mono mix), at most max_seconds each, for the int8 check."""
    d = Path(directory)
    if not d.is_dir():
        raise ExportError(f"--int8-check {d}: no such directory")
    clips = []
    for path in sorted(p for p in d.iterdir() if p.suffix.lower() in (".wav", ".flac", ".ogg")):
        try:
            audio = load_audio(path, allow_resample=True, mixdown=True)
        except AudioError as exc:
            log(f"warning: --int8-check: skipping {exc}")
            continue
        clips.append(audio[:int(max_seconds * SAMPLE_RATE)])
    if not clips:
        raise ExportError(f"--int8-check {d}: no readable .wav, .flac or .ogg files")
    return clips


def load_decoders(directory: str, encoder: Encoder) -> dict[str, torch.nn.Module]:
    """decoder_<level>.pt for the encoder's conv levels, via train.decoder.load_decoder."""
    from train.decoder import load_decoder

    d = Path(directory)
    if not d.is_dir():
        raise ExportError(f"{d}: no such decoder directory")
    found = {}
    for level in encoder.dims.levels:
        path = d / f"decoder_{level}.pt"
        if level == "ar" or not path.is_file():
            continue
        try:
            decoder, meta = load_decoder(path)
        except CheckpointError as exc:
            raise ExportError(str(exc)) from None
        if meta.get("level") != level:
            raise ExportError(f"{path}: holds a decoder for level {meta.get('level')!r}, not {level!r}")
        dims = meta.get("dims") or {}
        if dims.get("channels", encoder.dims.channels) != encoder.dims.channels:
            raise ExportError(f"{path}: decodes {dims.get('channels')}-channel latents; the encoder has "
                              f"{encoder.dims.channels}")
        if dims.get("method", encoder.dims.method) != encoder.dims.method:
            log(f"warning: {path} was trained on a {dims.get('method')} encoder's latents, exporting it "
                f"with a {encoder.dims.method} encoder")
        found[level] = decoder.eval()
    if not found:
        raise ExportError(f"{d}: no decoder_<level>.pt for levels {', '.join(encoder.dims.levels[:-1])}")
    return found


def export_graphs(out: Path, encoder: Encoder, gaussians: dict, decoders: dict, meta_common: dict,
                  geo: dict) -> dict[str, dict]:
    """Write every graph; returns the manifest's files entry (without hashes yet)."""
    files = {}
    example_audio = torch.randn(2, 4321) * 0.1
    jobs = []
    x = example_audio
    for level in encoder.convs:
        graph = ModuleGraph(encoder, level)
        jobs.append((f"{level}.onnx", "module", graph, (x,), {"level": level}))
        with torch.no_grad():
            out_mu = graph(x)
        x = out_mu[0] if isinstance(out_mu, tuple) else out_mu
    jobs.append(("ar.onnx", "module", ArGraph(encoder), (x,), {"level": "ar"}))
    jobs.append(("encoder.onnx", "encoder", EncoderGraph(encoder, gaussians), (example_audio,), {}))
    stream_meta = {"state": geo["state"], "frames_per_call": geo["frames_per_call"]}
    step, flush = StreamingStep(encoder, gaussians), StreamingFlush(encoder, gaussians)
    state = tuple(step.initial_state(2))
    jobs.append(("step.onnx", "step", step, (torch.randn(2, HOP),) + state, stream_meta))
    jobs.append(("flush.onnx", "flush", flush, (torch.randn(2, HOP), torch.tensor([7, 100])) + state, stream_meta))
    for level, decoder in decoders.items():
        z = torch.randn(2, 9, encoder.dims.channels)
        jobs.append((f"decoder_{level}.onnx", "decoder", DecoderGraph(decoder), (z,), {"level": level}))
    for name, role, graph, example, extra in tqdm(jobs, desc="exporting graphs", unit="graph", file=sys.stderr):
        if role in ("step", "flush"):
            axes = {n: {0: "batch"} for n in graph.input_names() + graph.output_names()}
        else:
            axes = graph.dynamic_axes()
        write_onnx(graph.eval(), example, out / name, graph.input_names(), graph.output_names(), axes,
                   {**meta_common, "role": role, **extra})
        files[name] = {"role": role}
    return files


def run_export(args: argparse.Namespace) -> dict:
    t0 = time.time()
    try:
        encoder, ckpt = load_encoder(args.checkpoint)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    dims = encoder.dims  # as trained: the manifest records batch_norm even though the graphs fold it
    encoder = fold_batch_norm(encoder)
    decoders = load_decoders(args.decoders, encoder) if args.decoders else {}
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    log(f"exporting {args.checkpoint} ({dims.method}, {dims.channels} channels, GRU {dims.hidden}) to {out}")
    config = dict(ckpt.get("config") or {})
    data = args.data or (config.get("data") if config.get("data") not in (None, "corpus") else None)
    if data:
        log(f"calibrating on the held-out tenth of {data} (the audio the model was trained on)")
        reference = held_out_folder_audio(data, args.calibration_clips, args.seed,
                                          int(config.get("crop") or CROP_SAMPLES))
    else:
        reference = load_reference_audio(args.corpus, args.calibration_clips, args.seed)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / MANIFEST, out / (MANIFEST + ".failed")):
        if stale.exists():
            stale.unlink()  # the directory is not a valid model until this export has verified

    # 1. calibration on held-out corpus audio
    per_clip = [offline_levels(encoder, a) for a in tqdm(reference, desc="encoding reference audio",
                                                          unit="clip", file=sys.stderr)]
    windows = calibration.window_frames(args.ood_window, level_hops(), SAMPLE_RATE)
    gaussians, calib = calibration.calibrate(per_clip, dims.levels, dims.variational, args.fpr,
                                             {lv: windows[lv] for lv in dims.levels}, seed=args.seed)
    calib["window_seconds"] = args.ood_window
    for level, c in calib["levels"].items():
        log(f"  calibration {level}: mean {c['score']} over {c['window_frames']} frames, {c['n_ref']} reference "
            f"windows, threshold at fpr {args.fpr:g} = {c['threshold']:.4g}")

    # 2. graphs
    geo = geometry(dims)
    meta_common = {"format": FORMAT, "method": dims.method, "levels": list(dims.levels),
                   "level_dims": level_dims_of(encoder), **{k: v for k, v in geo.items() if k != "state"}}
    files = export_graphs(out, encoder, gaussians, decoders, meta_common, geo)
    for name in files:
        files[name]["sha256"] = sha256_file(out / name)

    manifest = {
        "format": FORMAT, "method": dims.method, "beta": config.get("beta"), "variational": dims.variational,
        "dims": dims.to_dict(), "config": config, "checkpoint": str(Path(args.checkpoint).resolve()),
        "checkpoint_sha256": sha256_file(args.checkpoint), "checkpoint_step": ckpt.get("step"),
        "opset": OPSET, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(), "geometry": geo, "levels": list(dims.levels),
        "level_dims": level_dims_of(encoder), "files": files, "calibration": calib,
        "export": {"fpr": args.fpr, "calibration_clips": len(reference), "seed": args.seed,
                   "corpus": str(args.corpus) if args.corpus else "default", "data": data,
                   "providers": providers()},
    }
    write_manifest(out, manifest)

    # 3. verification
    if args.skip_verify:
        log("verification skipped (--skip-verify)")
    else:
        try:
            manifest["verification"] = verify_export(out, encoder, gaussians, decoders, reference, args.seed)
        except VerificationError:
            (out / MANIFEST).replace(out / (MANIFEST + ".failed"))
            raise
        write_manifest(out, manifest)
    if args.int8:
        manifest = make_int8(out, manifest, encoder, reference, args)
    log(f"done in {time.time() - t0:.0f} s: {out / MANIFEST}")
    return manifest


def make_int8(out: Path, manifest: dict, encoder: Encoder, reference: list[np.ndarray],
              args: argparse.Namespace) -> dict:
    """Quantize the verified fp32 step (export.quantize), measure it, re-calibrate, rewrite the
    manifest. If the int8 step is not accurate enough the fp32 export stays as it was."""
    from export import quantize

    log("quantizing the streaming step to int8 (static scales from the reference clips, noise and tones"
        + (f" and {args.int8_check}" if args.int8_check else "") + ")")
    extra = {}
    if args.int8_check:
        extra[f"recordings in {args.int8_check}"] = load_check_audio(args.int8_check)
    try:
        entry, calib = quantize.quantize_export(out, encoder, reference, manifest["calibration"], args.fpr, args.seed,
                                                quantize.check_signals(extra, seed=args.seed))
    except RuntimeError as exc:
        raise Int8Error(f"{exc}\n{out} still holds the verified fp32 export") from None
    for name, by_level in entry["accuracy_by_signal"].items():
        log(f"  {name}: int8 vs fp32 relative RMS error " + ", ".join(
            f"{level} {acc['rel_rms_err']:.3g}" for level, acc in by_level.items()))
    files = manifest["files"]
    files[quantize.STEP_FP32] = {"role": "step-fp32"}
    for name in (quantize.STEP, quantize.STEP_FP32):
        files[name]["sha256"] = sha256_file(out / name)
    # the fp32 step's calibration is kept for comparison: int8 scores are not fp32 scores (docs/streaming.md)
    manifest.update(precision={"step": "int8", "flush": "fp32", "offline": "fp32"}, quantization=entry,
                    calibration=calib, calibration_fp32=manifest["calibration"])
    write_manifest(out, manifest)
    return manifest


def verify_export(out: Path, encoder: Encoder, gaussians: dict, decoders: dict, reference: list[np.ndarray],
                  seed: int) -> dict:
    rng = np.random.default_rng(seed + 1)
    corpus = reference[1::2][:2] or reference[:2]  # clips of the scoring half
    cases = audio_cases(corpus, rng)
    result = {}

    log("verifying graphs: onnxruntime vs torch")
    graphs = Report()
    verify_offline_graphs(out, encoder, gaussians, cases, graphs)
    verify_step_graphs(out, encoder, gaussians, cases, graphs)
    if decoders:
        verify_decoder_graphs(out, encoder, decoders, cases, graphs, rng)
    graphs.raise_if_failed("onnxruntime differs from torch")
    log(f"  {graphs.summary()}")
    result["graphs"] = graphs.summary()

    log("verifying streaming against the offline model (chunks of 1, 159, 160, 161, 4000 and random mixes)")
    model = StreamingModel(out)
    utterances = {f"corpus{i}": a for i, a in enumerate(corpus)}
    for n in VERIFY_LENGTHS:
        utterances[f"random{n}"] = (0.1 * rng.standard_normal(n)).astype(np.float32)
    plans = {**CHUNK_PLANS, **random_mix_plans(rng)}
    stream = Report()
    verify_streaming(model, encoder, gaussians, utterances, plans, stream)
    stream.raise_if_failed("streaming differs from the offline model")
    log(f"  {len(utterances)} utterances x {len(plans)} chunkings: {stream.summary()}")
    result["streaming"] = (f"{len(utterances)} utterances x {len(plans)} chunkings, batched: {stream.summary()}")
    return result


def false_positive_rate(text: str) -> float:
    """An argparse type: a rate in (0, 0.5)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not 0.0 < value < 0.5:
        raise argparse.ArgumentTypeError(f"must be in (0, 0.5), got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export.onnx", description=__doc__.split("\n\n")[0],
        epilog="Reference audio for the OOD calibration is the default corpus's held-out test split "
               "(built on first use), or the held-out tenth of the audio folder the model was trained on "
               "(--data); see docs/streaming.md for the streaming graphs and the calibration.")
    p.add_argument("checkpoint", help="checkpoint.pt written by python -m train.sim")
    p.add_argument("--out", required=True, help="output directory (created; files in it are replaced)")
    p.add_argument("--decoders", metavar="DIR", help="directory of decoder_<level>.pt from python -m train.decoder")
    p.add_argument("--fpr", type=false_positive_rate, default=0.01,
                   help="false-positive rate of the OOD thresholds on windows of held-out words (default 0.01)")
    p.add_argument("--ood-window", type=positive_float, default=calibration.WINDOW_SECONDS, metavar="SECONDS",
                   help="OOD flags are decided on the mean per-frame score over this much audio, calibrated on "
                        "windows of held-out words (default %(default)s s; docs/reliability.md)")
    p.add_argument("--calibration-clips", type=int_at_least(2), default=400, metavar="N",
                   help="held-out corpus utterances used for calibration, half to fit, half to score (default 400)")
    p.add_argument("--corpus", metavar="DIR", help="corpus directory (default: the default corpus cache)")
    p.add_argument("--data", metavar="DIR",
                   help="calibrate on the held-out tenth of this audio folder instead of the corpus (default: the "
                        "folder the checkpoint was trained on with train.sim --data, if any)")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing clips and random test audio")
    p.add_argument("--skip-verify", action="store_true", help="write the files without verifying them")
    p.add_argument("--int8", action="store_true",
                   help="also quantize the streaming step to int8 for CPU serving (~2x faster on AVX512-VNNI; "
                        "latents within a few %% of fp32, measured and recorded in the manifest; refused above "
                        "5 %% on the calibration words, noise, tones or --int8-check; the fp32 step is kept as "
                        "step.fp32.onnx)")
    p.add_argument("--int8-check", metavar="DIR",
                   help="with --int8: also calibrate and check the int8 step on the audio files in DIR (e.g. real "
                        "recordings like those the model will serve; at most 10 s of each)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        run_export(args)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable output directory, disk full, ...
        print(f"error: {exc.filename or args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except VerificationError as exc:
        print(f"error: verification failed; {args.out}/{MANIFEST} renamed to {MANIFEST}.failed\n{exc}",
              file=sys.stderr)
        return 1
    except Int8Error as exc:
        print(f"error: --int8: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
