"""The server-side state of one StreamEncode call.

Audio messages arrive on the event loop and wait, as received, in `raw`; each tick the batcher
sends them to the engine (serve.engine) as one bytes object per stream, which decodes them once
(one conversion per stream instead of one per 10 ms message) and keeps the stream's audio and
state. Results go to `out`, which the call's writer drains.
"""
from __future__ import annotations

import asyncio
import bisect
import itertools
import time

from grpc import StatusCode

from serve.errors import StreamError

END = object()  # queued after the last response of a stream that finished normally
_ids = itertools.count(1)


class StreamSession:
    def __init__(self, levels: tuple[str, ...], return_logvar: bool, encoding: int, sample_rate: int,
                 max_samples: int, max_backlog: int):
        self.id = next(_ids)
        self.encoding = encoding  # sim.v2.AudioEncoding of the audio messages
        self.levels = levels
        self.sample_rate = sample_rate
        self.return_logvar = return_logvar
        self.max_samples = max_samples
        self.max_backlog = max_backlog  # samples received but not yet processed before reading pauses
        self.raw: list[bytes] = []  # audio messages not sent to the engine yet
        self.received = 0  # samples received
        self.processed = 0  # samples the engine has stepped through
        self.input_closed = False  # client half-closed
        self.close_sent = False  # the engine knows of the half-close
        self.held = False  # not stepped: too many responses wait for the client to read them
        self.done = False  # all frames produced
        self.dead = False  # call over (error, cancel, disconnect): the worker drops it
        self.out: asyncio.Queue = asyncio.Queue()
        self.room = asyncio.Event()  # set while the backlog allows reading more audio
        self.room.set()
        # (samples received so far, arrival time) per audio message, for the frame latency metric
        self._counts: list[int] = []
        self._times: list[float] = []
        self.close_time: float | None = None
        self.last_message = 0.0  # event-loop time of the last message (idle limit)

    # --- event-loop side -------------------------------------------------------------------
    def add_audio(self, data: bytes, n: int, now: float | None = None) -> None:
        """One audio message: its bytes in the stream's encoding, holding n samples."""
        if n == 0:
            return
        if self.received + n > self.max_samples:
            raise StreamError(StatusCode.OUT_OF_RANGE,
                              f"stream exceeds the limit of {self.max_samples} samples "
                              f"({self.max_samples / self.sample_rate:g} s); start a new stream")
        self.raw.append(data)
        self.received += n
        self._counts.append(self.received)
        self._times.append(time.monotonic() if now is None else now)
        if self.backlog() > self.max_backlog:
            self.room.clear()

    def close_input(self, now: float | None = None) -> None:
        self.input_closed = True
        self.close_time = time.monotonic() if now is None else now

    def backlog(self) -> int:
        return self.received - self.processed

    def fail(self, error: StreamError) -> None:
        if not self.dead:
            self.dead = True
            self.out.put_nowait(error)

    def arrival_time(self, needed: int) -> float | None:
        """When the message that brought the stream to `needed` samples arrived (the half-close
        time if the frame needed the end of the stream); forgets older messages."""
        if needed > self.received:
            return self.close_time
        i = bisect.bisect_left(self._counts, needed)
        t = self._times[i] if i < len(self._times) else None
        if i > 0:  # earlier messages are never needed again: frames complete in order
            del self._counts[:i], self._times[:i]
        return t
