"""Decoders: latents of one level back to audio, one decoder per conv module (m1, m2, m3).

Architecture (paper §4.3.3): a ConvTranspose1d stack that mirrors the encoder's conv layers
up to that module (train.audio.CONV_LAYERS, last layer first), ReLU between layers, no output
activation. For m1 the paper found two transposed layers too weak and added two extra
kernel-3 / stride-1 / padding-1 layers; we put them (with ReLU) between the two transposed
layers, at the 2044-frame rate where they keep the shape and have width channels to work
with (`extra` in the saved arch; 0 for m2 and m3). The decoder is trained on frozen posterior
means (mu) of the encoder, which is what the service returns. For CPC, m1/m2 are the
equivalent layers inside its single module (see train.features).

A transposed layer maps frame t back onto exactly the input span the encoder read for frame
t (t*stride - padding ... + kernel), so the decoded audio is aligned with the input; it can be
a few samples shorter than the original (floor division in the encoder). forward(z, n_samples)
zero-pads or crops the end to n_samples; forward(z) returns the natural length, which is what
ONNX export uses.

Saved file DIR/decoder_<level>.pt, a dict written with train.checkpoint.save_atomic and read
with weights_only=True:
  format   "sim-decoder/1"
  level    "m1" | "m2" | "m3"
  dims     the encoder's ModelSpec dict (method, channels, hidden)
  arch     {"in_channels", "width", "layers": [[k, s, p], ...], "extra"}
  config   training configuration (loss, epochs, lr, batch, checkpoint, ...)
  history  per-epoch mean training loss
  model    state_dict

CLI: python -m train.decoder --checkpoint PATH --level m1|m2|m3|all [--loss mse|mse+logmel] --out DIR
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from train.audio import CONV_LAYERS, CONV_LEVELS, SAMPLE_RATE, level_hops, level_layers
from train.checkpoint import CheckpointError, load, save_atomic
from train.cli import native_bf16

FORMAT = "sim-decoder/1"
DECODER_LEVELS = CONV_LEVELS  # one decoder per conv module


def layers_up_to(level: str) -> list[tuple[int, int, int]]:
    """The encoder's (kernel, stride, padding) layers from the input up to the end of `level`."""
    last = level_layers().get(level)
    if last is None:
        raise ValueError(f"no decoder for level {level!r}; choose one of {DECODER_LEVELS}")
    return list(CONV_LAYERS[: last + 1])


def default_extra(level: str) -> int:
    """Extra stride-1 layers (paper: m1 needed two)."""
    return 2 if level == "m1" else 0


class Decoder(nn.Module):
    """Latents (B, T, C) channels-last -> audio (B, samples)."""

    def __init__(self, level: str, in_channels: int, width: int | None = None, extra: int | None = None):
        super().__init__()
        self.level = level
        self.layers_spec = layers_up_to(level)
        self.in_channels = in_channels
        self.width = width or in_channels
        self.extra = default_extra(level) if extra is None else extra
        mods: list[nn.Module] = []
        ch = in_channels
        spec = list(reversed(self.layers_spec))
        for i, (k, s, p) in enumerate(spec):
            if i == len(spec) - 1:  # the mirror of the encoder's first conv: to one channel, no activation
                if self.extra:
                    mods += [m for _ in range(self.extra) for m in (nn.Conv1d(ch, ch, 3, 1, 1), nn.ReLU())]
                mods.append(nn.ConvTranspose1d(ch, 1, k, s, p))
            else:
                mods += [nn.ConvTranspose1d(ch, self.width, k, s, p), nn.ReLU()]
                ch = self.width
        self.net = nn.Sequential(*mods)

    def natural_length(self, frames: int) -> int:
        n = frames
        for k, s, p in reversed(self.layers_spec):
            n = (n - 1) * s - 2 * p + k
        return n

    def forward(self, z: torch.Tensor, n_samples: int | None = None) -> torch.Tensor:
        audio = self.net(z.transpose(1, 2))[:, 0]
        if n_samples is not None:
            n = audio.shape[-1]
            audio = audio[:, :n_samples] if n >= n_samples else nn.functional.pad(audio, (0, n_samples - n))
        return audio

    def arch(self) -> dict:
        return {"in_channels": self.in_channels, "width": self.width,
                "layers": [list(x) for x in self.layers_spec], "extra": self.extra}


def decoder_path(directory: str | Path, level: str) -> Path:
    return Path(directory) / f"decoder_{level}.pt"


def save_decoder(decoder: Decoder, path: str | Path, dims: dict, config: dict | None = None,
                 history: list[float] | None = None) -> Path:
    path = Path(path)
    save_atomic({"format": FORMAT, "level": decoder.level, "dims": dict(dims), "arch": decoder.arch(),
                 "config": dict(config or {}), "history": [float(x) for x in (history or [])],
                 "model": decoder.state_dict()}, path)
    return path


def load_decoder(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Decoder, dict]:
    """The decoder in eval mode and its metadata (everything in the file but the weights)."""
    obj = load(path, map_location, fmt=FORMAT, required=("level", "arch", "model"), what="decoder")
    try:
        arch = obj["arch"]
        dec = Decoder(obj["level"], arch["in_channels"], arch["width"], arch["extra"])
        dec.load_state_dict(obj["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: weights do not fit the decoder ({exc})") from None
    meta = {k: v for k, v in obj.items() if k != "model"}
    meta["hop"] = level_hops()[obj["level"]]
    return dec.eval(), meta


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

class LogMel(nn.Module):
    """log(mel power + eps) of a waveform batch, for the MSE + log-mel loss."""

    def __init__(self, n_fft: int = 512, hop: int = 128, n_mels: int = 64, eps: float = 1e-5):
        super().__init__()
        self.n_fft, self.hop, self.eps = n_fft, hop, eps
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("fb", mel_filterbank(n_fft, n_mels, SAMPLE_RATE), persistent=False)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(audio, self.n_fft, self.hop, window=self.window, return_complex=True).abs().pow(2)
        return torch.log(torch.einsum("mf,bft->bmt", self.fb, spec) + self.eps)


def mel_filterbank(n_fft: int, n_mels: int, rate: int) -> torch.Tensor:
    """Triangular HTK-mel filters, (n_mels, n_fft // 2 + 1)."""
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)

    freqs = np.linspace(0, rate / 2, n_fft // 2 + 1)
    pts = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(rate / 2), n_mels + 2))
    fb = np.zeros((n_mels, len(freqs)), dtype=np.float32)
    for m in range(n_mels):
        lo, c, hi = pts[m], pts[m + 1], pts[m + 2]
        up = (freqs - lo) / max(c - lo, 1e-9)
        down = (hi - freqs) / max(hi - c, 1e-9)
        fb[m] = np.clip(np.minimum(up, down), 0, None)
    return torch.from_numpy(fb)


class ReconstructionLoss(nn.Module):
    """MSE on the waveform, optionally plus MSE between log-mel spectrograms."""

    def __init__(self, kind: str = "mse", mel_weight: float = 1.0):
        super().__init__()
        if kind not in ("mse", "mse+logmel"):
            raise ValueError(f"loss must be 'mse' or 'mse+logmel', got {kind!r}")
        self.kind, self.mel_weight = kind, mel_weight
        self.logmel = LogMel() if kind == "mse+logmel" else None

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.mse_loss(pred, target)
        if self.logmel is not None:
            loss = loss + self.mel_weight * nn.functional.mse_loss(self.logmel(pred), self.logmel(target))
        return loss


def train_decoder(latents: torch.Tensor, audio: torch.Tensor, level: str, *, dims: dict,
                  epochs: int = 200, lr: float = 2e-4, batch: int = 64, loss: str = "mse",
                  width: int | None = None, seed: int = 0, device: str | torch.device = "cpu",
                  progress: bool = True) -> tuple[Decoder, list[float]]:
    """Fit a decoder on frozen latents (N, T, C) -> audio (N, samples). Returns it (eval mode) and
    the per-epoch mean training loss."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    amp = native_bf16(device)  # bf16 autocast where it is native (GPU, AMX CPU); the loss is taken in float32
    dec = Decoder(level, latents.shape[-1], width).to(device)
    crit = ReconstructionLoss(loss).to(device)
    opt = torch.optim.Adam(dec.parameters(), lr=lr)
    n, n_samples = latents.shape[0], audio.shape[-1]
    if device.type != "cpu":  # keep the whole training set on the accelerator when it fits
        try:
            latents, audio = latents.to(device), audio.to(device)
        except torch.OutOfMemoryError:
            pass
    history = []
    bar = tqdm(range(epochs), desc=f"decoder {level}", disable=not progress, leave=False)
    for _ in bar:
        dec.train()
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            z, x = latents[idx].to(device), audio[idx].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = dec(z, n_samples)
            lval = crit(out.float(), x)
            opt.zero_grad(set_to_none=True)
            lval.backward()
            opt.step()
            total += lval.item() * len(idx)
        history.append(total / n)
        bar.set_postfix(loss=f"{history[-1]:.3g}")
    return dec.eval(), history


@torch.no_grad()
def decode_batched(decoder: Decoder, z: torch.Tensor, n_samples: int | None = None, batch: int = 64,
                   device: str | torch.device | None = None) -> torch.Tensor:
    """Decode (N, T, C) in chunks of `batch`; returns (N, samples) on the CPU."""
    device = device or next(decoder.parameters()).device
    outs = [decoder(z[i:i + batch].to(device), n_samples).cpu() for i in range(0, z.shape[0], batch)]
    return torch.cat(outs) if outs else torch.zeros(0, n_samples or 0)


def write_reconstructions(decoder: Decoder, encoder, utterances, out_dir: str | Path, level: str,
                          device: str | torch.device = "cpu") -> list[Path]:
    """For each utterance write <id>_original.wav and <id>_<level>.wav side by side."""
    from train.features import encode_levels, load_batch
    from train.plots import write_wav

    written = []
    audio = load_batch(utterances)
    z = encode_levels(encoder, audio, (level,), device=device)[level]
    rec = decode_batched(decoder, z, audio.shape[-1], device=device)
    for u, a, r in zip(utterances, audio, rec):
        written.append(write_wav(Path(out_dir) / f"{u.id}_original.wav", a.numpy()))
        written.append(write_wav(Path(out_dir) / f"{u.id}_{level}.wav", r.numpy()))
    return written


@torch.no_grad()
def reconstruction_error(decoder: Decoder, encoder, utterances, level: str, device="cpu") -> float:
    """MSE between decoded and original audio divided by the originals' mean power (0 = perfect,
    1 = as bad as silence), over the utterances."""
    from train.features import encode_levels, load_batch

    audio = load_batch(utterances)
    if audio.shape[0] == 0:
        return float("nan")
    z = encode_levels(encoder, audio, (level,), device=device)[level]
    rec = decode_batched(decoder, z, audio.shape[-1], device=device)
    return float((rec - audio).pow(2).mean() / audio.pow(2).mean().clamp_min(1e-12))


def fit_and_save(encoder, ckpt_dims: dict, train_utts, level: str, out_dir: str | Path, *, epochs: int,
                 loss: str = "mse", lr: float = 2e-4, batch: int = 64, width: int | None = None, seed: int = 0,
                 device: str | torch.device = "cpu", checkpoint: str = "", progress: bool = True) -> Path:
    """Encode the training utterances, train the decoder for `level`, save DIR/decoder_<level>.pt."""
    from train.features import encode_levels, load_batch

    audio = load_batch(train_utts)
    z = encode_levels(encoder, audio, (level,), device=device)[level]
    dec, hist = train_decoder(z, audio, level, dims=ckpt_dims, epochs=epochs, lr=lr, batch=batch, loss=loss,
                              width=width, seed=seed, device=device, progress=progress)
    config = {"loss": loss, "epochs": epochs, "lr": lr, "batch": batch, "seed": seed, "checkpoint": checkpoint,
              "train_items": len(train_utts), "n_samples": int(audio.shape[-1]), "latent": "mu"}
    return save_decoder(dec.cpu(), decoder_path(out_dir, level), ckpt_dims, config, hist)


def main(argv: list[str] | None = None) -> int:
    from train.checkpoint import load_encoder, trained_corpus
    from train.cli import (
        add_corpus_arg,
        add_device_arg,
        fail,
        non_negative_int,
        positive_float,
        positive_int,
        select_device,
    )
    from train.corpus import find_corpus, load_split

    ap = argparse.ArgumentParser(prog="python -m train.decoder", description=(
        "Train one decoder per conv module on frozen encoder latents (mu) of the corpus train split, save "
        "OUT/decoder_<level>.pt and WAV reconstructions of a few test words next to their originals "
        "(OUT/wav/<id>_original.wav, OUT/wav/<id>_<level>.wav)."))
    ap.add_argument("--checkpoint", required=True, help="encoder checkpoint written by python -m train.sim")
    ap.add_argument("--level", default="all", choices=DECODER_LEVELS + ("all",), help="which module (default all)")
    ap.add_argument("--loss", default="mse", choices=("mse", "mse+logmel"), help="reconstruction loss (default mse)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--epochs", type=positive_int, default=200, help="training epochs (paper: 200)")
    ap.add_argument("--lr", type=positive_float, default=2e-4, help="Adam learning rate (paper: 2e-4)")
    ap.add_argument("--batch", type=positive_int, default=64, help="batch size (paper: 64)")
    ap.add_argument("--width", type=positive_int, default=None, help="hidden channels (default: the latent width)")
    ap.add_argument("--examples", type=non_negative_int, default=4,
                    help="test words to reconstruct as WAV (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    add_device_arg(ap)
    add_corpus_arg(ap)
    args = ap.parse_args(argv)
    try:
        encoder, ckpt = load_encoder(args.checkpoint)
        corpus = find_corpus(args.corpus, trained_corpus(ckpt))
        train_utts, test_utts = load_split(corpus, "train"), load_split(corpus, "test")
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        return fail(str(exc))
    device = select_device(args.device)
    encoder.to(device)
    if not train_utts:
        return fail(f"{corpus}: the train split is empty")
    levels = DECODER_LEVELS if args.level == "all" else (args.level,)
    out = Path(args.out)
    for level in levels:
        path = fit_and_save(encoder, ckpt["dims"], train_utts, level, out, epochs=args.epochs, loss=args.loss,
                            lr=args.lr, batch=args.batch, width=args.width, seed=args.seed, device=device,
                            checkpoint=str(args.checkpoint))
        dec, meta = load_decoder(path)
        write_reconstructions(dec.to(device), encoder, test_utts[:args.examples], out / "wav", level, device=device)
        print(f"{path}: final training loss {meta['history'][-1]:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
