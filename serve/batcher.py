"""The batching loop on the event loop: collects what every stream received since the last tick, has
the engine (serve.engine) step all streams together, and queues each stream's response.

Pipelined: while the engine runs tick k+1, the event loop keeps receiving and sending, and builds
and queues the responses of tick k. Audio arriving during
a tick waits for the next one: under load the batches grow instead of the queue.
"""
from __future__ import annotations

import asyncio
import logging

import grpc

from serve.engine import EngineThread, TickReply, TickRequest
from serve.errors import StreamError
from serve.metrics import Metrics
from serve.session import END, StreamSession

log = logging.getLogger("serve.batcher")


class Batcher:
    def __init__(self, engine: EngineThread, metrics: Metrics, sample_rate: int, max_queued_responses: int = 256,
                 batch_wait_s: float = 0.0):
        self.engine = engine
        self.metrics = metrics
        self.sample_rate = sample_rate
        self.max_queued = max_queued_responses
        self.batch_wait_s = batch_wait_s  # after waking, wait this long for more streams to fill the batch
        self.sessions: dict[int, StreamSession] = {}
        self._opens: list[tuple] = []
        self._removed: list[int] = []
        self._more = False  # the engine still holds audio to step
        self._wake = asyncio.Event()
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
        await self.engine.stop()

    def add(self, session: StreamSession) -> None:
        self.sessions[session.id] = session
        self._opens.append((session.id, session.levels, session.return_logvar, session.encoding))

    def remove(self, session: StreamSession) -> None:
        session.dead = True
        if self.sessions.pop(session.id, None) is not None:
            self._removed.append(session.id)  # the engine frees its state on the next tick
            self.notify()

    def notify(self) -> None:
        self._wake.set()

    # --- the loop ----------------------------------------------------------------------------
    async def _run(self) -> None:
        previous: TickReply | None = None  # whose responses are not queued yet
        while True:
            req = self._gather()
            if not req and not self._more and previous is None:
                self._wake.clear()
                req = self._gather()
                if not req:
                    await self._wake.wait()
                    if self.batch_wait_s > 0:
                        await asyncio.sleep(self.batch_wait_s)
                    continue
            future = asyncio.ensure_future(self.engine.tick(req)) if req or self._more else None
            if previous is not None:
                self._deliver(previous)
                previous = None
            if future is None:
                continue
            try:
                previous = await future
                self._more = previous.more
            except Exception as exc:  # a server bug: fail the streams, keep serving
                log.exception("tick failed")
                self._fail_all(StreamError(grpc.StatusCode.INTERNAL, f"streaming step failed: {exc}"))
                self._more = False

    def _fail_all(self, err: StreamError) -> None:
        """End every stream with err and tell the engine to drop them."""
        for s in self.sessions.values():
            s.fail(err)
        self._removed = [*self._removed, *self.sessions]
        self._opens = []
        self.sessions.clear()

    def _gather(self) -> TickRequest:
        """What changed since the last tick: streams opened and gone, audio received, half-closes."""
        req = TickRequest(opens=self._opens, removed=self._removed)
        self._opens, self._removed = [], []
        for s in self.sessions.values():
            if s.dead or s.done:
                continue
            s.held = s.out.qsize() >= self.max_queued
            if s.held:  # a client that does not read its results waits; its backlog stops its reads
                req.held.append(s.id)
                continue
            if s.raw:
                req.audio[s.id] = s.raw[0] if len(s.raw) == 1 else b"".join(s.raw)
                s.raw = []
            if s.input_closed and not s.close_sent:
                req.closed.append(s.id)
                s.close_sent = True
        return req

    def _deliver(self, reply: TickReply) -> None:
        """Queue each stream's response for its writer; fail the streams the engine failed."""
        reply = self.engine.finish(reply)
        if reply.decoded:
            self.metrics.audio_seconds.inc(reply.decoded / self.sample_rate)
        if reply.batch:
            self.metrics.batch_size.observe(reply.batch)
            self.metrics.tick_duration.observe(reply.elapsed)
        for sid, code, message in reply.errors:
            s = self.sessions.pop(sid, None)
            if s is not None:
                s.fail(StreamError(code, message))
        for sid, resp, flushed, processed in reply.results:
            s = self.sessions.get(sid)
            if s is None or s.dead:
                continue
            s.processed = processed
            if s.backlog() <= s.max_backlog:
                s.room.set()
            if resp is not None:
                # the newest frames needed every sample up to the last processed hop (or the end)
                s.out.put_nowait((resp, s.received + 1 if flushed else processed))
            if flushed:
                s.done = True
                self.sessions.pop(sid, None)  # complete: the engine dropped it already
                s.out.put_nowait(END)
        self.metrics.count_frames(reply.scored)
