"""Entanglement score (paper §4.3.3, Table 3), batched.

For a pair of latents (z1, z2), each (T, C) of one level, rank the dims by
(mean_t z1 - mean_t z2)^2, largest first; z1'(k) is z1 with its top-k dims replaced by z2's
(all frames). With the level's decoder D:

    relative error(k) = MSE(D(z1'(k)), D(z2)) / MSE(D(z1), D(z2))

averaged over pairs. It is 1 at k = 0 (z1' = z1) and 0 at k = C (z1' = z2): for those two k the
decodes of z1 and z2 are reused, so the ends are exact. A low value at small k means a few dims
carry what separates the two words (less entangled).

Batching: every (pair, k) latent is built on the fly in chunks and decoded in batches; D(z1)
and D(z2) are decoded once per word, not once per pair. 200 pairs x 9 values of k is ~2,000
decodes in ~35 decoder calls, instead of the authors' one call per pair and k.

Pairs: ordered pairs of different test-split words of the same voice, drawn at random with a
fixed seed (sample_pairs).
"""
from __future__ import annotations

import numpy as np
import torch

from train.decoder import Decoder


def default_ks(channels: int) -> list[int]:
    """2, 4, 8, ... up to the number of channels (the paper's 2 ... 512)."""
    ks, k = [], 2
    while k < channels:
        ks.append(k)
        k *= 2
    return ks + [channels]


def sample_pairs(n_items: int, n_pairs: int, seed: int = 0, groups=None) -> np.ndarray:
    """(n_pairs, 2) distinct ordered pairs (a, b), a != b, drawn with a fixed seed; fewer if there are
    not that many. With `groups` (a label per item, e.g. the voice) both items of a pair share a label,
    so pairs differ by word, not by speaker (the paper had one speaker)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(n_items, dtype=np.int64) if groups is None else np.unique(np.asarray(groups),
                                                                             return_inverse=True)[1]
    candidates = []
    for g in np.unique(labels):
        idx = np.flatnonzero(labels == g)
        if len(idx) >= 2:
            a, b = np.meshgrid(idx, idx, indexing="ij")
            keep = a != b
            candidates.append(np.stack([a[keep], b[keep]], axis=1))
    if not candidates:
        raise ValueError("need at least two words (of one group) to form pairs")
    allpairs = np.concatenate(candidates)
    if n_pairs >= len(allpairs):
        return allpairs
    return allpairs[np.sort(rng.choice(len(allpairs), size=n_pairs, replace=False))]


def dim_ranks(mean1: torch.Tensor, mean2: torch.Tensor) -> torch.Tensor:
    """rank[p, c] = position of dim c when sorting (mean_t z1 - mean_t z2)^2 descending (0 = most
    different). Inputs: time means (P, C)."""
    diff = (mean1 - mean2).pow(2)
    order = torch.argsort(diff, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(diff.shape[1]).expand_as(order).contiguous())
    return ranks


def mix(z1: torch.Tensor, z2: torch.Tensor, ranks: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """z1 with the dims ranked below k (per row) taken from z2. z1, z2 (N, T, C), ranks (N, C), k (N,)."""
    take = (ranks < k[:, None]).unsqueeze(1)  # (N, 1, C)
    return torch.where(take, z2, z1)


@torch.no_grad()
def relative_errors(decoder: Decoder, z: torch.Tensor, pairs, ks, *, n_samples: int | None = None,
                    batch: int = 64, device: str | torch.device | None = None, progress: bool = False) -> dict:
    """Relative error for each k, for every pair (rows of `pairs` index into z (N, T, C)).

    Returns {"ks": [...], "per_pair": (P, K) array, "mean": (K,), "std": (K,)}."""
    from tqdm import tqdm

    device = device or next(decoder.parameters()).device
    pairs = torch.as_tensor(np.asarray(pairs), dtype=torch.long)
    ks_t = torch.as_tensor(list(ks), dtype=torch.long)
    C = z.shape[-1]
    words = torch.unique(pairs.flatten())
    # one decode per word involved
    dec_words = {}
    for i in range(0, len(words), batch):
        idx = words[i:i + batch]
        out = decoder(z[idx].to(device), n_samples).float()
        for w, o in zip(idx.tolist(), out):
            dec_words[w] = o
    a, b = pairs[:, 0], pairs[:, 1]
    means = z.mean(1)
    ranks = dim_ranks(means[a], means[b])  # (P, C)
    d1 = torch.stack([dec_words[i] for i in a.tolist()])
    d2 = torch.stack([dec_words[i] for i in b.tolist()])
    denom = (d1 - d2).pow(2).mean(-1)  # (P,)
    P, K = len(pairs), len(ks_t)
    num = torch.empty(P, K, device=d1.device)
    # k = 0 and k >= C reuse D(z1), D(z2); the rest are decoded in batches of (pair, k) jobs
    inner = [(p, j) for p in range(P) for j in range(K) if 0 < int(ks_t[j]) < C]
    for p in range(P):
        for j in range(K):
            k = int(ks_t[j])
            if k <= 0:
                num[p, j] = denom[p]
            elif k >= C:
                num[p, j] = 0.0
    jobs = torch.tensor(inner, dtype=torch.long).reshape(-1, 2)
    for i in tqdm(range(0, len(jobs), batch), desc="entanglement", disable=not progress, leave=False):
        pj = jobs[i:i + batch]
        pp, kk = pj[:, 0], ks_t[pj[:, 1]]
        zm = mix(z[a[pp]], z[b[pp]], ranks[pp], kk)
        dm = decoder(zm.to(device), n_samples).float()
        num[pp, pj[:, 1]] = (dm - d2[pp]).pow(2).mean(-1)
    per_pair = (num / denom[:, None].clamp_min(torch.finfo(torch.float32).tiny)).cpu().numpy()
    return {"ks": [int(k) for k in ks_t], "per_pair": per_pair, "mean": per_pair.mean(0),
            "std": per_pair.std(0, ddof=1) if P > 1 else np.zeros(K)}


def relative_errors_reference(decoder: Decoder, z: torch.Tensor, pairs, ks, n_samples: int | None = None
                              ) -> np.ndarray:
    """The slow, literal version (one decode per pair and k), for tests. Returns (P, K)."""
    out = np.zeros((len(pairs), len(ks)))
    with torch.no_grad():
        for p, (a, b) in enumerate(pairs):
            z1, z2 = z[a], z[b]
            diff = (z1.mean(0) - z2.mean(0)) ** 2
            order = sorted(range(z.shape[-1]), key=lambda c: -float(diff[c]))
            x1 = decoder(z1[None], n_samples)[0]
            x2 = decoder(z2[None], n_samples)[0]
            den = float(((x1 - x2) ** 2).mean())
            for j, k in enumerate(ks):
                zm = z1.clone()
                for c in order[:k]:
                    zm[:, c] = z2[:, c]
                xm = decoder(zm[None], n_samples)[0]
                out[p, j] = float(((xm - x2) ** 2).mean()) / den
    return out
