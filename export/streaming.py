"""Fixed-shape streaming graphs built from a trained Encoder (its own weights, no second architecture).

StreamingStep:  one hop (160 samples) per stream + state -> the frames that became complete + new state.
StreamingFlush: end of stream: the last partial hop (< 160 samples) + state -> the remaining frames,
                with each layer's right padding applied as the offline model does.

Per conv layer i the state holds cache_i, the not-yet-consumed tail of the layer's input (sizes
export.geometry.cache_sizes() = 7, 5, 3, 3, 2 frames), time-major: (frames, channels). Everything
inside the graphs is time-major (B, frames, channels), so no Transpose is needed anywhere. The GRU's
state is gru_h; `started` (0/1) says whether the stream has taken its first step. On a stream's
first step the first output of every layer is a "phantom" that reads pre-stream cache slots; it is
zeroed and then plays the role of the next layer's last left-padding zero. docs/streaming.md derives the arithmetic.

Outputs, per level L: mu_L (B, n, C), valid_L (B, n) bool, logvar_L and kl_L (variational only),
maha_L (B, n); then next_<state> for each state input. Invalid frames are zero in every output.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from export.geometry import cache_sizes, flush_outputs, state_spec, step_outputs
from export.scores import make_scorers
from train.audio import CONV_LAYERS, HOP
from train.model import Encoder, kl_to_standard_normal


def conv1d_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int = 1) -> torch.Tensor:
    """F.conv1d (no padding) on TIME-MAJOR x: (B, L, C_in) -> (B, n, C_out), as one GEMM.

    The k taps of every output frame are laid side by side (B·n rows of k·C_in) and multiplied by
    the weight in one Gemm with the bias fused, so a batch of streams folds into the GEMM's rows
    (onnxruntime's Conv runs one small GEMM per batch row). Every layer of the encoder has
    k = 2·stride: then the taps are two shifted views of the input cut into stride-long blocks,
    one Reshape and one Concat instead of k Slices."""
    c_out, c_in, k = weight.shape
    # int(): the streaming graphs' time lengths are fixed, so the tracer records constants here
    # instead of Shape/Gather/Div chains (dozens of small nodes that cost more than the glue they feed)
    n = (int(x.shape[1]) - k) // stride + 1
    if k == 1 and stride == 1:
        u = x
    elif k == 2 * stride:
        blocks = x[:, :stride * (n + 1)].reshape(-1, n + 1, stride * c_in)
        u = torch.cat([blocks[:, :-1], blocks[:, 1:]], dim=2)
    else:
        taps = [x[:, t:t + stride * (n - 1) + 1:stride] for t in range(k)]
        u = torch.cat(taps, dim=2)
    w = weight.permute(2, 1, 0).reshape(k * c_in, c_out)
    u2 = u.reshape(-1, k * c_in)
    y = torch.addmm(bias, u2, w) if bias is not None else u2 @ w
    return y.reshape(-1, n, c_out)


def level_dims_of(encoder: Encoder) -> dict[str, int]:
    d = encoder.dims
    return {level: (d.hidden if level == "ar" else d.channels) for level in d.levels}


def output_names_for(levels, variational: bool) -> list[str]:
    """Per-level output names in graph order (without the next_ state outputs)."""
    names = []
    for level in levels:
        names += [f"mu_{level}", f"valid_{level}"]
        if variational and level != "ar":
            names += [f"logvar_{level}", f"kl_{level}"]
        names.append(f"maha_{level}")
    return names


class _StreamingBase(nn.Module):
    """Shared layer code of the step and flush graphs."""

    flush = False

    def __init__(self, encoder: Encoder, gaussians: dict | None = None):
        super().__init__()
        if encoder.dims.batch_norm:
            raise ValueError("the streaming step takes plain conv layers: fold BatchNorm first "
                             "(train.model.fold_batch_norm)")
        self.encoder = encoder
        self.dims = encoder.dims
        self.levels = self.dims.levels
        self.variational = self.dims.variational
        self.scorers = make_scorers(level_dims_of(encoder), gaussians)
        # (conv, level it ends or None) for the five layers, in order
        self._layer_plan = []
        for level, module in encoder.convs.items():
            for j, conv in enumerate(module.convs):
                self._layer_plan.append((conv, level if j == len(module.convs) - 1 else None))
        if len(self._layer_plan) != len(CONV_LAYERS):
            raise ValueError("encoder does not have the expected five conv layers")
        self.state = state_spec(self.dims.channels, self.dims.hidden)
        self.state_names = [s["name"] for s in self.state]
        self.n_out = flush_outputs() if self.flush else step_outputs()

    # names, for export
    def input_names(self) -> list[str]:
        first = ["tail", "tail_len"] if self.flush else ["audio"]
        return first + self.state_names

    def output_names(self) -> list[str]:
        return output_names_for(self.levels, self.variational) + [f"next_{n}" for n in self.state_names]

    def initial_state(self, batch: int) -> list[torch.Tensor]:
        return [torch.zeros(batch, *s["shape"]) for s in self.state]

    def _run(self, x: torch.Tensor, caches, gru_h, started, tail_len=None):
        """x: (B, N, 1) new samples, time-major. Returns (outputs list, next state list)."""
        levels = {}
        new_caches = []
        count = tail_len  # (B,) float: valid input frames of the current layer (flush only)
        for i, ((conv, level), (k, s, p), c, n_out) in enumerate(
                zip(self._layer_plan, CONV_LAYERS, cache_sizes(), self.n_out)):
            buf = torch.cat([caches[i], x], dim=1)
            if self.flush:
                buf = F.pad(buf, (0, 0, 0, p))  # this layer's right padding
            y = torch.relu(conv1d_matmul(buf, conv.weight, conv.bias, stride=s))
            idx = torch.arange(n_out, dtype=torch.float32)
            valid = idx.unsqueeze(0) >= (1.0 - started)  # drops the phantom of a first step
            if self.flush:
                count = torch.clamp(torch.floor((c + count + p - k) / s) + 1.0, min=0.0)
                valid = valid & (idx.unsqueeze(0) < count.unsqueeze(1))
                new_caches.append(buf[:, buf.shape[1] - c:])  # terminal state: not for stepping on
            else:
                new_caches.append(buf[:, n_out * s:])
            if level is not None:
                module = self.encoder.convs[level]
                if module.logvar is not None:  # both heads in one GEMM
                    heads = conv1d_matmul(y, torch.cat([module.mu.weight, module.logvar.weight]),
                                          torch.cat([module.mu.bias, module.logvar.bias]))
                    mu, logvar = heads[:, :, :module.mu.weight.shape[0]], heads[:, :, module.mu.weight.shape[0]:]
                else:
                    mu, logvar = conv1d_matmul(y, module.mu.weight, module.mu.bias), None
                levels[level] = (mu, logvar, valid)
                y = mu  # the next module consumes the posterior mean (inference is deterministic)
            x = y * valid.unsqueeze(2).to(y.dtype)

        # GRU over the top frames; it does not advance on invalid (phantom / past-the-end) frames
        mu3, _, valid3 = levels[self.levels[-2]]
        seq = mu3 * valid3.unsqueeze(2).to(mu3.dtype)
        h = gru_h
        outs = []
        for j in range(seq.shape[1]):
            _, hn = self.encoder.gru(seq[:, j:j + 1, :], h.unsqueeze(0))
            v = valid3[:, j:j + 1].to(h.dtype)
            h = v * hn[0] + (1.0 - v) * h
            outs.append(h)
        ar = torch.stack(outs, dim=1)

        outputs = []
        for level in self.levels:
            if level == "ar":
                mu_t, logvar_t, valid = ar, None, valid3
            else:
                mu_t, logvar_t, valid = levels[level]
            vf = valid.to(mu_t.dtype)
            outputs += [mu_t * vf.unsqueeze(2), valid]
            if self.variational and level != "ar":
                outputs += [logvar_t * vf.unsqueeze(2), kl_to_standard_normal(mu_t, logvar_t) * vf]
            outputs.append(self.scorers[level](mu_t, frames=int(mu_t.shape[1])) * vf)
        next_state = new_caches + [h, torch.ones_like(started)]
        return outputs, next_state


class StreamingStep(_StreamingBase):
    """forward(audio (B, 160), cache_0..cache_4, gru_h, started) -> outputs + next state (see module doc)."""

    flush = False

    def forward(self, audio, cache_0, cache_1, cache_2, cache_3, cache_4, gru_h, started):
        outputs, state = self._run(audio.unsqueeze(2), [cache_0, cache_1, cache_2, cache_3, cache_4],
                                   gru_h, started)
        return tuple(outputs + state)


class StreamingFlush(_StreamingBase):
    """forward(tail (B, 160), tail_len (B,) int64 in [0, 159], state...) -> the stream's last frames.

    Samples of tail at or beyond tail_len are ignored (treated as zero)."""

    flush = True

    def forward(self, tail, tail_len, cache_0, cache_1, cache_2, cache_3, cache_4, gru_h, started):
        n = tail_len.to(torch.float32)
        keep = (torch.arange(HOP, dtype=torch.float32).unsqueeze(0) < n.unsqueeze(1)).to(tail.dtype)
        outputs, state = self._run((tail * keep).unsqueeze(2), [cache_0, cache_1, cache_2, cache_3, cache_4],
                                   gru_h, started, tail_len=n)
        return tuple(outputs + state)


def stream_torch(encoder: Encoder, audio: np.ndarray, gaussians: dict | None = None) -> dict[str, np.ndarray]:
    """Reference: run the torch step/flush modules over one waveform (1-D) hop by hop.

    Returns per level the concatenated valid frames: {"mu_L": (n, C), "kl_L", "logvar_L", "maha_L"}."""
    step, flush = StreamingStep(encoder, gaussians).eval(), StreamingFlush(encoder, gaussians).eval()
    names = step.output_names()
    n_levels_out = len(output_names_for(step.levels, step.variational))
    state = step.initial_state(1)
    audio = torch.as_tensor(np.asarray(audio, np.float32))
    collected: dict[str, list] = {}

    def collect(outs):
        d = dict(zip(names, outs))
        for level in step.levels:
            v = d[f"valid_{level}"][0]
            for key in ("mu", "logvar", "kl", "maha"):
                if f"{key}_{level}" in d:
                    collected.setdefault(f"{key}_{level}", []).append(d[f"{key}_{level}"][0][v].numpy())

    with torch.no_grad():
        n_full = audio.shape[0] // HOP
        for t in range(n_full):
            outs = step(audio[t * HOP:(t + 1) * HOP].unsqueeze(0), *state)
            collect(outs)
            state = list(outs[n_levels_out:])
        tail = torch.zeros(1, HOP)
        rest = audio[n_full * HOP:]
        tail[0, :rest.shape[0]] = rest
        outs = flush(tail, torch.tensor([rest.shape[0]], dtype=torch.int64), *state)
        collect(outs)
    return {k: np.concatenate(v, axis=0) for k, v in collected.items()}
