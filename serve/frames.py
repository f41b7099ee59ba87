"""Popped runtime frames -> StreamEncodeResponse bytes, with each level's calibrated score, p-value and flag.

The runtime gives, per level, arrays for the frames that just completed:
{"index" (n,), "mu" (n, C), "logvar" (n, C) and "kl" (n,) for levels with a log-variance, "maha" (n,)}.
"""
from __future__ import annotations

import numpy as np

from serve.scoring import ScoredFrames, Scorer
from serve.wire import LevelWriter


class FrameBuilder:
    """Builds responses for one model (shared by all streams; holds no per-stream state)."""

    def __init__(self, manifest: dict, level_hops: dict[str, int], sample_rate: int):
        self.scorer = Scorer(manifest)
        self.level_hops = dict(level_hops)
        self.sample_rate = sample_rate
        self._writers: dict[tuple, LevelWriter] = {}

    def _writer(self, level: str, frames: dict, with_logvar: bool) -> LevelWriter:
        key = (level, with_logvar)
        w = self._writers.get(key)
        if w is None:
            w = self._writers[key] = LevelWriter(level, frames["mu"].shape[1], self.level_hops[level],
                                                 self.sample_rate, with_logvar, "kl" in frames,
                                                 level in self.scorer.cal)
        return w

    def score(self, level: str, frames: dict) -> ScoredFrames:
        return self.scorer.score(level, frames)

    def responses(self, requests: list[tuple[dict[str, dict], tuple[str, ...], bool]]
                  ) -> tuple[list[bytes | None], dict[str, list[ScoredFrames]]]:
        """The serialised StreamEncodeResponse of each (popped frames, levels, return_logvar) of a
        batch (None where none of the stream's levels has a new frame), and the scored frames per
        level. Scoring and encoding run once per level over the frames of all streams."""
        chunks: list[list] = [[] for _ in requests]
        scored: dict[str, list[ScoredFrames]] = {}
        for level in self.level_hops:
            groups: dict[bool, list[tuple[int, dict]]] = {}
            for i, (popped, levels, return_logvar) in enumerate(requests):
                frames = popped.get(level)
                if level in levels and frames is not None and len(frames["index"]):
                    groups.setdefault(return_logvar and "logvar" in frames, []).append((i, frames))
            for with_logvar, members in groups.items():
                if len(members) == 1:
                    joined = members[0][1]
                else:  # logvar only where it is sent
                    keys = [k for k in ("index", "mu", "logvar", "kl", "maha")
                            if k in members[0][1] and (k != "logvar" or with_logvar)]
                    joined = {k: np.concatenate([f[k] for _, f in members]) for k in keys}
                sc = self.score(level, joined)
                scored.setdefault(level, []).append(sc)
                encoded = self._writer(level, joined, with_logvar).encode(
                    joined["index"], joined["mu"], joined["logvar"] if with_logvar else None, joined.get("kl"),
                    joined["maha"], sc.score, sc.p_value, sc.ood)
                end = 0
                for i, frames in members:
                    start, end = end, end + len(frames["index"])
                    chunks[i] += encoded.chunks(start, end)
        return [b"".join(c) if c else None for c in chunks], scored

    def response(self, popped: dict[str, dict], levels: tuple[str, ...], return_logvar: bool
                 ) -> tuple[bytes | None, list[ScoredFrames]]:
        """One stream's serialised StreamEncodeResponse (None if none of its levels has a new
        frame) and its scored frames."""
        (data,), scored = self.responses([(popped, levels, return_logvar)])
        return data, [sc for level in levels for sc in scored.get(level, [])]
