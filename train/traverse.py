"""Latent traversal: sweep one dim of a level over [-3, 3] with the others held, and decode.

Units. By default ("std") the value v of a dim d means mean_d + v * std_d, with the mean and std
of that dim over all frames of the reference words, so -3 ... 3 spans the same share of the data
for every method (SIM's posterior means sit near N(0, 1) anyway; GIM's and CPC's do not).
"absolute" sets the dim to v itself. The dim is set in every frame; other dims keep the
reference word's values.

Ranking: each dim's effect is the mean over the sweep ends (v = -3 and v = +3) of
MSE(decode(z with d swept), decode(z)), divided by the mean power of decode(z). All dims are
ranked in batched decoder calls.

CLI: python -m train.traverse --checkpoint PATH --decoder DIR/decoder_m3.pt --out DIR
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from train.decoder import Decoder


def dim_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of each dim over all frames of z (N, T, C)."""
    flat = z.reshape(-1, z.shape[-1])
    return flat.mean(0), flat.std(0, unbiased=False)


def set_dims(z: torch.Tensor, dims, values, center=None, scale=None) -> torch.Tensor:
    """Copies of z (T, C), one per (dim, value): (len(dims) * len(values), T, C), dim-major."""
    dims_t = torch.as_tensor(list(dims), dtype=torch.long)
    vals = torch.as_tensor(np.asarray(values, dtype=np.float32))
    n_d, n_v = len(dims_t), len(vals)
    out = z.unsqueeze(0).repeat(n_d * n_v, 1, 1)
    target = vals.repeat(n_d)  # (n_d * n_v,)
    d_idx = dims_t.repeat_interleave(n_v)
    if center is not None:
        target = center[d_idx] + target * scale[d_idx]
    out[torch.arange(n_d * n_v), :, d_idx] = target[:, None].expand(-1, z.shape[0])
    return out


@torch.no_grad()
def sweep(decoder: Decoder, z: torch.Tensor, dims, values, *, center=None, scale=None, n_samples=None,
          batch: int = 64, device="cpu") -> np.ndarray:
    """Decoded sweeps, (len(dims), len(values), samples)."""
    from train.decoder import decode_batched

    zs = set_dims(z, dims, values, center, scale)
    out = decode_batched(decoder, zs, n_samples, batch=batch, device=device)
    return out.reshape(len(list(dims)), len(values), -1).numpy()


@torch.no_grad()
def rank_dims(decoder: Decoder, z: torch.Tensor, *, center=None, scale=None, values=(-3.0, 3.0), n_samples=None,
              batch: int = 64, device="cpu") -> np.ndarray:
    """Effect of each dim on the decoded output (see module doc); (C,) array."""
    from train.decoder import decode_batched

    base = decoder(z[None].to(device), n_samples)[0].cpu()
    power = float(base.pow(2).mean()) or 1.0
    C = z.shape[-1]
    scores = np.zeros(C)
    step = max(1, batch // len(values))
    for i in range(0, C, step):
        dims = list(range(i, min(C, i + step)))
        out = decode_batched(decoder, set_dims(z, dims, values, center, scale), n_samples, batch=batch,
                             device=device).reshape(len(dims), len(values), -1)
        scores[i:i + len(dims)] = ((out - base).pow(2).mean(-1).mean(-1) / power).numpy()
    return scores


def write_traversal(encoder, decoder: Decoder, level: str, reference, utterances, out_dir, *, dims=None,
                    top: int = 6, steps: int = 7, span: float = 3.0, units: str = "std", device="cpu",
                    tag: str = "") -> dict:
    """Rank all dims on `reference` (an utterance), sweep the chosen (or top-ranked) dims, write a
    spectrogram grid PNG and WAVs. `utterances` give the per-dim statistics."""
    from train.features import encode_levels, load_batch
    from train.plots import plot_spectrogram_grid, write_wav

    out_dir = Path(out_dir)
    audio = load_batch([reference])
    z = encode_levels(encoder, audio, (level,), device=device)[level][0]
    if units == "std":
        center, scale = dim_stats(encode_levels(encoder, load_batch(utterances), (level,), device=device)[level])
    elif units == "absolute":
        center = scale = None
    else:
        raise ValueError(f"units must be 'std' or 'absolute', got {units!r}")
    n = audio.shape[-1]
    scores = rank_dims(decoder, z, center=center, scale=scale, values=(-span, span), n_samples=n, device=device)
    ranking = np.argsort(-scores, kind="stable")
    chosen = list(dims) if dims else ranking[:top].tolist()
    values = np.linspace(-span, span, steps)
    grid = sweep(decoder, z, chosen, values, center=center, scale=scale, n_samples=n, device=device)
    prefix = f"{tag}_" if tag else ""
    wavs = [write_wav(out_dir / f"{prefix}traverse_{level}_d{d}_v{v:+.1f}.wav", grid[i, j])
            for i, d in enumerate(chosen) for j, v in enumerate(values)]
    unit = "std" if units == "std" else ""
    png = plot_spectrogram_grid(grid, [f"dim {d}" for d in chosen], [f"{v:+.1f}{unit}" for v in values],
                                out_dir / f"{prefix}traverse_{level}.png",
                                f"{tag} {level} traversal of {reference.word}".strip())
    return {"png": png, "wavs": wavs, "dims": chosen, "scores": scores, "ranking": ranking.tolist()}


def main(argv: list[str] | None = None) -> int:
    from train.checkpoint import CheckpointError, load_encoder, trained_corpus
    from train.cli import (
        add_corpus_arg,
        add_device_arg,
        fail,
        int_at_least,
        non_negative_int_list,
        positive_float,
        positive_int,
        select_device,
    )
    from train.corpus import find_corpus, load_split
    from train.decoder import load_decoder

    ap = argparse.ArgumentParser(prog="python -m train.traverse", description=(
        "Sweep chosen latent dims over [-span, span] with the other dims held, decode, and write a "
        "spectrogram grid PNG, WAVs and the ranking of all dims by how much they change the output."))
    ap.add_argument("--checkpoint", required=True, help="encoder checkpoint written by python -m train.sim")
    ap.add_argument("--decoder", required=True, help="decoder_<level>.pt written by python -m train.decoder")
    add_corpus_arg(ap)
    ap.add_argument("--word", default=None, help="utterance id of the reference word (default: the first test word)")
    ap.add_argument("--dims", type=non_negative_int_list, default=None,
                    help="comma-separated dims to sweep (default: the --top ranked)")
    ap.add_argument("--top", type=positive_int, default=6, help="how many top-ranked dims to sweep (default 6)")
    ap.add_argument("--steps", type=int_at_least(2), default=7, help="values per dim (default 7)")
    ap.add_argument("--span", type=positive_float, default=3.0, help="sweep from -span to +span (default 3)")
    ap.add_argument("--units", choices=("std", "absolute"), default="std",
                    help="std: value = dim mean + v * dim std over the test words (default); absolute: value = v")
    add_device_arg(ap)
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    try:
        encoder, ckpt = load_encoder(args.checkpoint)
        decoder, meta = load_decoder(args.decoder)
        corpus = find_corpus(args.corpus, trained_corpus(ckpt))
        test = load_split(corpus, "test")
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        return fail(str(exc))
    if not test:
        return fail(f"{corpus}: the test split is empty")
    ref = test[0]
    if args.word:
        ref = next((u for u in test + load_split(corpus, "train") if u.id == args.word), None)
        if ref is None:
            return fail(f"--word {args.word}: no such utterance id in the corpus")
    dims = args.dims
    if dims:
        bad = [d for d in dims if d >= meta["arch"]["in_channels"]]
        if bad:
            return fail(f"--dims out of range 0..{meta['arch']['in_channels'] - 1}: {bad}")
    device = select_device(args.device)
    res = write_traversal(encoder.to(device), decoder.to(device), meta["level"], ref, test, args.out, dims=dims,
                          top=args.top, steps=args.steps, span=args.span, units=args.units, device=device)
    order = res["ranking"][:10]
    print("dims by effect on the output: " + ", ".join(f"{d} ({res['scores'][d]:.3g})" for d in order))
    print(f"wrote {res['png']} and {len(res['wavs'])} WAVs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
