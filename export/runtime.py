"""Run an exported model directory with onnxruntime: batched streaming steps and a per-stream API.

Torch-free (numpy + onnxruntime): serve/ and clients/ import it. The one place that chooses
onnxruntime's execution providers (providers()).

ModelInfo(dir) reads what the manifest says (levels, widths, hops, state, calibration) without
loading any graph; StreamingModel adds the sessions.

Low level (batch = streams; state tensors as the graphs take them, batch axis first):
    model = StreamingModel("models/sim")
    state = model.initial_state(batch)
    outputs, state = model.step(audio (B, 160) float32, state)     # outputs keyed as the graph's
    outputs = model.flush(tail (B, 160), tail_len (B,) int64, state)
    model.stack_states([...batch-1 states...]) / model.split_state(batched)

Per stream (sherpa-onnx style):
    s = model.create_stream(); s.accept_waveform(samples); s.input_finished()
    model.decode_streams([s, ...])      # batched steps until no stream has a hop ready, then flushes
    s.pop_frames() -> {level: {"index", "mu", "logvar"?, "kl"?, "maha"}}
    encode_streaming(model, audio, chunk_sizes) -> {"m1": (n, C), ..., "kl_m1": (n,), ...}

On CUDA, batches are padded to a few sizes (1, 2, 4, 8, then multiples of 4) so the GPU sees a
few fixed shapes; on the CPU they run unpadded (see bucket()). The recurrent state of every open
stream lives in one row of a shared pool (one array per state tensor), so a batched step gathers
and scatters each tensor once instead of stacking and splitting per stream.
"""
from __future__ import annotations

import itertools
import os
import threading
import weakref
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnxruntime as ort

from export.manifest import load_manifest, step_precision

# A 69-byte ONNX model (one Identity node, opset 17) used to find out whether CUDA really works here:
# onnxruntime-gpu lists CUDAExecutionProvider even where the CUDA libraries are missing.
_PROBE_MODEL = (b'\x08\x08:;\n\x10\n\x01x\x12\x01y"\x08Identity\x12\x05probeZ\x0f\n\x01x\x12\n\n\x08\x08\x01\x12'
                b'\x04\n\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\x11')
_providers_cache: list[str] | None = None
_providers_lock = threading.Lock()
PROVIDER_ENV = "SIM_ORT_PROVIDER"  # "cpu" forces the CPU provider


def providers() -> list[str]:
    """Execution providers for every session: CUDA first when it actually loads here, else CPU only.

    Decided once per process. Set SIM_ORT_PROVIDER=cpu to force the CPU."""
    global _providers_cache
    with _providers_lock:
        if _providers_cache is None:
            chosen = ["CPUExecutionProvider"]
            forced_cpu = os.environ.get(PROVIDER_ENV, "").lower() == "cpu"
            if not forced_cpu and "CUDAExecutionProvider" in ort.get_available_providers():
                ort.set_default_logger_severity(4)  # a failed CUDA load logs an error; this probe expects it
                try:
                    probe = ort.InferenceSession(_PROBE_MODEL, providers=["CUDAExecutionProvider",
                                                                          "CPUExecutionProvider"])
                    if "CUDAExecutionProvider" in probe.get_providers():
                        chosen = ["CUDAExecutionProvider", "CPUExecutionProvider"]
                except Exception:  # any failure to start CUDA means: run on the CPU
                    pass
                finally:
                    ort.set_default_logger_severity(2)
            _providers_cache = chosen
        return list(_providers_cache)


def make_session(path: str | Path, intra_op_threads: int | None = None, spin: bool = True) -> ort.InferenceSession:
    """An onnxruntime session for one graph on providers().

    spin=False stops the intra-op threads from busy-waiting: less CPU burnt while idle, but on a
    small VM every parallel section then pays a thread wake-up (measured: worse tail latency for
    the server, docs/benchmarks.md), so spinning stays the default."""
    opts = ort.SessionOptions()
    if intra_op_threads:
        opts.intra_op_num_threads = intra_op_threads
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=providers())


def bucket(n: int) -> int:
    """Padded batch size on CUDA: the next power of two >= n up to 8, then the next multiple of 4,
    so the GPU sees a few fixed shapes. (On the CPU a step's cost grows linearly from one stream
    on, 0.37 ms per stream for the int8 step, and every size costs the same to start: batches run
    unpadded there.)"""
    n = int(n)
    return 1 << max(0, n - 1).bit_length() if n <= 8 else -(-n // 4) * 4


def _run(session: ort.InferenceSession, feeds: dict[str, np.ndarray], batch: int, pad: bool) -> dict[str, np.ndarray]:
    """Run with the batch padded to bucket(batch) rows of zeros if pad; results cut back to batch rows."""
    padded = bucket(batch) if pad else batch
    if padded != batch:
        feeds = {k: np.concatenate([v, np.zeros((padded - batch,) + v.shape[1:], v.dtype)]) for k, v in feeds.items()}
    names = [o.name for o in session.get_outputs()]
    results = session.run(names, feeds)
    return {n: r[:batch] for n, r in zip(names, results)}


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

    def scatter(self, streams: Sequence["Stream"], rows: np.ndarray, values: dict[str, np.ndarray]) -> None:
        """values[k][:len(streams)] -> the streams' rows, skipping streams closed meanwhile (their
        row may already belong to a new stream)."""
        n = len(streams)
        with self.lock:
            open_ = [i for i, s in enumerate(streams) if s._finalizer.alive]
            if len(open_) != n:
                rows, pick = rows[open_], np.asarray(open_, dtype=np.intp)
                values = {k: v[pick] for k, v in values.items()}
            else:
                values = {k: v[:n] for k, v in values.items()}
            for k, a in self.arrays.items():
                a[rows] = values[k]


class ModelInfo:
    """What an exported model directory's manifest says about its streaming: levels, widths, hops,
    state, calibration (no onnxruntime sessions)."""

    def __init__(self, model_dir: str | Path, verify: bool = True):
        self.manifest = load_manifest(model_dir, verify=verify)
        self.dir = Path(self.manifest["dir"])
        self.levels: list[str] = list(self.manifest["levels"])
        self.level_dims: dict[str, int] = dict(self.manifest["level_dims"])
        geometry = self.manifest["geometry"]
        self.hop: int = int(geometry["step_samples"])
        self.sample_rate: int = int(geometry["sample_rate"])
        self.level_hops: dict[str, int] = dict(geometry["level_hops"])
        self.state_spec: list[dict] = list(geometry["state"])
        self.state_names = [s["name"] for s in self.state_spec]
        self.variational: bool = bool(self.manifest.get("variational", self.manifest["method"] == "sim"))
        self.calibration: dict = self.manifest["calibration"]

    @property
    def step_precision(self) -> str:
        """"fp32", or "int8" for a step quantized by `export.onnx --int8`."""
        return step_precision(self.manifest)


class StreamingModel(ModelInfo):
    """The step and flush graphs of an exported model directory, and its manifest."""

    def __init__(self, model_dir: str | Path, verify: bool = True, intra_op_threads: int | None = None,
                 spin: bool = True):
        super().__init__(model_dir, verify)
        self._step = make_session(self.dir / "step.onnx", intra_op_threads, spin)
        self._flush = make_session(self.dir / "flush.onnx", intra_op_threads, spin)
        self._step_names = [o.name for o in self._step.get_outputs()]
        self._flush_names = [o.name for o in self._flush.get_outputs()]
        self._pool = _StatePool(self.state_spec)
        self.pad_batches = "CUDAExecutionProvider" in self._step.get_providers()  # see bucket()

    @property
    def active_providers(self) -> list[str]:
        """The execution providers the streaming sessions actually run on."""
        return list(self._step.get_providers())

    # -- batched, explicit state -------------------------------------------------------------
    def initial_state(self, batch: int) -> dict[str, np.ndarray]:
        return {s["name"]: np.zeros((batch, *s["shape"]), dtype=s["dtype"]) for s in self.state_spec}

    def _split(self, results: dict[str, np.ndarray]) -> tuple[dict, dict]:
        outputs = {k: v for k, v in results.items() if not k.startswith("next_")}
        state = {name: results[f"next_{name}"] for name in self.state_names}
        return outputs, state

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

    def step(self, audio: np.ndarray, state: dict[str, np.ndarray]) -> tuple[dict, dict]:
        """One hop per stream: audio (B, hop) float32. Returns (outputs, new state)."""
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 2 or audio.shape[1] != self.hop:
            raise ValueError(f"step takes audio of shape (streams, {self.hop}), got {audio.shape}")
        batch = audio.shape[0]
        feeds = {"audio": audio, **self._check_state(state, batch)}
        return self._split(_run(self._step, feeds, batch, self.pad_batches))

    def flush(self, tail: np.ndarray, tail_len: np.ndarray, state: dict[str, np.ndarray]) -> dict:
        """End of stream: tail (B, hop) float32 (samples past tail_len ignored), tail_len (B,) in [0, hop)."""
        tail = np.asarray(tail, dtype=np.float32)
        tail_len = np.asarray(tail_len, dtype=np.int64)
        if tail.ndim != 2 or tail.shape[1] != self.hop or tail_len.shape != (tail.shape[0],):
            raise ValueError(f"flush takes tail (streams, {self.hop}) and tail_len (streams,), "
                             f"got {tail.shape} and {tail_len.shape}")
        if np.any(tail_len < 0) or np.any(tail_len >= self.hop):
            raise ValueError(f"tail_len must be in [0, {self.hop - 1}]")
        batch = tail.shape[0]
        feeds = {"tail": tail, "tail_len": tail_len, **self._check_state(state, batch)}
        return self._split(_run(self._flush, feeds, batch, self.pad_batches))[0]

    def stack_states(self, states: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {name: np.concatenate([s[name] for s in states], axis=0) for name in self.state_names}

    def split_state(self, batched: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        n = next(iter(batched.values())).shape[0]
        return [{name: batched[name][i:i + 1] for name in self.state_names} for i in range(n)]

    # -- per stream ------------------------------------------------------------------------------
    def _empty_frames(self, level: str) -> dict[str, np.ndarray]:
        dim = self.level_dims[level]
        frames = {"index": np.zeros(0, np.int64), "mu": np.zeros((0, dim), np.float32),
                  "maha": np.zeros(0, np.float32)}
        if self.variational and level != "ar":
            frames.update(logvar=np.zeros((0, dim), np.float32), kl=np.zeros(0, np.float32))
        return frames

    def create_stream(self) -> "Stream":
        return Stream(self)

    def decode_streams(self, streams: Iterable["Stream"]) -> int:
        """Batched steps over every stream with a hop ready, repeated until none has one; then one
        batched flush over the streams whose input is finished. Returns the number of graph runs."""
        streams = list({id(s): s for s in streams}.values())
        if any(s.model is not self for s in streams):
            raise ValueError("a stream of another model was passed to decode_streams")
        streams = [s for s in streams if not s.flushed and s._finalizer.alive]  # complete or closed: nothing to do
        hop, runs = self.hop, 0
        while True:
            ready = [s for s in streams if s._buffered >= hop]
            if not ready:
                break
            rows, padded = self._rows(ready)
            audio = np.zeros((padded, hop), np.float32)
            for i, s in enumerate(ready):
                audio[i] = s._take(hop)
            results = dict(zip(self._step_names, self._step.run(self._step_names, {
                "audio": audio, **self._pool.gather(rows)})))
            self._pool.scatter(ready, rows[:len(ready)], {k: results[f"next_{k}"] for k in self.state_names})
            self._collect(ready, results)
            runs += 1
        ending = [s for s in streams if s.finished and s._buffered < hop]
        if ending:
            rows, padded = self._rows(ending)
            tails = np.zeros((padded, hop), np.float32)
            lens = np.zeros(padded, np.int64)
            for i, s in enumerate(ending):
                if s._buffered:
                    data = s._take(s._buffered)
                    tails[i, :data.size] = data
                    lens[i] = data.size
            results = dict(zip(self._flush_names, self._flush.run(self._flush_names, {
                "tail": tails, "tail_len": lens, **self._pool.gather(rows)})))
            self._collect(ending, results)
            for s in ending:
                s.flushed = True
                s.close()  # the state after a flush is terminal: its row goes back to the pool
            runs += 1
        return runs

    def _rows(self, streams: list["Stream"]) -> tuple[np.ndarray, int]:
        """The streams' pool rows, padded with the zero row 0 to the batch bucket on CUDA."""
        padded = bucket(len(streams)) if self.pad_batches else len(streams)
        rows = np.zeros(padded, np.intp)
        rows[:len(streams)] = [s._row for s in streams]
        return rows, padded

    def _collect(self, streams: list["Stream"], outputs: dict[str, np.ndarray]) -> None:
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
                with s._lock:
                    for level, frame in frames.items():
                        s._pending[level].append(frame)


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
    def state(self) -> dict[str, np.ndarray] | None:
        """A copy of the stream's recurrent state (batch of one); None once closed or flushed."""
        if not self._finalizer.alive:
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

    @property
    def has_frames(self) -> bool:
        """Whether pop_frames() would return at least one frame."""
        return any(self._pending.values())

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
                result[level] = self.model._empty_frames(level)
        return result

    def frames_emitted(self, level: str) -> int:
        return self._emitted[level]


def _chunk_iter(chunk_sizes: int | Sequence[int]):
    sizes = [chunk_sizes] if isinstance(chunk_sizes, (int, np.integer)) else list(chunk_sizes)
    if not sizes or any(int(c) <= 0 for c in sizes):
        raise ValueError(f"chunk sizes must be positive integers, got {chunk_sizes!r}")
    return itertools.cycle(int(c) for c in sizes)


def _as_encoding(model: StreamingModel, frames: dict[str, list[dict]]) -> dict[str, np.ndarray]:
    out = {}
    for level in model.levels:
        parts = frames[level]
        parts = parts or [model._empty_frames(level)]
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
    frames = [{level: [] for level in model.levels} for _ in audios]
    audios = [np.asarray(a, dtype=np.float32).reshape(-1) for a in audios]
    while not all(s.flushed for s in streams):
        for i, s in enumerate(streams):
            if s.finished:
                continue
            if pos[i] < audios[i].size:
                c = next(chunks[i])
                s.accept_waveform(audios[i][pos[i]:pos[i] + c])
                pos[i] += c
            if pos[i] >= audios[i].size:
                s.input_finished()
        model.decode_streams(streams)
        for i, s in enumerate(streams):
            if s.has_frames:
                for level, f in s.pop_frames().items():
                    if f["index"].size:
                        frames[i][level].append(f)
    return [_as_encoding(model, f) for f in frames]


def encode_streaming(model: StreamingModel, audio: np.ndarray, chunk_sizes: int | Sequence[int] = 160
                     ) -> dict[str, np.ndarray]:
    """One whole waveform through the streaming graphs in chunks (an int, or sizes used in a cycle).

    Keys as train.encode's: level -> (frames, C), kl_<level> (SIM conv levels), plus logvar_<level>
    and maha_<level>."""
    return encode_streams(model, [audio], [chunk_sizes])[0]
