"""Streams through an exported model's step and flush graphs, batched (numpy + onnxruntime).

    model = StreamingModel("models/sim")     # checks every file's sha256 against the manifest
    s = model.create_stream()
    s.accept_waveform(samples)               # float32 mono at model.sample_rate, any number
    model.decode_streams([s, ...])           # batched steps until no stream has a hop, then flushes
    s.pop_frames()                           # {level: {"index", "mu", "logvar"?, "kl"?, "maha"}}
    s.input_finished(); model.decode_streams([s])   # the last frames (right padding as offline)

The recurrent state of every open stream lives in one row of a pool held by the model (one array
per state tensor), so a batched step gathers and scatters each tensor once. On CUDA, batches are
padded with the pool's zero row to a few sizes (bucket()) so the GPU sees few shapes; on the CPU
they run unpadded, because there a step's cost grows linearly with the streams from one on.
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from serve.model_dir import ModelInfo
from serve.onnx_sessions import make_session


def bucket(n: int) -> int:
    """Padded batch size on CUDA: the next power of two >= n up to 8, then the next multiple of 4."""
    n = int(n)
    return 1 << max(0, n - 1).bit_length() if n <= 8 else -(-n // 4) * 4


class _StatePool:
    """The recurrent state of every open stream: row r of each array belongs to one stream.

    Row 0 is never handed out and stays zero: it pads batches up to their bucket (CUDA). A lock
    guards the arrays, because streams are opened and closed on other threads than the one stepping."""

    def __init__(self, spec: list[dict], capacity: int = 16):
        self.lock = threading.Lock()
        self.arrays = {s["name"]: np.zeros((capacity, *s["shape"]), dtype=s["dtype"]) for s in spec}
        self.free = list(range(capacity - 1, 0, -1))

    def acquire(self) -> int:
        with self.lock:
            if not self.free:
                capacity = next(iter(self.arrays.values())).shape[0]
                self.arrays = {k: np.concatenate([a, np.zeros_like(a)]) for k, a in self.arrays.items()}
                self.free = list(range(2 * capacity - 1, capacity - 1, -1))
            row = self.free.pop()
            for a in self.arrays.values():
                a[row] = 0
            return row

    def release(self, row: int) -> None:
        with self.lock:
            self.free.append(row)

    def gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        with self.lock:
            return {k: a.take(rows, axis=0) for k, a in self.arrays.items()}

    def scatter(self, streams: Sequence[Stream], rows: np.ndarray, values: dict[str, np.ndarray]) -> None:
        """values[k][:len(streams)] -> the streams' rows, skipping streams closed meanwhile (their
        row may already belong to a new stream)."""
        n = len(streams)
        with self.lock:
            open_ = [i for i, s in enumerate(streams) if s.is_open]
            if len(open_) != n:
                rows, pick = rows[open_], np.asarray(open_, dtype=np.intp)
                values = {k: v[pick] for k, v in values.items()}
            else:
                values = {k: v[:n] for k, v in values.items()}
            for k, a in self.arrays.items():
                a[rows] = values[k]


class StreamingModel(ModelInfo):
    """The step and flush graphs of an exported model directory, and its manifest (ModelInfo)."""

    def __init__(self, model_dir: str | Path, verify: bool = True, intra_op_threads: int | None = None,
                 spin: bool = True):
        super().__init__(model_dir, verify)
        self._step = make_session(self.dir / "step.onnx", intra_op_threads, spin)
        self._flush = make_session(self.dir / "flush.onnx", intra_op_threads, spin)
        self._pool = _StatePool(self.state_spec)
        self._empty: dict[str, dict[str, np.ndarray]] = {}  # empty_frames, per level
        self.pad_batches = "CUDAExecutionProvider" in self._step.get_providers()  # see bucket()

    @property
    def active_providers(self) -> list[str]:
        """The execution providers the streaming sessions actually run on."""
        return list(self._step.get_providers())

    def create_stream(self) -> Stream:
        return Stream(self)

    def empty_frames(self, level: str) -> dict[str, np.ndarray]:
        """pop_frames()'s arrays for a level without new frames: read-only, made once per level (a server
        asks for them for every idle stream on every batch)."""
        if level not in self._empty:
            dim = self.level_dims[level]
            frames = {"index": np.zeros(0, np.int64), "mu": np.zeros((0, dim), np.float32),
                      "maha": np.zeros(0, np.float32)}
            if level in self.logvar_levels:
                frames.update(logvar=np.zeros((0, dim), np.float32), kl=np.zeros(0, np.float32))
            for a in frames.values():
                a.flags.writeable = False
            self._empty[level] = frames
        return dict(self._empty[level])

    def decode_streams(self, streams: Iterable[Stream]) -> int:
        """Batched steps over every stream with a hop ready, repeated until none has one; then one
        batched flush over the streams whose input is finished. Returns the number of graph runs."""
        streams = list({id(s): s for s in streams}.values())
        if any(s.model is not self for s in streams):
            raise ValueError("a stream of another model was passed to decode_streams")
        streams = [s for s in streams if not s.flushed and s.is_open]  # complete or closed: nothing to do
        hop, runs = self.hop, 0
        while ready := [s for s in streams if s.buffered_samples >= hop]:
            audio = np.stack([s._take(hop) for s in ready])
            results = self._run(self._step, ready, {"audio": audio})
            self._pool.scatter(ready, self._rows(ready)[:len(ready)],
                               {k: results[f"next_{k}"] for k in self.state_names})
            self._collect(ready, results)
            runs += 1
        ending = [s for s in streams if s.finished and s.buffered_samples < hop]
        if ending:
            tails = np.zeros((len(ending), hop), np.float32)
            lens = np.zeros(len(ending), np.int64)
            for i, s in enumerate(ending):
                if s.buffered_samples:
                    data = s._take(s.buffered_samples)
                    tails[i, :data.size] = data
                    lens[i] = data.size
            self._collect(ending, self._run(self._flush, ending, {"tail": tails, "tail_len": lens}))
            for s in ending:
                s.flushed = True
                s.close()  # the state after a flush is terminal: its row goes back to the pool
            runs += 1
        return runs

    def _rows(self, streams: list[Stream]) -> np.ndarray:
        """The streams' pool rows, padded with the zero row 0 to the batch bucket on CUDA."""
        rows = np.zeros(bucket(len(streams)) if self.pad_batches else len(streams), np.intp)
        rows[:len(streams)] = [s._row for s in streams]
        return rows

    def _run(self, session, streams: list[Stream], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One graph run over the streams: their state rows gathered from the pool, the inputs
        padded with zero rows to the same batch (CUDA)."""
        rows = self._rows(streams)
        pad = rows.size - len(streams)
        if pad:
            inputs = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in inputs.items()}
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, {**inputs, **self._pool.gather(rows)})))

    def _collect(self, streams: list[Stream], outputs: dict[str, np.ndarray]) -> None:
        """Each stream's valid frames of one graph run into its pending frames (views where a row
        is entirely valid, which is every steady-state step)."""
        per_stream: list[dict[str, dict]] = [{} for _ in streams]
        for level in self.levels:
            valid = outputs[f"valid_{level}"]
            width = valid.shape[1]
            counts = valid[:len(streams)].sum(axis=1).tolist()
            arrays = [(key, outputs[f"{key}_{level}"]) for key in ("mu", "logvar", "kl", "maha")
                      if f"{key}_{level}" in outputs]
            for i, (s, n) in enumerate(zip(streams, counts)):
                if n == 0:
                    continue
                if n == width:
                    frame = {key: a[i] for key, a in arrays}
                else:
                    mask = valid[i]
                    frame = {key: a[i][mask] for key, a in arrays}
                start = s._emitted[level]
                frame["index"] = np.arange(start, start + n, dtype=np.int64)
                s._emitted[level] = start + n
                per_stream[i][level] = frame
        for s, frames in zip(streams, per_stream):
            if frames:
                s._add_frames(frames)


class Stream:
    """One audio stream: buffers samples into hops; frames come out through pop_frames().

    accept_waveform / input_finished / pop_frames may be called from another thread than the
    one running decode_streams (a lock guards the buffers); decode_streams itself must not run
    concurrently on the same stream."""

    def __init__(self, model: StreamingModel):
        self.model = model
        self._lock = threading.Lock()
        self._row = model._pool.acquire()
        # gives the state row back once: on close(), after the flush, or when the stream is collected
        self._finalizer = weakref.finalize(self, model._pool.release, self._row)
        self._chunks: list[np.ndarray] = []
        self._buffered = 0
        self.samples_received = 0
        self.finished = False  # no more input will come
        self.flushed = False  # the end has been decoded; the stream is complete
        self._emitted = {level: 0 for level in model.levels}
        self._pending: dict[str, list[dict]] = {level: [] for level in model.levels}

    def close(self) -> None:
        """Give the stream's state back to the model (idempotent). A closed stream cannot be decoded."""
        self._finalizer()

    @property
    def is_open(self) -> bool:
        """Whether the stream still holds its state (not closed, not flushed)."""
        return self._finalizer.alive

    @property
    def state(self) -> dict[str, np.ndarray] | None:
        """A copy of the stream's recurrent state (batch of one); None once closed or flushed."""
        if not self.is_open:
            return None
        return self.model._pool.gather(np.array([self._row], np.intp))

    def accept_waveform(self, samples: np.ndarray) -> None:
        """Append mono float32 samples at the model's sample rate (any number)."""
        if self.finished:
            raise RuntimeError("accept_waveform after input_finished")
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"samples must be 1-D (mono), got shape {samples.shape}")
        if samples.size:
            with self._lock:
                self._chunks.append(samples.copy())
                self._buffered += samples.size
                self.samples_received += samples.size

    def input_finished(self) -> None:
        self.finished = True

    @property
    def ready_hops(self) -> int:
        return self._buffered // self.model.hop

    @property
    def buffered_samples(self) -> int:
        return self._buffered

    def _take(self, n: int) -> np.ndarray:
        with self._lock:
            data = np.concatenate(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
            head, rest = data[:n], data[n:]
            self._chunks = [rest] if rest.size else []
            self._buffered = rest.size
        return head

    def _add_frames(self, frames: dict[str, dict]) -> None:
        with self._lock:
            for level, frame in frames.items():
                self._pending[level].append(frame)

    def pop_frames(self) -> dict[str, dict[str, np.ndarray]]:
        """Frames completed since the last call, per level (empty arrays where none)."""
        result = {}
        with self._lock:
            pending = {level: self._pending[level] for level in self.model.levels}
            self._pending = {level: [] for level in self.model.levels}
        for level, parts in pending.items():
            if len(parts) == 1:
                result[level] = parts[0]
            elif parts:
                result[level] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            else:
                result[level] = self.model.empty_frames(level)
        return result

    def frames_emitted(self, level: str) -> int:
        return self._emitted[level]
