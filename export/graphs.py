"""The offline graphs (per module, whole encoder, decoders) as torch modules, and the ONNX writer.

All wrap the trained modules (train.model.Encoder, train.decoder.Decoder); nothing is redefined.
Tensors are channels-last like Encoder's outputs: (batch, frames, channels).

  m1.onnx   audio (B, samples)        -> mu, logvar (B, frames, C)    [logvar: SIM only]
  m2.onnx   x = mu of m1 (B, T, C)    -> mu, logvar
  m3.onnx   x = mu of m2 (B, T, C)    -> mu, logvar                   [CPC: audio -> mu, all five convs]
  ar.onnx   x = mu of m3 (B, T, C)    -> mu (B, T, H)                 the GRU's output, zero initial state
  encoder.onnx  audio (B, samples)    -> mu_L, logvar_L, kl_L, maha_L for every level
  decoder_<level>.onnx  latents (B, T, C) -> audio (B, samples)
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from export.scores import make_scorers
from export.streaming import level_dims_of, output_names_for
from train.model import Encoder, kl_to_standard_normal

OPSET = 17


class ModuleGraph(nn.Module):
    """One conv module: audio (B, S) or the previous level's mu (B, T, C) -> mu[, logvar] (B, T', C)."""

    def __init__(self, encoder: Encoder, level: str):
        super().__init__()
        self.module = encoder.convs[level]
        self.first = level == next(iter(encoder.convs))
        self.variational = self.module.logvar is not None

    def input_names(self) -> list[str]:
        return ["audio" if self.first else "x"]

    def output_names(self) -> list[str]:
        return ["mu", "logvar"] if self.variational else ["mu"]

    def dynamic_axes(self) -> dict:
        axes = {name: {0: "batch", 1: "frames"} for name in self.output_names()}
        axes[self.input_names()[0]] = {0: "batch", 1: "samples" if self.first else "frames_in"}
        return axes

    def forward(self, x):
        x = x.unsqueeze(1) if self.first else x.transpose(1, 2)
        mu, logvar = self.module(x)
        return (mu.transpose(1, 2), logvar.transpose(1, 2)) if self.variational else mu.transpose(1, 2)


class ArGraph(nn.Module):
    """The GRU over m3's mu: x (B, T, C) -> mu (B, T, H), zero initial state."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.gru = encoder.gru

    def input_names(self):
        return ["x"]

    def output_names(self):
        return ["mu"]

    def dynamic_axes(self):
        return {"x": {0: "batch", 1: "frames"}, "mu": {0: "batch", 1: "frames"}}

    def forward(self, x):
        return self.gru(x)[0]


class EncoderGraph(nn.Module):
    """Whole encoder: audio (B, S) -> per level mu_L, logvar_L and kl_L (SIM conv levels), maha_L."""

    def __init__(self, encoder: Encoder, gaussians: dict | None = None):
        super().__init__()
        self.encoder = encoder
        self.levels = encoder.dims.levels
        self.variational = encoder.dims.variational
        self.scorers = make_scorers(level_dims_of(encoder), gaussians)

    def input_names(self):
        return ["audio"]

    def output_names(self):
        return [n for n in output_names_for(self.levels, self.variational) if not n.startswith("valid_")]

    def dynamic_axes(self):
        axes = {"audio": {0: "batch", 1: "samples"}}
        for name in self.output_names():
            axes[name] = {0: "batch", 1: f"frames_{name.rsplit('_', 1)[1]}"}
        return axes

    def forward(self, audio):
        out = self.encoder(audio, sample=False)
        res = []
        for level in self.levels:
            o = out[level]
            res.append(o.mu)
            if self.variational and level != "ar":
                res += [o.logvar, kl_to_standard_normal(o.mu, o.logvar)]
            res.append(self.scorers[level](o.mu))
        return tuple(res)


class DecoderGraph(nn.Module):
    """A trained decoder at its natural output length: latents (B, T, C) -> audio (B, samples)."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def input_names(self):
        return ["latents"]

    def output_names(self):
        return ["audio"]

    def dynamic_axes(self):
        return {"latents": {0: "batch", 1: "frames"}, "audio": {0: "batch", 1: "samples"}}

    def forward(self, latents):
        return self.decoder(latents)


def write_onnx(module: nn.Module, example: tuple, path: str | Path, input_names: list[str],
               output_names: list[str], dynamic_axes: dict, metadata: dict) -> Path:
    """torch.onnx.export with the legacy exporter (dynamo fails on nn.GRU), opset 17, then metadata_props.

    Metadata values that are not strings are stored as JSON."""
    path = Path(path)
    module = module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's and the legacy exporter's advisory warnings
        torch.onnx.export(module, example, str(path), dynamo=False, opset_version=OPSET,
                          input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                          do_constant_folding=True)
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
