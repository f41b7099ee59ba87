"""The encoder: Smooth InfoMax (SIM), Greedy InfoMax (GIM) and CPC share this one definition.

SIM / GIM: three conv modules (m1, m2, m3), each ending in 1x1 heads for the posterior mean
and (SIM only) log-variance, plus a GRU (ar). Each module sees the previous module's output
with gradients cut, so each is trained by its own loss only.
CPC: one conv module holding all five convs, then the GRU, trained end to end.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from train import audio
from train.audio import CONV_LAYERS

METHODS = ("sim", "gim", "cpc")


@dataclass(frozen=True)
class ModelSpec:
    method: str = "sim"
    channels: int = 512  # conv and latent width
    hidden: int = 256  # GRU width
    batch_norm: bool = False  # BatchNorm1d between each conv and its ReLU (folded into the conv at export)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.channels < 1 or self.hidden < 1:
            raise ValueError(f"channels and hidden must be positive, got {self.channels} and {self.hidden}")

    @property
    def variational(self) -> bool:
        """Whether the conv modules have a trained posterior variance."""
        return self.method == "sim"

    @property
    def greedy(self) -> bool:
        return self.method not in audio.END_TO_END_METHODS

    @property
    def modules(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return audio.conv_modules(self.method)

    @property
    def levels(self) -> tuple[str, ...]:
        """Output levels in order, conv modules then the GRU."""
        return audio.levels(self.method)

    def to_dict(self) -> dict:
        return asdict(self)


class ConvModule(nn.Module):
    """Conv -> [BatchNorm] -> ReLU layers, then heads for the posterior mean and (optionally) log-variance."""

    def __init__(self, in_channels: int, layer_ids: tuple[int, ...], channels: int, variational: bool,
                 batch_norm: bool = False):
        super().__init__()
        self.layer_ids = layer_ids
        convs = []
        for i in layer_ids:
            k, s, p = CONV_LAYERS[i]
            convs.append(nn.Conv1d(in_channels, channels, k, s, p))
            in_channels = channels
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(nn.BatchNorm1d(channels) for _ in layer_ids) if batch_norm else None
        self.mu = nn.Conv1d(channels, channels, 1)
        self.logvar = nn.Conv1d(channels, channels, 1) if variational else None

    def layer_outputs(self, x: torch.Tensor):
        """Yield each conv layer's activation (after its BatchNorm, if any, and ReLU), in order."""
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.norms is not None:
                x = self.norms[i](x)
            x = torch.relu(x)
            yield x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last conv layer's activation."""
        for h in self.layer_outputs(x):
            x = h
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, C_in, T) -> mean and log-variance, each (B, C, T'); log-variance None for GIM/CPC."""
        h = self.features(x)
        return self.mu(h), (self.logvar(h) if self.logvar is not None else None)


@dataclass
class LevelOutput:
    """One level's output for a batch, channels-last: (B, T, C)."""

    mu: torch.Tensor
    logvar: torch.Tensor | None = None
    z: torch.Tensor | None = None  # sample fed to the next module (training) or mu (inference)
    context: torch.Tensor | None = None  # second sample used as InfoNCE context (SIM training)


class Encoder(nn.Module):
    def __init__(self, dims: ModelSpec = ModelSpec()):
        super().__init__()
        self.dims = dims
        in_ch = 1
        mods = {}
        for name, layer_ids in dims.modules:
            mods[name] = ConvModule(in_ch, layer_ids, dims.channels, dims.variational, dims.batch_norm)
            in_ch = dims.channels
        self.convs = nn.ModuleDict(mods)
        self.gru = nn.GRU(dims.channels, dims.hidden, batch_first=True)

    def forward(self, audio: torch.Tensor, sample: bool = False, shard=None) -> dict[str, LevelOutput]:
        """audio: (B, T) or (B, 1, T) float waveform at 16 kHz.

        sample=False: deterministic (posterior means), the inference path.
        sample=True: SIM's training path; each module's output is a reparametrised sample and
        a second independent sample is drawn as InfoNCE context. GIM/CPC ignore it.
        Greedy methods cut gradients between modules.
        shard (train.distributed.Shard): audio holds rows [start, stop) of a global batch; the
        posterior noise is drawn for the global batch and these rows kept, as one process would.
        """
        x = audio.unsqueeze(1) if audio.dim() == 2 else audio
        out: dict[str, LevelOutput] = {}
        for name, module in self.convs.items():
            mu, logvar = module(x)
            # channels-last copies, not transposed views: torch.compile (2.13) cannot rebuild outputs that
            # are transposed views of one another. Without a sample z and context are the mean itself,
            # so its one copy serves all three.
            mu_t = channels_last(mu)
            if sample and logvar is not None:
                std = torch.exp(0.5 * logvar)
                z = mu + noise_like(std, shard) * std
                ctx = mu + noise_like(std, shard) * std
                z_t, ctx_t = channels_last(z), channels_last(ctx)
            else:
                z, z_t, ctx_t = mu, mu_t, mu_t
            out[name] = LevelOutput(mu=mu_t, logvar=None if logvar is None else channels_last(logvar), z=z_t,
                                    context=ctx_t)
            x = z.detach() if self.dims.greedy else z
        gru_in = out[next(reversed(out))].z
        if self.dims.greedy:
            gru_in = gru_in.detach()
        c, _ = self.gru(gru_in)
        out["ar"] = LevelOutput(mu=c, z=c, context=c)
        return out

    @torch.no_grad()
    def encode(self, audio: torch.Tensor) -> dict[str, torch.Tensor]:
        """Deterministic latents (B, T, C) per level, plus per-frame KL to N(0, I) for SIM levels."""
        out = self.forward(audio, sample=False)
        res = {name: o.mu for name, o in out.items()}
        for name, o in out.items():
            if o.logvar is not None:
                res[f"kl_{name}"] = kl_to_standard_normal(o.mu, o.logvar)
        return res


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T) -> a contiguous (B, T, C)."""
    return x.transpose(1, 2).contiguous()


def noise_like(x: torch.Tensor, shard=None) -> torch.Tensor:
    """Standard normal noise shaped like x; with a shard, this rank's rows of the global batch's noise."""
    if shard is None:
        return torch.randn_like(x)
    return torch.randn((shard.total, *x.shape[1:]), dtype=x.dtype, device=x.device)[shard.start:shard.stop]


@torch.no_grad()
def fold_batch_norm(encoder: Encoder) -> Encoder:
    """An equivalent encoder without BatchNorm layers, for inference and export.

    In eval mode BatchNorm is the affine map y = (x - mean) / sqrt(var + eps) * gamma + beta per
    channel, so it folds into the conv before it: w' = w * s, b' = (b - mean) * s + beta with
    s = gamma / sqrt(var + eps). The result equals encoder.eval() up to float rounding; an encoder
    without BatchNorm is returned as it is.
    """
    if not encoder.dims.batch_norm:
        return encoder
    folded = Encoder(replace(encoder.dims, batch_norm=False)).to(next(encoder.parameters()).device)
    state = {k: v for k, v in encoder.state_dict().items() if ".norms." not in k}
    for name, module in encoder.convs.items():
        for i, (conv, norm) in enumerate(zip(module.convs, module.norms)):
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            state[f"convs.{name}.convs.{i}.weight"] = conv.weight * scale[:, None, None]
            state[f"convs.{name}.convs.{i}.bias"] = (conv.bias - norm.running_mean) * scale + norm.bias
    folded.load_state_dict(state)
    return folded.eval()


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-frame KL(N(mu, exp(logvar)) || N(0, I)) in nats, summed over the last (channel) axis."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)
