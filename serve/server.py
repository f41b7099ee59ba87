"""Assemble and run the gRPC server: service, health, reflection, auth, metrics, draining."""
from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from protos.sim.v2 import sim_pb2 as pb
from serve.auth import TokenInterceptor
from serve.batcher import Batcher
from serve.decoders import DecoderBank
from serve.engine import EngineThread
from serve.metrics import Metrics
from serve.servicer import CORE_LIMIT_FACTOR, Limits, SimEncoderServicer, add_servicer

log = logging.getLogger("serve")

CLIENT_PING_MIN_S = 10.0  # clients' keepalive pings may come this often; faster ones count as abuse
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SimEncoder"].full_name  # "sim.v2.SimEncoder"


@dataclass
class ServerOptions:
    model_dir: str
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port
    metrics_port: int | None = None  # None: no metrics endpoint; 0: any free port
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # PEM CA bundle: clients must present a certificate it signed (mutual TLS)
    token: str | None = None
    limits: Limits = field(default_factory=Limits)
    drain_grace_seconds: float = 30.0
    keepalive_seconds: float = 30.0  # HTTP/2 ping on every connection this often (0: none)
    keepalive_timeout_seconds: float = 10.0  # a ping unanswered this long closes the connection and its streams
    threads: int | None = None  # onnxruntime intra-op threads (None: auto_threads())
    reuse_port: bool = False  # SO_REUSEPORT: other processes may serve the same port (serve.workers)
    spin: bool = True  # onnxruntime's threads busy-wait between steps (lower tail latency; a core when idle)
    max_hops_per_tick: int = 8
    batch_wait_s: float = 0.0


class Server:
    """One model served on one port. start() / wait() / drain(); or run() for all three."""

    def __init__(self, opts: ServerOptions):
        from serve.runtime import StreamingModel

        self.opts = opts
        self.threads = opts.threads if opts.threads is not None else auto_threads(opts.model_dir)
        self.model = StreamingModel(opts.model_dir, verify=True, intra_op_threads=self.threads, spin=opts.spin)
        self.engine = EngineThread(self.model, opts.max_hops_per_tick)
        log.info("streaming step: %s, onnxruntime intra-op threads: %s", self.model.step_precision,
                 self.threads or "one per core")
        self.metrics = Metrics()
        self.decoders = DecoderBank(self.model)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._metrics_http = None
        self._server: aio.Server | None = None
        self._stopped: asyncio.Event | None = None

    async def start(self) -> None:
        opts = self.opts
        self._stopped = asyncio.Event()
        self.batcher = Batcher(self.engine, self.metrics, self.model.sample_rate, batch_wait_s=opts.batch_wait_s)
        self.servicer = SimEncoderServicer(self.model, self.batcher, self.decoders, self.metrics, opts.limits)
        interceptors = [TokenInterceptor(opts.token, self._count_reject)] if opts.token else []
        limit = int(opts.limits.max_message_bytes)
        self._server = aio.server(interceptors=interceptors, options=[
            # the servicer refuses messages over the limit itself (so the stream is counted as
            # resource_exhausted); gRPC refuses those far over it before they are read into memory
            ("grpc.max_receive_message_length", limit * CORE_LIMIT_FACTOR),
            ("grpc.max_send_message_length", max(limit, 64 << 20)),
            ("grpc.so_reuseport", 1 if opts.reuse_port else 0),
            # both grpc limits: above the soft one calls are refused at random, above the absolute one always
            ("grpc.max_metadata_size", int(opts.limits.max_metadata_bytes)),
            ("grpc.absolute_max_metadata_size", int(opts.limits.max_metadata_bytes)),
            *keepalive_options(opts.keepalive_seconds, opts.keepalive_timeout_seconds),
        ])
        add_servicer(self.servicer, self._server)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server)
        address = f"{_bracket(opts.host)}:{opts.port}"
        try:
            if opts.tls_cert or opts.tls_key:
                client_ca = Path(opts.tls_client_ca).read_bytes() if opts.tls_client_ca else None
                creds = grpc.ssl_server_credentials([(Path(opts.tls_key).read_bytes(),
                                                      Path(opts.tls_cert).read_bytes())],
                                                    root_certificates=client_ca,
                                                    require_client_auth=client_ca is not None)
                self.port = self._server.add_secure_port(address, creds)
            else:
                self.port = self._server.add_insecure_port(address)
        except RuntimeError:  # grpc's "Failed to bind"
            self.port = 0
        if not self.port:
            raise OSError(f"cannot bind {address} (in use, or not an address of this machine)")
        if opts.metrics_port is not None:
            self._metrics_http, self.metrics_port = self.metrics.serve(opts.metrics_port, opts.host)
        self.batcher.start()
        await self._server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def _count_reject(self, method: str) -> None:
        if method.endswith("/StreamEncode"):  # rejected before the handler runs: count the outcome here
            self.metrics.streams.labels("unauthenticated").inc()

    def request_stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()

    async def drain(self) -> None:
        """Health NOT_SERVING, refuse new streams, let open ones finish within the grace period,
        end the rest with UNAVAILABLE, stop."""
        grace = self.opts.drain_grace_seconds
        await self.health.enter_graceful_shutdown()
        self.servicer.draining = True
        log.info("draining: %d open streams, grace %g s", self.servicer.active, grace)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.servicer.active > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.servicer.active > 0:
            self.servicer.abort_all(f"server shut down; the stream did not end within the {grace:g} s drain period")
            await asyncio.sleep(0.2)
        await self._server.stop(1.0)
        await self.batcher.stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()

    async def run(self, ready=None) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        if ready is not None:
            ready(self)
        await self.wait()
        await self.drain()


def keepalive_options(every_s: float, timeout_s: float) -> list[tuple[str, int]]:
    """gRPC server options for keepalive pings: a peer that vanished without closing its connection
    (power loss, a dropped network path: no FIN, no RST) is detected within every_s + timeout_s and
    its streams end (CANCELLED) and free their state. Clients may ping every CLIENT_PING_MIN_S."""
    opts = [("grpc.http2.min_recv_ping_interval_without_data_ms", int(CLIENT_PING_MIN_S * 1000)),
            ("grpc.http2.max_ping_strikes", 2)]
    if every_s > 0:
        opts += [("grpc.keepalive_time_ms", int(every_s * 1000)),
                 ("grpc.keepalive_timeout_ms", int(timeout_s * 1000)),
                 ("grpc.http2.ping_timeout_ms", int(timeout_s * 1000)),
                 ("grpc.keepalive_permit_without_calls", 1),  # idle connections too
                 ("grpc.http2.max_pings_without_data", 0),  # keep pinging a connection that sends nothing
                 ("grpc.http2.min_sent_ping_interval_without_data_ms", int(every_s * 1000))]
    return opts


def auto_threads(model_dir: str) -> int | None:
    """onnxruntime intra-op threads when none are asked for: one for an int8 step (it keeps up on
    one thread, which leaves the other cores to gRPC and the event loop), onnxruntime's default (one
    per core) for an fp32 step, which needs them. The measurements behind it: docs/benchmarks.md."""
    from serve.model_dir import ManifestError, load_manifest, step_precision

    try:
        manifest = load_manifest(model_dir, verify=False)
    except ManifestError:
        return None  # StreamingModel reports it
    return 1 if step_precision(manifest) == "int8" else None


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
