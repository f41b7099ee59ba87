"""Popped runtime frames -> StreamEncodeResponse, with each level's calibrated score, p-value and flag.

The runtime gives, per level, arrays for the frames that just completed:
{"index" (n,), "mu" (n, C), "logvar" (n, C) and "kl" (n,) for variational levels, "maha" (n,)}.
The manifest's calibration names, per level, which of kl / maha is the OOD score, the sorted
reference scores behind the p-value and the threshold at the chosen false-positive rate.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from export.manifest import p_value
from protos.sim.v1 import sim_pb2 as pb
from train.audio import SAMPLE_RATE


@dataclass(frozen=True)
class LevelCalibration:
    score: str  # "kl" | "maha"
    reference: np.ndarray  # sorted reference scores
    threshold: float
    fpr: float


def calibrations(manifest: dict) -> dict[str, LevelCalibration]:
    cal = manifest.get("calibration") or {}
    out = {}
    for level, c in (cal.get("levels") or {}).items():
        out[level] = LevelCalibration(score=c["score"], reference=np.asarray(c["reference"], dtype=np.float64),
                                      threshold=float(c["threshold"]), fpr=float(cal.get("fpr", float("nan"))))
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


class PackedFloats:
    """Sets a `repeated float` field from a float32 row in one step.

    Parsing the field's packed wire form (tag, byte length, little-endian floats) into the message
    with MergeFromString is a copy; extending the field from a Python list costs ~10x more, and
    for the 512-wide latents that was the server's largest Python cost per frame."""

    def __init__(self, field_number: int, width: int):
        self.header = _varint(field_number << 3 | 2) + _varint(4 * width)  # wire type 2: length-delimited
        self.width = width

    def set(self, message, row: np.ndarray) -> None:
        message.MergeFromString(self.header + row.tobytes())


MU_FIELD = pb.Frame.DESCRIPTOR.fields_by_name["mu"].number
LOGVAR_FIELD = pb.Frame.DESCRIPTOR.fields_by_name["logvar"].number


@dataclass
class ScoredFrames:
    """One level's frames of one response, scored."""

    level: str
    index: np.ndarray
    score: np.ndarray
    p_value: np.ndarray | None
    ood: np.ndarray


class FrameBuilder:
    """Builds responses for one model (shared by all streams; holds no per-stream state)."""

    def __init__(self, manifest: dict, level_hops: dict[str, int]):
        self.cal = calibrations(manifest)
        self.level_hops = dict(level_hops)
        self._packers: dict[tuple[int, int], PackedFloats] = {}

    def _packer(self, field: int, width: int) -> PackedFloats:
        key = (field, width)
        if key not in self._packers:
            self._packers[key] = PackedFloats(field, width)
        return self._packers[key]

    def score(self, level: str, frames: dict) -> ScoredFrames:
        cal = self.cal.get(level)
        kind = cal.score if cal is not None else ("kl" if "kl" in frames else "maha")
        score = np.asarray(frames[kind], dtype=np.float64)
        if cal is None:
            return ScoredFrames(level, frames["index"], score, None, np.zeros(score.shape, dtype=bool))
        return ScoredFrames(level, frames["index"], score, np.asarray(p_value(cal.reference, score)),
                            score > cal.threshold)

    def response(self, popped: dict[str, dict], levels: tuple[str, ...], return_logvar: bool
                 ) -> tuple[pb.StreamEncodeResponse | None, list[ScoredFrames]]:
        """The response for the requested levels (None if none of them has a new frame) and their scores."""
        resp = pb.StreamEncodeResponse()
        scored = []
        for level in levels:
            frames = popped.get(level)
            if frames is None or len(frames["index"]) == 0:
                continue
            sc = self.score(level, frames)
            scored.append(sc)
            mus = np.ascontiguousarray(frames["mu"], dtype="<f4")
            mu_packer = self._packer(MU_FIELD, mus.shape[1])
            logvars = (np.ascontiguousarray(frames["logvar"], dtype="<f4")
                       if return_logvar and "logvar" in frames else None)
            lv_packer = self._packer(LOGVAR_FIELD, logvars.shape[1]) if logvars is not None else None
            kls = frames["kl"].tolist() if "kl" in frames else None
            mahas = frames["maha"].tolist()
            scores, flags = sc.score.tolist(), sc.ood.tolist()
            p_values = sc.p_value.tolist() if sc.p_value is not None else None
            hop_s = self.level_hops[level] / SAMPLE_RATE
            for j, idx in enumerate(frames["index"].tolist()):
                f = resp.frames.add(level=level, index=idx, start_time=idx * hop_s, maha=mahas[j],
                                    ood_score=scores[j], ood=flags[j])
                mu_packer.set(f, mus[j])
                if lv_packer is not None:
                    lv_packer.set(f, logvars[j])
                if kls is not None:
                    f.kl = kls[j]
                if p_values is not None:
                    f.p_value = p_values[j]
        return (resp if len(resp.frames) else None), scored
