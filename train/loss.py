"""The training objective: InfoNCE per module, plus beta * KL to N(0, I) for SIM.

KL normalisation (the authors'): per module, the KL of every frame summed over time and
channels, divided by batch size times channels. With the default 640 ms crop the number of
frames per module is fixed (m1 511, m2 129, m3 64), so beta means what it means in the paper
(0.0033 for this corpus). Its weight grows with crop length: keep --crop fixed when comparing.

InfoNCE: a bias-free linear predictor maps context c_t to K predictions W_k c_t, c_t taken from
a random window of 128 frames. Each is scored against the true z_{t+k} and against negatives
drawn at random from all B*L positions of the batch's whole sequences (the authors' way; B*W
positions of the window with negatives_from="window"), 10 per context position, shared by its
K predictions. Cross-entropy with the
positive as class 0, averaged over valid positions, then over k. Everything is batched
tensor algebra: no Python loop over batch items, positions or negatives.

Two ways to compute the same scores from the same random draws (scoring=):
- "lean" (the default): negatives read with index_select (its backward is an index_add, not the
  sort-based accumulate of advanced indexing) and scored with one batched matmul of the K
  predictions against the N negatives of each position; positives as a dot product over a
  strided view of the targets. No candidate tensor (positive + negatives) is built.
- "reference": the straightforward form it replaced (advanced indexing and einsum), kept to
  check the lean form against and to measure it (bench/train_throughput.py --compare).
A full score matrix of every prediction against every pool position (one big matmul, then
positives and negatives read from it) was measured too and rejected: its cost grows with the
pool (B * L positions), ~40x slower than "lean" on a CPU at batch 8 (docs/benchmarks.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.distributed import Shard, gather_rows
from train.model import LevelOutput, ModelSpec, kl_to_standard_normal

PREDICTION_STEPS = 10
NEGATIVES = 10
WINDOW = 128  # frames; a random window of this length when the sequence is longer


def reference_scores(pred: torch.Tensor, future: torch.Tensor, pool: torch.Tensor, idx: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive (B, W, K) and negative (B, W, K, N) scores the straightforward way: the negatives'
    vectors gathered by advanced indexing, both scored with einsum. pred (B, W, K, D), future
    (B, W, D, K) the true z_{t+k}, pool (P, D) the negatives' pool, idx (B, W, N) into it."""
    pos = torch.einsum("bwkd,bwdk->bwk", pred, future)
    return pos, torch.einsum("bwkd,bwnd->bwkn", pred, pool[idx])


def lean_scores(pred: torch.Tensor, future: torch.Tensor, pool: torch.Tensor, idx: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same scores as reference_scores from the same arguments, with cheaper kernels: index_select
    (backward: index_add) and one batched matmul (K predictions x N negatives per position)."""
    B, W, K, D = pred.shape
    N = idx.shape[-1]
    pos = torch.linalg.vecdot(pred, future.transpose(2, 3))
    negs = torch.index_select(pool, 0, idx.reshape(-1)).view(B * W, N, D)
    neg = torch.bmm(pred.reshape(B * W, K, D), negs.transpose(1, 2)).view(B, W, K, N)
    return pos, neg


SCORES = {"lean": lean_scores, "reference": reference_scores}
SCORINGS = tuple(SCORES)


class InfoNCE(nn.Module):
    """InfoNCE for one module. Negatives come from the whole sequence (all B*L positions of the
    batch, as the authors' code draws them) or only from the B*W positions of the window."""

    NEGATIVE_POOLS = ("sequence", "window")

    def __init__(self, d_context: int, d_target: int, steps: int = PREDICTION_STEPS,
                 negatives: int = NEGATIVES, window: int = WINDOW, negatives_from: str = "sequence",
                 scoring: str = "lean"):
        super().__init__()
        if negatives_from not in self.NEGATIVE_POOLS:
            raise ValueError(f"negatives_from must be one of {self.NEGATIVE_POOLS}, got {negatives_from!r}")
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        self.steps, self.negatives, self.window, self.d_target = steps, negatives, window, d_target
        self.negatives_from, self.scoring = negatives_from, scoring
        self.predictor = nn.Linear(d_context, d_target * steps, bias=False)

    def forward(self, context: torch.Tensor, targets: torch.Tensor, generator: torch.Generator | None = None,
                shard: Shard | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """context (B, L, Dc), targets (B, L, D), channels last.

        Returns the scalar loss and, detached, how often the positive scored above all its
        negatives (chance: 1 / (negatives + 1)). With a shard (a torchrun job), the batch is this
        rank's rows of a global batch: negatives come from the global batch's targets, drawn as one
        process would draw them."""
        B, L, D = targets.shape
        W = min(L, self.window)
        window_ctx, window_tgt = context, targets
        if L > W:  # the window's start stays a tensor: no host sync, and torch.compile needs no recompile per start
            start = torch.randint(0, L - W + 1, (1,), device=targets.device, generator=generator)
            positions = start + torch.arange(W, device=targets.device)
            window_ctx, window_tgt = context.index_select(1, positions), targets.index_select(1, positions)
        K = min(self.steps, W - 1)
        if K < 1:
            raise ValueError(f"InfoNCE needs at least 2 frames, got {L}")
        pred = self.predictor(window_ctx).view(B, W, self.steps, D)[:, :, :K]  # (B, W, K, D)

        # Future targets z_{t+k}, k = 1..K, as a strided view over the end-padded sequence.
        padded = F.pad(window_tgt, (0, 0, 0, K))  # (B, W + K, D)
        future = padded.unfold(1, K + 1, 1)[:, :W, :, 1:]  # (B, W, D, K)
        pool = targets if self.negatives_from == "sequence" else window_tgt
        if shard is not None:
            pool = gather_rows(pool, shard)
        n_pool = pool.shape[0] * pool.shape[1]
        idx = torch.randint(0, n_pool, (pool.shape[0], W, self.negatives), device=targets.device, generator=generator)
        if shard is not None:
            idx = idx[shard.start:shard.stop]
        pos, neg = SCORES[self.scoring](pred, future, pool.reshape(n_pool, D), idx)

        logits = torch.cat([pos.unsqueeze(-1), neg], dim=-1)
        nll = torch.logsumexp(logits, dim=-1) - pos  # (B, W, K): CE with the positive as class 0
        t = torch.arange(W, device=targets.device).unsqueeze(1)
        k = torch.arange(1, K + 1, device=targets.device).unsqueeze(0)
        valid = (t + k < W).to(nll.dtype)  # (W, K)
        per_k = (nll * valid).sum(dim=(0, 1)) / (B * valid.sum(0))
        with torch.no_grad():
            first = (pos.unsqueeze(-1) > neg).all(-1).to(nll.dtype)  # (B, W, K)
            accuracy = (first * valid).sum() / (B * valid.sum())
        return per_k.mean(), accuracy


def kl_term(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q || N(0, I)) summed over time and channels, divided by batch * channels (see module doc)."""
    B, _, C = mu.shape
    return kl_to_standard_normal(mu, logvar).sum() / (B * C)


class SimLoss(nn.Module):
    """One InfoNCE (+ KL) per trained module. For CPC a single loss on the GRU output."""

    def __init__(self, dims: ModelSpec, beta: float = 0.0033, negatives_from: str = "sequence",
                 scoring: str = "lean"):
        super().__init__()
        self.dims, self.beta = dims, beta  # beta may be changed between steps (KL warm-up)
        heads = {}
        if dims.greedy:
            for name, _ in dims.modules:
                heads[name] = InfoNCE(dims.channels, dims.channels, negatives_from=negatives_from, scoring=scoring)
        heads["ar"] = InfoNCE(dims.hidden, dims.channels, negatives_from=negatives_from, scoring=scoring)
        self.nce = nn.ModuleDict(heads)

    def module_losses(self, out: dict[str, LevelOutput], generator: torch.Generator | None = None,
                      shard: Shard | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Per trained module: (InfoNCE, its accuracy, KL term or None), scalar tensors; the
        losses carry gradients."""
        last_conv = [name for name, _ in self.dims.modules][-1]
        losses = {}
        for name, nce in self.nce.items():
            if name == "ar":  # context: the GRU output; targets: its input (cut from m3 when greedy)
                targets = out[last_conv].z
                loss, acc = nce(out["ar"].mu, targets.detach() if self.dims.greedy else targets, generator, shard)
                losses[name] = (loss, acc, None)
            else:
                o = out[name]
                kl = kl_term(o.mu, o.logvar) if o.logvar is not None else None
                losses[name] = (*nce(o.context, o.z, generator, shard), kl)
        return losses

    def forward(self, out: dict[str, LevelOutput], generator: torch.Generator | None = None,
                shard: Shard | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns the total (sum over modules; gradients are cut between greedy modules, so
        each module still sees only its own loss) and a dict of detached per-module numbers:
        nce_<m> (InfoNCE), acc_<m> (how often the positive ranks first), kl_<m> (the KL term in
        the loss's normalisation) and klf_<m> (KL per channel per frame, comparable across crops).
        With a shard the numbers are this rank's; the total is weighted by the rank's share
        (train.distributed.Shard.weight) so that DDP's average is the global batch's gradient."""
        total = torch.zeros((), device=out["ar"].mu.device)
        stats: dict[str, torch.Tensor] = {}
        for name, (nce, acc, kl) in self.module_losses(out, generator, shard).items():
            stats[f"nce_{name}"] = nce.detach()
            stats[f"acc_{name}"] = acc
            total = total + nce
            if kl is not None:
                stats[f"kl_{name}"] = kl.detach()
                stats[f"klf_{name}"] = kl.detach() / out[name].mu.shape[1]
                total = total + self.beta * kl
        stats["loss"] = total.detach()
        if shard is not None and shard.weight != 1.0:
            total = total * shard.weight
        return total, stats
