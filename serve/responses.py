"""The StreamEncode responses of a tick: each stream's new frames, scored, as serialised
sim.v2.StreamEncodeResponse bytes (one LevelFrames of packed arrays per level).

The runtime gives, per stream and level, arrays for the frames that just completed:
{"index" (n,), "mu" (n, C), "logvar" (n, C) and "kl" (n,) for levels with a log-variance, "maha" (n,)}.
"""
from __future__ import annotations

import numpy as np

from protos.sim.v2 import codec
from protos.sim.v2 import sim_pb2 as pb
from serve.scoring import ScoredFrames, Scorer, WindowHistory

# (popped frames, levels asked for, return_logvar, the stream's OOD window history)
Request = tuple[dict[str, dict], tuple[str, ...], bool, WindowHistory]


class ResponseBuilder:
    """Builds responses for one model (shared by all streams; holds no per-stream state)."""

    def __init__(self, manifest: dict, levels: list[str]):
        self.scorer = Scorer(manifest)
        self.levels = list(levels)

    def responses(self, requests: list[Request]) -> tuple[list[bytes | None], dict[str, list[ScoredFrames]]]:
        """The serialised response of each stream of a batch (None where none of its levels has a
        new frame), and the scored frames per level. Each level is scored once over the frames of
        all streams."""
        messages: list[list[pb.LevelFrames]] = [[] for _ in requests]
        scored: dict[str, list[ScoredFrames]] = {}
        for level in self.levels:
            members = [(i, popped[level], return_logvar, history)
                       for i, (popped, levels, return_logvar, history) in enumerate(requests)
                       if level in levels and level in popped and len(popped[level]["index"])]
            if not members:
                continue
            first = members[0][1]
            scores = {k: np.concatenate([f[k] for _, f, _, _ in members]) if len(members) > 1 else first[k]
                      for k in ("kl", "maha") if k in first}
            sc = self.scorer.score(level, scores, [(h, len(f["index"])) for _, f, _, h in members])
            scored.setdefault(level, []).append(sc)
            end = 0
            for i, f, return_logvar, _ in members:
                start, end = end, end + len(f["index"])
                messages[i].append(codec.level_frames(
                    level, int(f["index"][0]), f["mu"], f["maha"], sc.score[start:end], sc.ood[start:end],
                    logvar=f.get("logvar") if return_logvar else None, kl=f.get("kl"),
                    p_value=None if sc.p_value is None else sc.p_value[start:end],
                    window_score=None if sc.window is None else sc.window[start:end]))
        return [pb.StreamEncodeResponse(frames=m).SerializeToString() if m else None for m in messages], scored

    def response(self, popped: dict[str, dict], levels: tuple[str, ...], return_logvar: bool,
                 history: WindowHistory) -> tuple[bytes | None, list[ScoredFrames]]:
        """One stream's serialised response (None if none of its levels has a new frame) and its scored frames."""
        (data,), scored = self.responses([(popped, levels, return_logvar, history)])
        return data, [sc for level in levels for sc in scored.get(level, [])]
