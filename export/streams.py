"""Running an exported directory's streaming graphs for the export's own checks (torch-free).

- encode_streams / encode_streaming: whole waveforms through the serving runtime
  (serve.runtime.StreamingModel), cut into chunks, several streams in shared batches; the result
  has train.encode's keys. Verification, int8 quantization and the tests compare it with the
  offline model.
- StepGraphs: step.onnx and flush.onnx called directly with an explicit state (batch = streams),
  for call-by-call checks and for the quantizer's calibration inputs.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from serve.model_dir import ModelInfo
from serve.onnx_sessions import make_session
from serve.runtime import StreamingModel

# chunk sizes streamed by the verification and the tests: around a hop, one sample, and large
CHUNK_PLANS = {"1": [1], "159": [159], "160": [160], "161": [161], "4000": [4000]}


def random_mix_plans(rng: np.random.Generator, n: int = 2) -> dict[str, list[int]]:
    """Random chunk sizes: mostly small (1..400), some around a hop, some large (up to 4000)."""
    plans = {}
    for i in range(n):
        sizes = np.concatenate([rng.integers(1, 400, 40), rng.choice([1, 159, 160, 161, 320, 4000], 20),
                                rng.integers(1, 4001, 8)])
        rng.shuffle(sizes)
        plans[f"mix{i}"] = [int(s) for s in sizes]
    return plans


def _chunk_iter(chunk_sizes: int | Sequence[int]):
    sizes = [chunk_sizes] if isinstance(chunk_sizes, (int, np.integer)) else list(chunk_sizes)
    if not sizes or any(int(c) <= 0 for c in sizes):
        raise ValueError(f"chunk sizes must be positive integers, got {chunk_sizes!r}")
    return itertools.cycle(int(c) for c in sizes)


def _as_encoding(levels: list[str], frames: dict[str, list[dict]]) -> dict[str, np.ndarray]:
    out = {}
    for level in levels:
        parts = frames[level]
        joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        idx = joined["index"]
        if not np.array_equal(idx, np.arange(idx.size)):
            raise AssertionError(f"level {level}: frame indices are not 0..{idx.size - 1}")
        out[level] = joined["mu"]
        for key in ("kl", "logvar", "maha"):
            if key in joined:
                out[f"{key}_{level}"] = joined[key]
    return out


def encode_streams(model: StreamingModel, audios: Sequence[np.ndarray],
                   chunk_sizes: Sequence[int | Sequence[int]]) -> list[dict[str, np.ndarray]]:
    """Stream several waveforms at once (batched), each cut into its own cycle of chunk sizes.

    Each round every unfinished stream accepts its next chunk, then one decode_streams call serves
    them all, so streams of different lengths step and flush in shared batches."""
    streams = [model.create_stream() for _ in audios]
    chunks = [_chunk_iter(c) for c in chunk_sizes]
    pos = [0] * len(audios)
    frames = [{level: [model.empty_frames(level)] for level in model.levels} for _ in audios]  # a part per level
    audios = [np.asarray(a, dtype=np.float32).reshape(-1) for a in audios]
    live = list(range(len(streams)))  # streams whose last frames have not been popped yet
    while live:
        for i in live:
            s = streams[i]
            if s.finished:
                continue
            if pos[i] < audios[i].size:
                c = next(chunks[i])
                s.accept_waveform(audios[i][pos[i]:pos[i] + c])
                pos[i] += c
            if pos[i] >= audios[i].size:
                s.input_finished()
        if not model.decode_streams([streams[i] for i in live]):
            continue  # no graph ran: no stream has new frames (a one-sample chunk runs one 160 times out of 161)
        for i in live:
            for level, f in streams[i].pop_frames().items():
                if f["index"].size:
                    frames[i][level].append(f)
        live = [i for i in live if not streams[i].flushed]
    return [_as_encoding(model.levels, f) for f in frames]


def encode_streaming(model: StreamingModel, audio: np.ndarray, chunk_sizes: int | Sequence[int] = 160
                     ) -> dict[str, np.ndarray]:
    """One whole waveform through the streaming graphs in chunks (an int, or sizes used in a cycle).

    Keys as train.encode's: level -> (frames, C), kl_<level> (levels with a log-variance), plus
    logvar_<level> and maha_<level>."""
    return encode_streams(model, [audio], [chunk_sizes])[0]


class StepGraphs:
    """step.onnx / flush.onnx with the state passed in and out (batch axis first, as the graphs take it)."""

    def __init__(self, model_dir: str | Path, verify: bool = False):
        self.info = ModelInfo(model_dir, verify)
        self.hop = self.info.hop
        self.state_spec = self.info.state_spec
        self.state_names = self.info.state_names
        self._step = make_session(self.info.dir / "step.onnx")
        self._flush = make_session(self.info.dir / "flush.onnx")

    def initial_state(self, batch: int) -> dict[str, np.ndarray]:
        return {s["name"]: np.zeros((batch, *s["shape"]), dtype=s["dtype"]) for s in self.state_spec}

    def _check_state(self, state: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        feeds = {}
        for s in self.state_spec:
            if s["name"] not in state:
                raise ValueError(f"state lacks {s['name']!r}")
            v = np.asarray(state[s["name"]], dtype=s["dtype"])
            if v.shape != (batch, *s["shape"]):
                raise ValueError(f"state {s['name']!r} has shape {v.shape}, expected {(batch, *s['shape'])}")
            feeds[s["name"]] = v
        return feeds

    def _run(self, session, feeds: dict[str, np.ndarray]) -> tuple[dict, dict]:
        names = [o.name for o in session.get_outputs()]
        results = dict(zip(names, session.run(names, feeds)))
        outputs = {k: v for k, v in results.items() if not k.startswith("next_")}
        return outputs, {name: results[f"next_{name}"] for name in self.state_names}

    def step(self, audio: np.ndarray, state: dict[str, np.ndarray]) -> tuple[dict, dict]:
        """One hop per stream: audio (B, hop) float32. Returns (outputs keyed as the graph's, new state)."""
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 2 or audio.shape[1] != self.hop:
            raise ValueError(f"step takes audio of shape (streams, {self.hop}), got {audio.shape}")
        return self._run(self._step, {"audio": audio, **self._check_state(state, audio.shape[0])})

    def flush(self, tail: np.ndarray, tail_len: np.ndarray, state: dict[str, np.ndarray]) -> dict:
        """End of stream: tail (B, hop) float32 (samples past tail_len ignored), tail_len (B,) in [0, hop)."""
        tail = np.asarray(tail, dtype=np.float32)
        tail_len = np.asarray(tail_len, dtype=np.int64)
        if tail.ndim != 2 or tail.shape[1] != self.hop or tail_len.shape != (tail.shape[0],):
            raise ValueError(f"flush takes tail (streams, {self.hop}) and tail_len (streams,), "
                             f"got {tail.shape} and {tail_len.shape}")
        if np.any(tail_len < 0) or np.any(tail_len >= self.hop):
            raise ValueError(f"tail_len must be in [0, {self.hop - 1}]")
        feeds = {"tail": tail, "tail_len": tail_len, **self._check_state(state, tail.shape[0])}
        return self._run(self._flush, feeds)[0]

    def stack_states(self, states: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {name: np.concatenate([s[name] for s in states], axis=0) for name in self.state_names}

    def split_state(self, batched: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        n = next(iter(batched.values())).shape[0]
        return [{name: batched[name][i:i + 1] for name in self.state_names} for i in range(n)]
