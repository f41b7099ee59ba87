"""The model side of serving: every stream's audio buffer and recurrent state, the batched steps and
the response bytes, one tick at a time.

The gRPC side (serve.batcher, on the event loop) sends a TickRequest (streams opened, raw audio
bytes received, half-closes, streams gone) and gets a TickReply (each stepped stream's serialised
response, whether it is complete, how far it has been processed, and stream errors). Nothing in
between is shared, so the engine can run

- on a worker thread of the server process (ThreadEngine, the default): onnxruntime releases the
  GIL while a graph runs; the rest of a tick shares the GIL with the event loop; or
- in a child process (ProcessEngine, `--engine process`): the model's Python work (state gather
  and scatter, frame collection, scoring, response bytes) has its own GIL, and a crash of the
  model's process ends only its streams (with INTERNAL) before a new one starts. On the 2-core
  development VM it holds the same number of streams for about 15 % more server CPU
  (docs/benchmarks.md, 2026-12-01).

Each tick hands every stream its newly received audio, up to the hops `tick_hops` allows, and runs
`StreamingModel.decode_streams` once over all streams with work. Every stream keeps its own state,
so its frames never depend on which others share its batch.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import signal
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from grpc import StatusCode

from serve.audio_codec import decode_audio
from serve.errors import StreamError
from serve.responses import ResponseBuilder
from serve.scoring import ScoredFrames

log = logging.getLogger("serve.engine")
CATCH_UP_HOPS = 3  # a stream this many hops behind steps all of them (up to max_hops) at once


def tick_hops(available: list[int], max_hops: int) -> int:
    """Hops each stream steps in a tick, given the hops each has ready: the most k that at least
    half of the streams with a hop ready have, at most max_hops. (Streams CATCH_UP_HOPS or more
    behind step all theirs, up to max_hops.)

    A graph run costs ~0.6-0.75 ms on top of ~0.35 ms per stream (int8 step, one thread, this VM),
    so a second run for the one or two real-time streams whose next message came early costs more
    than stepping that hop with everyone in the next tick; a file streamed faster than real time,
    alone or with others like it, still steps many hops per tick."""
    ready = sorted((a for a in available if a > 0), reverse=True)
    return max(1, min(ready[(len(ready) - 1) // 2], max_hops)) if ready else 1


@dataclass
class TickRequest:
    opens: list[tuple[int, tuple[str, ...], bool, int]] = field(default_factory=list)  # id, levels, logvar, encoding
    audio: dict[int, bytes] = field(default_factory=dict)  # raw message bytes since the last tick, per stream
    closed: list[int] = field(default_factory=list)  # streams whose client half-closed
    removed: list[int] = field(default_factory=list)  # streams gone (ended, failed, cancelled)
    held: list[int] = field(default_factory=list)  # streams not to step this tick (their client reads slowly)

    def __bool__(self) -> bool:
        return bool(self.opens or self.audio or self.closed or self.removed)


@dataclass
class TickReply:
    results: list[tuple[int, bytes | None, bool, int]]  # id, response, complete, samples processed
    errors: list[tuple[int, StatusCode, str]]  # streams that failed (and are dropped)
    batch: int  # streams stepped
    elapsed: float  # seconds in decode_streams
    decoded: int  # samples decoded from this tick's audio
    scored: dict[str, list[ScoredFrames]]  # for the frame metrics
    more: bool  # a stream still has audio to step: tick again even if nothing new arrives
    unbuilt: list | None = None  # (frames, levels, return_logvar) per result while its response is not built


class _Stream:
    __slots__ = ("runtime", "levels", "return_logvar", "encoding", "decoded", "pending", "input_closed",
                 "finished_told")

    def __init__(self, runtime, levels: tuple[str, ...], return_logvar: bool, encoding: int):
        self.runtime = runtime
        self.levels, self.return_logvar, self.encoding = levels, return_logvar, encoding
        self.decoded = 0  # samples decoded so far
        self.pending: list[np.ndarray] = []  # decoded samples not handed to the runtime stream yet
        self.input_closed = False
        self.finished_told = False  # runtime stream told input_finished()

    def ready_samples(self) -> int:
        """Samples received and not stepped yet."""
        return self.runtime.buffered_samples + sum(p.shape[0] for p in self.pending)


class Engine:
    """Runs ticks for one StreamingModel (single-threaded: one tick at a time)."""

    def __init__(self, model, max_hops_per_tick: int = 8):
        self.model = model
        self.builder = ResponseBuilder(model.manifest, model.levels)
        self.max_hops = max_hops_per_tick
        self.streams: dict[int, _Stream] = {}

    def _drop(self, sid: int) -> None:
        st = self.streams.pop(sid, None)
        if st is not None:
            st.runtime.close()  # its state row goes back to the model's pool

    def tick(self, req: TickRequest, build: bool = True) -> TickReply:
        """One tick. build=False leaves the responses to build(reply), e.g. on another thread while
        the next tick runs."""
        errors: list[tuple[int, StatusCode, str]] = []
        for sid, levels, return_logvar, encoding in req.opens:
            self.streams[sid] = _Stream(self.model.create_stream(), tuple(levels), return_logvar, encoding)
        for sid in req.removed:
            self._drop(sid)
        decoded = 0
        for sid, data in req.audio.items():
            st = self.streams.get(sid)
            if st is None:
                continue
            try:
                samples = decode_audio(data, st.encoding, first_sample=st.decoded)
            except StreamError as err:
                errors.append((sid, err.code, err.message))
                self._drop(sid)
                continue
            st.decoded += samples.shape[0]
            decoded += samples.shape[0]
            if samples.shape[0]:
                st.pending.append(samples)
        for sid in req.closed:
            if sid in self.streams:
                self.streams[sid].input_closed = True

        held = set(req.held)
        batch = self._feed([(sid, st) for sid, st in self.streams.items() if sid not in held])
        t0 = time.perf_counter()
        try:
            self.model.decode_streams([st.runtime for _, st in batch])
        except Exception as exc:  # a server bug: fail these streams, keep serving the rest
            log.exception("streaming step failed")
            for sid, _ in batch:
                errors.append((sid, StatusCode.INTERNAL, f"streaming step failed: {exc}"))
                self._drop(sid)
            batch = []
        elapsed = time.perf_counter() - t0
        results, unbuilt = [], []
        for sid, st in batch:
            rt = st.runtime
            results.append((sid, None, rt.flushed, rt.samples_received - rt.buffered_samples))
            unbuilt.append((rt.pop_frames(), st.levels, st.return_logvar))
            if rt.flushed:
                del self.streams[sid]  # the flush gave its state row back already
        hop = self.model.hop
        more = any(st.ready_samples() >= hop or (st.input_closed and not st.runtime.flushed)
                   for sid, st in self.streams.items() if sid not in held)
        reply = TickReply(results, errors, len(batch), elapsed, decoded, {}, more, unbuilt)
        return self.build(reply) if build else reply

    def build(self, reply: TickReply) -> TickReply:
        """Fill in the response bytes (all streams' frames scored and encoded at once)."""
        if reply.unbuilt is not None:
            responses, reply.scored = self.builder.responses(reply.unbuilt)
            reply.results = [(sid, resp, done, processed)
                             for (sid, _, done, processed), resp in zip(reply.results, responses)]
            reply.unbuilt = None
        return reply

    def _feed(self, candidates: list[tuple[int, _Stream]]) -> list[tuple[int, _Stream]]:
        """Hand pending audio to the runtime streams, as many hops as tick_hops allows; the streams
        with work this tick."""
        hop = self.model.hop
        available = [st.ready_samples() // hop for _, st in candidates]
        hops = tick_hops(available, self.max_hops)
        batch = []
        for (sid, st), ready in zip(candidates, available):
            take = min(ready if ready >= CATCH_UP_HOPS else hops, self.max_hops)
            room = take * hop - st.runtime.buffered_samples
            while room > 0 and st.pending:
                audio = st.pending.pop(0)
                if audio.shape[0] > room:
                    st.pending.insert(0, audio[room:])
                    audio = audio[:room]
                st.runtime.accept_waveform(audio)
                room -= audio.shape[0]
            if st.input_closed and not st.pending and not st.finished_told:
                st.runtime.input_finished()
                st.finished_told = True
            if st.runtime.ready_hops > 0 or (st.finished_told and not st.runtime.flushed):
                batch.append((sid, st))
        return batch


# --- where the engine runs -----------------------------------------------------------------------
class ThreadEngine:
    """The engine on one worker thread of this process (onnxruntime releases the GIL while a graph
    runs; the rest of a tick shares the GIL with the event loop). A tick's responses are built by
    finish() on the event loop, while the worker already runs the next tick."""

    kind = "thread"

    def __init__(self, model, max_hops_per_tick: int = 8):
        self.engine = Engine(model, max_hops_per_tick)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sim-step")

    async def tick(self, req: TickRequest) -> TickReply:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.engine.tick, req, False)

    def finish(self, reply: TickReply) -> TickReply:
        return self.engine.build(reply)

    async def stop(self) -> None:
        self._executor.shutdown(wait=True)


class EngineDied(RuntimeError):
    """The engine process ended unexpectedly: every stream's state is gone."""


def _engine_process(conn, model_dir: str, threads: int | None, spin: bool, max_hops: int) -> None:
    """Child process: load the model, then answer TickRequests until told to stop (None) or the
    server process goes away (EOF)."""
    # Ctrl-C in a terminal, or a service manager's SIGTERM to the whole group: the server drains its
    # streams first and then stops this process; it ends by itself if the server process dies (EOF)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        from serve.runtime import StreamingModel

        engine = Engine(StreamingModel(model_dir, verify=False, intra_op_threads=threads, spin=spin), max_hops)
    except Exception as exc:
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", engine.model.step_precision))
    while True:
        try:
            req = conn.recv()
        except (EOFError, OSError):
            return
        if req is None:
            return
        try:
            reply = engine.tick(req)
        except Exception:  # a bug outside the step (the step's own failures are stream errors)
            reply = traceback.format_exc()
        conn.send(reply)


class ProcessEngine:
    """The engine in a child process, one tick in flight at a time over a pipe. The event loop
    waits for a reply with add_reader, so it keeps serving gRPC meanwhile."""

    kind = "process"

    def __init__(self, model_dir: str, threads: int | None = None, spin: bool = True, max_hops_per_tick: int = 8,
                 start_timeout_s: float = 120.0):
        self._args = (str(model_dir), threads, spin, max_hops_per_tick)
        self._timeout = start_timeout_s
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs gRPC threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_engine_process, args=(child, *self._args), name="sim-engine", daemon=True)
        self._proc.start()
        child.close()
        if not self._conn.poll(self._timeout):
            self._proc.kill()
            raise RuntimeError(f"the engine process did not start within {self._timeout:g} s")
        try:
            status, detail = self._conn.recv()
        except EOFError:
            status, detail = "failed", f"exit code {self._proc.exitcode}"
        if status != "ready":
            self._proc.join(5)
            raise RuntimeError(f"the engine process failed to load the model: {detail}")

    def finish(self, reply: TickReply) -> TickReply:
        return reply  # built in the engine process

    @property
    def pid(self) -> int:
        return self._proc.pid

    async def tick(self, req: TickRequest) -> TickReply:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        fd = self._conn.fileno()

        def readable() -> None:
            loop.remove_reader(fd)
            if future.done():
                return
            try:
                reply = self._conn.recv()  # a whole message: the child is writing the rest right now
            except Exception as exc:  # EOF: it died; anything else: the pipe is out of step, end it
                self._proc.kill()
                self._proc.join(5)
                future.set_exception(EngineDied(f"the engine process ended (exit code {self._proc.exitcode}): "
                                                f"{type(exc).__name__} {exc}"))
                return
            if isinstance(reply, str):
                future.set_exception(RuntimeError(f"engine tick failed:\n{reply}"))
            else:
                future.set_result(reply)

        try:
            self._conn.send(req)
        except (BrokenPipeError, OSError) as exc:
            raise EngineDied(f"the engine process ended (exit code {self._proc.exitcode}): {exc}") from None
        loop.add_reader(fd, readable)
        try:
            return await future
        finally:
            loop.remove_reader(fd)

    async def restart(self) -> None:
        """A fresh engine process after the old one died (its streams are lost)."""
        self._proc.join(0)
        self._conn.close()
        await asyncio.get_running_loop().run_in_executor(None, self._start)

    async def stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._stop)

    def _stop(self) -> None:
        """Tell the child to end and read until it has (a reply to a tick cancelled mid-flight may
        still be on its way: the child could not read the stop while blocked writing it)."""
        try:
            self._conn.send(None)
            while self._conn.poll(10):
                self._conn.recv()
        except (EOFError, OSError):
            pass
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._conn.close()
