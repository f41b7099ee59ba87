"""The model side of serving: every stream's audio buffer and recurrent state, the batched steps and
the response bytes, one tick at a time, on a worker thread of the server process.

The gRPC side (serve.batcher, on the event loop) sends a TickRequest (streams opened, raw audio
bytes received, half-closes, streams gone) and gets a TickReply (each stepped stream's response,
whether it is complete, how far it has been processed, and stream errors). onnxruntime releases the
GIL while a graph runs; the rest of a tick shares the GIL with the event loop, and a tick's
responses are built on the event loop while the worker already runs the next tick.

Each tick hands every stream its newly received audio, up to the hops `tick_hops` allows, and runs
`StreamingModel.decode_streams` once over all streams with work. Every stream keeps its own state,
so its frames never depend on which others share its batch.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from grpc import StatusCode

from serve.audio_codec import decode_audio
from serve.errors import StreamError
from serve.responses import ResponseBuilder
from serve.scoring import ScoredFrames, WindowHistory

log = logging.getLogger("serve.engine")
CATCH_UP_HOPS = 3  # a stream this many hops behind steps all of them (up to max_hops) at once


def tick_hops(available: list[int], max_hops: int) -> int:
    """Hops each stream steps in a tick, given the hops each has ready: the most k that at least
    half of the streams with a hop ready have, at most max_hops. (Streams CATCH_UP_HOPS or more
    behind step all theirs, up to max_hops.)

    Every graph run has a fixed cost on top of its per-stream cost, so a second run for the one or
    two real-time streams whose next message came early costs more than stepping that hop with
    everyone in the next tick; a file streamed faster than real time, alone or with others like
    it, still steps many hops per tick."""
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
    unbuilt: list | None = None  # serve.responses.Request per result while its response is not built


class _Stream:
    __slots__ = ("runtime", "levels", "return_logvar", "encoding", "decoded", "pending", "input_closed",
                 "finished_told", "history")

    def __init__(self, runtime, levels: tuple[str, ...], return_logvar: bool, encoding: int):
        self.runtime = runtime
        self.levels, self.return_logvar, self.encoding = levels, return_logvar, encoding
        self.decoded = 0  # samples decoded so far
        self.pending: list[np.ndarray] = []  # decoded samples not handed to the runtime stream yet
        self.input_closed = False
        self.finished_told = False  # runtime stream told input_finished()
        self.history = WindowHistory()  # the last OOD scores, for the window of its next frames

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
        # a stream closed without a single sample ends with no frames (a flush would return frames
        # made of padding alone)
        empty = [(sid, st) for sid, st in self.streams.items()
                 if st.input_closed and st.decoded == 0 and not st.finished_told and sid not in held]
        for sid, _ in empty:
            self._drop(sid)
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
        results = [(sid, None, True, 0) for sid, _ in empty]
        unbuilt = [({}, st.levels, st.return_logvar, st.history) for _, st in empty]
        for sid, st in batch:
            rt = st.runtime
            results.append((sid, None, rt.flushed, rt.samples_received - rt.buffered_samples))
            unbuilt.append((rt.pop_frames(), st.levels, st.return_logvar, st.history))
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


class EngineThread:
    """An Engine on one worker thread of this process. A tick's responses are built by finish() on
    the event loop, while the worker already runs the next tick."""

    def __init__(self, model, max_hops_per_tick: int = 8):
        self.engine = Engine(model, max_hops_per_tick)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sim-step")

    async def tick(self, req: TickRequest) -> TickReply:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.engine.tick, req, False)

    def finish(self, reply: TickReply) -> TickReply:
        return self.engine.build(reply)

    async def stop(self) -> None:
        self._executor.shutdown(wait=True)
