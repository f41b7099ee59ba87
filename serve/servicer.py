"""The sim.v2.SimEncoder service: StreamEncode, Info and Decode."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass

import grpc
import numpy as np

from protos.sim.v2 import codec
from protos.sim.v2 import sim_pb2 as pb
from protos.sim.v2 import sim_pb2_grpc as pb_grpc
from serve.audio_codec import check_encoding, check_length
from serve.batcher import Batcher
from serve.decoders import DecoderBank
from serve.errors import StreamError, outcome_label
from serve.memory import release_free_memory
from serve.metrics import Metrics
from serve.onnx_sessions import providers
from serve.session import END, StreamSession

log = logging.getLogger("serve")

API_VERSION = pb.DESCRIPTOR.package  # "sim.v2"
# gRPC itself refuses messages over this many times Limits.max_message_bytes, before they are read
# into memory; the servicer refuses those between the two with RESOURCE_EXHAUSTED. (A call gRPC
# refuses reaches the servicer as cancelled, without the reason: it is counted as cancelled.)
CORE_LIMIT_FACTOR = 4
IDLE_TRIM_S = 2.0  # seconds without open streams before freed memory goes back to the system


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 4 << 20
    max_streams: int = 64
    max_stream_seconds: float = 3600.0
    idle_timeout_seconds: float = 10.0
    max_backlog_seconds: float = 10.0  # audio received but not yet processed before reads pause
    max_streams_per_connection: int = 0  # 0: only max_streams
    max_streams_per_peer: int = 0  # streams from one client address, all its connections together; 0: no limit
    max_metadata_bytes: int = 8192  # request metadata (headers) per call
    unread_timeout_seconds: float = 30.0  # a write the client leaves untaken this long ends the stream


def peer_host(peer: str) -> str:
    """The client address of a gRPC peer string ("ipv4:10.0.0.7:51234" -> "10.0.0.7",
    "ipv6:[::1]:51234" -> "::1"); other kinds (unix sockets) as they are."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sim-service")
    except PackageNotFoundError:
        return "unknown"


def _serialize_response(resp) -> bytes:
    """StreamEncode responses arrive already serialised (serve.responses); anything else is a message."""
    return resp if isinstance(resp, bytes) else resp.SerializeToString()


def add_servicer(servicer: SimEncoderServicer, server) -> None:
    """Register the service like the generated add_SimEncoderServicer_to_server, except that
    StreamEncode writes pre-serialised bytes."""
    handlers = {
        "StreamEncode": grpc.stream_stream_rpc_method_handler(
            servicer.StreamEncode, request_deserializer=pb.StreamEncodeRequest.FromString,
            response_serializer=_serialize_response),
        "Info": grpc.unary_unary_rpc_method_handler(
            servicer.Info, request_deserializer=pb.InfoRequest.FromString,
            response_serializer=pb.InfoResponse.SerializeToString),
        "Decode": grpc.unary_unary_rpc_method_handler(
            servicer.Decode, request_deserializer=pb.DecodeRequest.FromString,
            response_serializer=pb.DecodeResponse.SerializeToString),
    }
    name = pb.DESCRIPTOR.services_by_name["SimEncoder"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


class SimEncoderServicer(pb_grpc.SimEncoderServicer):
    def __init__(self, model, batcher: Batcher, decoders: DecoderBank, metrics: Metrics, limits: Limits):
        self.model = model
        self.batcher = batcher
        self.decoders = decoders
        self.metrics = metrics
        self.limits = limits
        self.draining = False
        self.active = 0
        self._sessions: set[StreamSession] = set()
        self._per_connection: Counter[str] = Counter()  # open streams by context.peer() ("ipv4:HOST:PORT")
        self._per_peer: Counter[str] = Counter()  # by client address (HOST)
        self._trim_handle: asyncio.TimerHandle | None = None

    # --- StreamEncode ------------------------------------------------------------------------
    async def StreamEncode(self, request_iterator, context):
        code: grpc.StatusCode | None = None
        session: StreamSession | None = None
        reader: asyncio.Task | None = None
        connection = context.peer() or "unknown"
        peer = peer_host(connection)
        self.active += 1
        self._per_connection[connection] += 1
        self._per_peer[peer] += 1
        self.metrics.active_streams.inc()
        finished = False

        def finish() -> None:
            """Free the stream's state and its slot, count its outcome (once)."""
            nonlocal finished
            if not finished:
                finished = True
                self._release(session, reader)
                self.active -= 1
                for counts, key in ((self._per_connection, connection), (self._per_peer, peer)):
                    counts[key] -= 1
                    if counts[key] <= 0:
                        del counts[key]
                self.metrics.active_streams.dec()
                self.metrics.streams.labels(outcome_label(code) if code is not None else "internal").inc()
                if self.active == 0:
                    self._trim_when_idle()

        try:
            if self.draining:
                raise StreamError(grpc.StatusCode.UNAVAILABLE, "server is draining (shutting down); retry "
                                                               "on another server")
            if self.active > self.limits.max_streams:
                raise StreamError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"too many streams: this server serves at most {self.limits.max_streams} at once")
            self._check_client_limits(connection, peer)
            ait = request_iterator.__aiter__()
            first = await self._next(ait, "config")
            if first is None:
                code = grpc.StatusCode.OK  # the client closed without sending anything: nothing to do
                return
            session = self._open(first)
            self._sessions.add(session)
            self.batcher.add(session)
            reader = asyncio.get_running_loop().create_task(self._read(ait, session))
            while True:
                item = await session.out.get()
                if item is END:
                    break
                if isinstance(item, StreamError):
                    raise item
                resp, needed = item
                # responses queued meanwhile go out in the same write (serialised responses concatenate
                # into one): under load a stream gets fewer, larger messages instead of falling behind
                after = None
                while not session.out.empty():
                    nxt = session.out.get_nowait()
                    if nxt is END or isinstance(nxt, StreamError):
                        after = nxt
                        break
                    resp += nxt[0]
                    needed = nxt[1]
                await self._write(context, resp, session)
                self._account(session, needed)
                if session.held:  # its responses are read again: step it again
                    self.batcher.notify()
                if after is END:
                    break
                if after is not None:
                    raise after
            code = grpc.StatusCode.OK
        except StreamError as err:
            code = err.code
            log.info("stream %s ended: %s %s", session.id if session else "-", err.code.name, err.message)
            finish()  # before the status, which a client that stopped reading delays
            await self._abort(context, err)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            finish()

    def _trim_when_idle(self, after_s: float = IDLE_TRIM_S) -> None:
        """Once no stream has been open for after_s, give the freed heap back to the system (so RSS
        returns to its level before a burst of streams)."""
        if self._trim_handle is not None:
            self._trim_handle.cancel()

        def trim() -> None:
            self._trim_handle = None
            if self.active == 0:
                release_free_memory()

        self._trim_handle = asyncio.get_running_loop().call_later(after_s, trim)

    def _release(self, session: StreamSession | None, reader: asyncio.Task | None) -> None:
        """Free a stream's state: its reader, its queued responses, its audio and recurrent state
        in the engine (idempotent)."""
        if reader is not None:
            reader.cancel()
        if session is not None:
            self.batcher.remove(session)
            self._sessions.discard(session)
            while not session.out.empty():
                session.out.get_nowait()

    @staticmethod
    async def _abort(context, err: StreamError) -> None:
        """End the call with err's status. The status goes out after any write still pending: to a
        client that stopped reading, once it reads again or disconnects."""
        try:
            await context.abort(err.code, err.message)
        except grpc.aio.AbortError:
            raise
        except Exception:  # grpc's batch failed: the client is gone, nobody is left to tell
            log.debug("stream ended by %s; the client was gone", err.code.name)

    def _check_client_limits(self, connection: str, peer: str) -> None:
        lim = self.limits
        if lim.max_streams_per_connection and self._per_connection[connection] > lim.max_streams_per_connection:
            raise StreamError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"too many streams on this connection: at most {lim.max_streams_per_connection} at once")
        if lim.max_streams_per_peer and self._per_peer[peer] > lim.max_streams_per_peer:
            raise StreamError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"too many streams from {peer}: at most {lim.max_streams_per_peer} at once")

    async def _next(self, ait, expecting: str):
        """The next request, None at half-close; OUT_OF_RANGE when the client stays silent too long."""
        idle = self.limits.idle_timeout_seconds
        try:
            return await asyncio.wait_for(ait.__anext__(), timeout=idle if idle > 0 else None)
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            raise StreamError(grpc.StatusCode.OUT_OF_RANGE,
                              f"idle too long: no {expecting} message for {idle:g} s") from None

    def _open(self, request) -> StreamSession:
        self._check_size(request)
        kind = request.WhichOneof("request")
        if kind != "config":
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT,
                              "the first message must carry the config; got audio before config"
                              if kind == "audio" else "the first message must carry the config; got an empty message")
        cfg = request.config
        if cfg.sample_rate != self.model.sample_rate:
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"config.sample_rate is {cfg.sample_rate}; the model takes {self.model.sample_rate} Hz "
                              "mono audio (resample on the client)")
        check_encoding(cfg.encoding)
        levels = tuple(cfg.levels) or tuple(self.model.levels)
        unknown = [lv for lv in levels if lv not in self.model.levels]
        if unknown:
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"config.levels has {', '.join(map(repr, unknown))}; this model has "
                              f"{', '.join(self.model.levels)}")
        if len(set(levels)) != len(levels):
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, "config.levels names a level twice")
        levels = tuple(lv for lv in self.model.levels if lv in levels)  # model order
        sr = self.model.sample_rate
        return StreamSession(levels, cfg.return_logvar, cfg.encoding, sr,
                             max_samples=int(self.limits.max_stream_seconds * sr),
                             max_backlog=int(self.limits.max_backlog_seconds * sr))

    def _watch_idle(self, session: StreamSession) -> None:
        """End the stream with OUT_OF_RANGE once the client has sent nothing for the idle limit.

        One timer per idle period instead of a timeout per message; time the server itself
        pauses reading (backpressure) does not count."""
        idle = self.limits.idle_timeout_seconds
        if idle <= 0:
            return
        loop = asyncio.get_running_loop()

        def check() -> None:
            if session.dead or session.input_closed:
                return
            quiet = loop.time() - session.last_message
            if not session.room.is_set():
                session.last_message = loop.time()
            elif quiet >= idle:
                session.fail(StreamError(grpc.StatusCode.OUT_OF_RANGE,
                                         f"idle too long: no audio message for {idle:g} s"))
                return
            loop.call_later(max(0.01, idle - quiet), check)

        session.last_message = loop.time()
        loop.call_later(idle, check)

    async def _read(self, ait, session: StreamSession) -> None:
        """Reader task: audio messages into the session until half-close or an error."""
        loop = asyncio.get_running_loop()
        self._watch_idle(session)
        try:
            while True:
                try:
                    req = await ait.__anext__()
                except StopAsyncIteration:
                    session.close_input()
                    self.batcher.notify()
                    return
                session.last_message = loop.time()
                self._check_size(req)
                kind = req.WhichOneof("request")
                if kind == "config":
                    raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, "config sent twice: only the first "
                                                                        "message may carry the config")
                if kind != "audio":
                    raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, "empty message: set config or audio")
                data = req.audio
                session.add_audio(data, check_length(data, session.encoding))
                self.batcher.notify()
                if not session.room.is_set():
                    await session.room.wait()
        except StreamError as err:
            session.fail(err)
        except asyncio.CancelledError:
            raise
        except (grpc.RpcError, grpc.aio.AbortError):
            pass  # the call itself failed or was ended (client gone, message too large, aborted): the handler knows
        except Exception as exc:  # a bug: end this stream only
            log.exception("stream %s: reader failed", session.id)
            session.fail(StreamError(grpc.StatusCode.INTERNAL, f"server error reading the stream: {exc}"))

    def _check_size(self, request) -> None:
        size = request.ByteSize()
        if size > self.limits.max_message_bytes:
            raise StreamError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"Received message larger than max ({size} vs. {self.limits.max_message_bytes}): "
                              "send smaller audio messages (Info.limits.max_message_bytes)")

    async def _write(self, context, data: bytes, session: StreamSession) -> None:
        """Send one (possibly merged) response. A client that stops reading fills its flow-control
        window, and the write then waits; after the unread limit the stream ends with RESOURCE_EXHAUSTED,
        so a stalled reader holds its memory for a bounded time only."""
        limit = self.limits.unread_timeout_seconds
        try:
            if limit <= 0:
                await context.write(data)
                return
            await asyncio.wait_for(context.write(data), limit)
        except grpc.aio.AbortError:
            raise
        except asyncio.TimeoutError:
            raise StreamError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"the client has not read its responses for {limit:g} s ({session.out.qsize()} more "
                              "queued); read them as they come, or open a new stream") from None
        except Exception as exc:  # grpc's batch failed: the call ended under us (the client went away)
            log.debug("stream %s: write failed (%s); the client is gone", session.id, exc)
            raise asyncio.CancelledError() from None

    def _account(self, session: StreamSession, needed: int) -> None:
        """Frame latency of a write: from the arrival of the newest sample its frames needed.
        (Frame counts and score histograms are kept per tick by the batcher.)"""
        t = session.arrival_time(needed)
        if t is not None:
            self.metrics.frame_latency.observe(max(0.0, time.monotonic() - t))

    # --- draining ------------------------------------------------------------------------------
    def abort_all(self, message: str) -> None:
        for s in list(self._sessions):
            s.fail(StreamError(grpc.StatusCode.UNAVAILABLE, message))

    # --- Info --------------------------------------------------------------------------------
    async def Info(self, request, context):
        return self.info()

    def info(self) -> pb.InfoResponse:
        import onnxruntime

        m = self.model
        man = m.manifest
        cal = man.get("calibration") or {}
        geo = man["geometry"]
        resp = pb.InfoResponse(model=str(m.dir.name), method=str(man["method"]), sample_rate=m.sample_rate,
                               hop=int(geo["hop"]), receptive_field=int(geo["receptive_field"]),
                               lookahead=int(geo["lookahead"]), providers=providers())
        for level in m.levels:
            li = resp.levels.add(name=level, dim=int(m.level_dims[level]), hop_samples=int(m.level_hops[level]),
                                 has_logvar=level in m.logvar_levels,
                                 has_decoder=self.decoders.available(level))
            c = (cal.get("levels") or {}).get(level)
            if c:
                li.calibration.CopyFrom(pb.Calibration(score=c["score"], threshold=float(c["threshold"]),
                                                       n_ref=int(c.get("n_ref", len(c.get("reference", [])))),
                                                       fpr=float(cal.get("fpr", 0.0)),
                                                       window_frames=int(c.get("window_frames", 1))))
        resp.versions.update({"server": package_version(), "api": API_VERSION, "onnxruntime": onnxruntime.__version__,
                              "grpc": grpc.__version__, "numpy": np.__version__,
                              "model_format": str(man.get("format", "")),
                              "model_code_version": str(man.get("code_version", "unknown")),
                              "checkpoint_sha256": str(man.get("checkpoint_sha256", "")),
                              "step_precision": m.step_precision,
                              # an int8 step's scores differ from fp32's; its thresholds are its own
                              "calibration_measured_with": str(cal.get("measured_with", "fp32 step"))})
        lim = self.limits
        resp.limits.CopyFrom(pb.Limits(max_message_bytes=lim.max_message_bytes, max_streams=lim.max_streams,
                                       max_stream_seconds=lim.max_stream_seconds,
                                       idle_timeout_seconds=lim.idle_timeout_seconds))
        return resp

    # --- Decode ------------------------------------------------------------------------------
    async def Decode(self, request, context):
        try:
            self._check_size(request)
            audio = await asyncio.get_running_loop().run_in_executor(
                None, self.decoders.decode, request.level, request.num_frames, request.latents)
        except StreamError as err:
            self.metrics.decode_requests.labels(outcome_label(err.code)).inc()
            await context.abort(err.code, err.message)
        self.metrics.decode_requests.labels("ok").inc()
        return pb.DecodeResponse(sample_rate=self.model.sample_rate, audio=codec.pack(audio))
