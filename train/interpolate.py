"""Latent interpolation (paper §4.3.2, Fig. 3): decode (1 - a) z_a + a z_b for a in 0 ... 1.

z_a and z_b are one level's posterior means of two words (by default a "bidi..." and a
"baga..." word from the test split, as in the paper); the level's decoder turns each mix into
audio. Writes interpolation_<level>.png (waveform and spectrogram per a) and one WAV per a.

CLI: python -m train.interpolate --checkpoint PATH --decoder DIR/decoder_m3.pt --out DIR
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from train.decoder import Decoder
from train.features import encode_levels, load_batch


def pick_words(utterances, first=("bi", "di"), second=("ba", "ga")):
    """A word starting with `first` and one starting with `second`, read by the same voice (the first
    voice, in the given order, that has both). Failing that, two words of one voice whose vowels
    differ at the most positions, searched among the first 200 utterances."""
    def starts(u, prefix):
        return tuple(u.syllables[:len(prefix)]) == tuple(prefix)

    for voice in dict.fromkeys(u.voice for u in utterances):
        a = next((u for u in utterances if u.voice == voice and starts(u, first)), None)
        b = next((u for u in utterances if u.voice == voice and starts(u, second)), None)
        if a is not None and b is not None:
            return a, b
    pool = utterances[:200]
    best = None
    for i, u in enumerate(pool):
        for v in pool[i + 1:]:
            if u.word == v.word:
                continue
            score = (u.voice == v.voice, sum(x != y for x, y in zip(u.vowels, v.vowels)))
            if best is None or score > best[0]:
                best = (score, u, v)
    if best is None:
        raise ValueError("need at least two different words to interpolate")
    return best[1], best[2]


@torch.no_grad()
def interpolate(encoder, decoder: Decoder, level: str, audio_a: torch.Tensor, audio_b: torch.Tensor, alphas,
                device="cpu") -> np.ndarray:
    """Decoded interpolations, (len(alphas), samples); audio_* are 1-d waveforms of equal length."""
    z = encode_levels(encoder, torch.stack([audio_a, audio_b]), (level,), device=device)[level]
    a = torch.as_tensor(np.asarray(alphas, dtype=np.float32))[:, None, None]
    mixed = (1 - a) * z[0] + a * z[1]
    return decoder(mixed.to(device), audio_a.shape[-1]).cpu().numpy()


def write_interpolation(encoder, decoder: Decoder, level: str, utt_a, utt_b, out_dir, *, steps: int = 6,
                        device="cpu", tag: str = "") -> dict:
    """PNG + WAVs for one pair of utterances. Returns the paths and the alphas."""
    from train.plots import plot_waves_and_spectrograms, write_wav

    out_dir = Path(out_dir)
    alphas = np.linspace(0.0, 1.0, steps)
    audio = load_batch([utt_a, utt_b])
    dec = interpolate(encoder, decoder, level, audio[0], audio[1], alphas, device=device)
    prefix = f"{tag}_" if tag else ""
    wavs = [write_wav(out_dir / f"{prefix}interp_{level}_a{al:.2f}.wav", d) for al, d in zip(alphas, dec)]
    wavs += [write_wav(out_dir / f"{prefix}interp_{level}_original_{u.word}.wav", x.numpy())
             for u, x in zip((utt_a, utt_b), audio)]
    labels = [f"original\n{utt_a.word}"] + [f"a={al:.2f}" for al in alphas] + [f"original\n{utt_b.word}"]
    png = plot_waves_and_spectrograms([audio[0].numpy(), *dec, audio[1].numpy()], labels,
                                      out_dir / f"{prefix}interpolation_{level}.png",
                                      f"{tag} {level}: decode((1-a) z[{utt_a.word}] + a z[{utt_b.word}])".strip())
    return {"png": png, "wavs": wavs, "alphas": alphas.tolist(), "words": (utt_a.word, utt_b.word)}


def main(argv: list[str] | None = None) -> int:
    from train.checkpoint import CheckpointError, load_encoder, trained_corpus
    from train.cli import add_corpus_arg, add_device_arg, fail, int_at_least, select_device
    from train.corpus import find_corpus, load_split
    from train.decoder import load_decoder

    ap = argparse.ArgumentParser(prog="python -m train.interpolate", description=(
        "Decode linear interpolations between two words' latents; writes a PNG of waveforms and "
        "spectrograms and one WAV per step."))
    ap.add_argument("--checkpoint", required=True, help="encoder checkpoint written by python -m train.sim")
    ap.add_argument("--decoder", required=True, help="decoder_<level>.pt written by python -m train.decoder")
    add_corpus_arg(ap)
    ap.add_argument("--words", default=None, help="two utterance ids, comma-separated (default: a bidi... "
                                                  "and a baga... word of the test split)")
    ap.add_argument("--steps", type=int_at_least(2), default=6, help="number of alphas from 0 to 1 (default 6)")
    add_device_arg(ap)
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    try:
        encoder, ckpt = load_encoder(args.checkpoint)
        decoder, meta = load_decoder(args.decoder)
        corpus = find_corpus(args.corpus, trained_corpus(ckpt))
        utts = load_split(corpus, "test") + load_split(corpus, "train")
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        return fail(str(exc))
    if args.words:
        ids = args.words.split(",")
        by_id = {u.id: u for u in utts}
        missing = [i for i in ids if i not in by_id]
        if len(ids) != 2 or missing:
            return fail(f"--words needs two utterance ids of the corpus (unknown: {missing or ids})")
        a, b = by_id[ids[0]], by_id[ids[1]]
    else:
        try:
            a, b = pick_words(utts)
        except ValueError as exc:
            return fail(str(exc))
    device = select_device(args.device)
    res = write_interpolation(encoder.to(device), decoder.to(device), meta["level"], a, b, args.out,
                              steps=args.steps, device=device)
    print(f"wrote {res['png']} and {len(res['wavs'])} WAVs ({a.word} -> {b.word})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
