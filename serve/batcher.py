"""The batching worker: one loop that serves every stream with shared, batched streaming steps.

Each tick it hands the audio that arrived since the last tick to the runtime streams (usually
one hop per stream, see tick_hops; at most `max_hops_per_tick`, so one client sending a long file
at once cannot hold up the real-time streams), then runs `StreamingModel.decode_streams` over all
streams with work in one call on a worker thread. onnxruntime releases the GIL, so meanwhile the
event loop keeps receiving and sending, and builds the responses of the previous tick (a
two-stage pipeline). Audio arriving during a tick waits for the next one: under load the batches
grow instead of the queue. Every stream keeps its own state, so a stream's frames never depend
on which others share its batch (batch rows are independent in every graph).
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from serve.errors import StreamError
from serve.frames import FrameBuilder
from serve.metrics import Metrics
from serve.session import END, StreamSession

log = logging.getLogger("serve.batcher")
CATCH_UP_HOPS = 3  # a stream this many hops behind steps all of them (up to max_hops_per_tick) at once


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


class Batcher:
    def __init__(self, model, builder: FrameBuilder, metrics: Metrics, max_hops_per_tick: int = 8,
                 max_queued_responses: int = 256, batch_wait_s: float = 0.0):
        self.model = model
        self.batch_wait_s = batch_wait_s  # after waking, wait this long for more streams to fill the batch
        self.builder = builder
        self.metrics = metrics
        self.max_hops = max_hops_per_tick
        self.max_queued = max_queued_responses
        self.sessions: dict[int, StreamSession] = {}
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sim-step")
        self._task: asyncio.Task | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    def add(self, session: StreamSession) -> None:
        self.sessions[session.id] = session

    def remove(self, session: StreamSession) -> None:
        session.dead = True
        self.sessions.pop(session.id, None)
        session.stream.close()  # its state row goes back to the model's pool

    def notify(self) -> None:
        self._wake.set()

    # --- the loop ----------------------------------------------------------------------------
    async def _run(self) -> None:
        """Pipelined: while the worker thread runs tick k+1 (onnxruntime releases the GIL), this
        thread builds and queues the responses of tick k."""
        loop = asyncio.get_running_loop()
        previous = None  # (batch, tick result) whose responses are not built yet
        while True:
            batch = self._gather()
            if not batch and previous is None:
                self._wake.clear()
                batch = self._gather()
                if not batch:
                    await self._wake.wait()
                    if self.batch_wait_s > 0:
                        await asyncio.sleep(self.batch_wait_s)
                    continue
            future = loop.run_in_executor(self._executor, self._tick, batch) if batch else None
            if previous is not None:
                self._deliver(*previous)
                previous = None
            if future is None:
                continue
            try:
                previous = (batch, await future)
            except Exception as exc:  # a server bug: fail these streams, keep serving the rest
                log.exception("streaming step failed")
                for sess in batch:
                    sess.fail(StreamError(grpc.StatusCode.INTERNAL, f"streaming step failed: {exc}"))
                    self.remove(sess)

    def _gather(self) -> list[StreamSession]:
        """Feed pending audio into the runtime streams; the sessions that have work this tick."""
        candidates, decoded = [], 0
        for s in list(self.sessions.values()):
            if s.dead or s.done or s.out.qsize() >= self.max_queued:
                continue  # a client that does not read its results waits; its backlog stops its reads
            try:
                decoded += s.decode_raw()
            except StreamError as err:
                s.fail(err)
                continue
            candidates.append(s)
        if decoded:
            self.metrics.audio_seconds.inc(decoded / self.model.sample_rate)
        hop = self.model.hop
        available = [(s.stream.buffered_samples + sum(p.shape[0] for p in s.pending)) // hop for s in candidates]
        hops = tick_hops(available, self.max_hops)
        batch = []
        for s, ready in zip(candidates, available):
            take = min(ready if ready >= CATCH_UP_HOPS else hops, self.max_hops)
            room = take * hop - s.stream.buffered_samples
            while room > 0 and s.pending:
                audio = s.take_pending()
                if audio.shape[0] > room:
                    s.pending.insert(0, audio[room:])
                    audio = audio[:room]
                s.stream.accept_waveform(audio)
                room -= audio.shape[0]
            if s.input_closed and not s.pending and not s.finished_told:
                s.stream.input_finished()
                s.finished_told = True
            if s.stream.ready_hops > 0 or (s.finished_told and not s.stream.flushed):
                batch.append(s)
        return batch

    def _tick(self, batch: list[StreamSession]) -> tuple[float, list[tuple]]:
        """Worker thread: one decode_streams call over the batch; each stream's new frames, whether
        it is complete, and how many of its samples have been processed."""
        t0 = time.perf_counter()
        self.model.decode_streams([s.stream for s in batch])
        elapsed = time.perf_counter() - t0
        return elapsed, [(s.stream.pop_frames(), s.stream.flushed,
                          s.stream.samples_received - s.stream.buffered_samples) for s in batch]

    def _deliver(self, batch: list[StreamSession], tick: tuple) -> None:
        """Event loop: build the batch's responses (all streams at once) and queue each for its
        stream's writer."""
        elapsed, results = tick
        self.metrics.batch_size.observe(len(batch))
        self.metrics.tick_duration.observe(elapsed)
        live = [(s, r) for s, r in zip(batch, results) if not s.dead]
        responses, scored = self.builder.responses([(popped, s.levels, s.return_logvar)
                                                    for s, (popped, _, _) in live])
        for (s, (_, flushed, processed)), resp in zip(live, responses):
            s.processed = processed
            if s.backlog() <= s.max_backlog:
                s.room.set()
            if resp is not None:
                # the newest frames needed every sample up to the last processed hop (or the end)
                s.out.put_nowait((resp, s.received + 1 if flushed else processed))
            if flushed:
                s.done = True
                s.out.put_nowait(END)
        self.metrics.count_frames(scored)
