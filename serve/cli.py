"""Command line of the server: `python -m serve --model DIR [options]`."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from serve import announce
from serve.servicer import Limits


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m serve",
        description="Serve an exported SIM/GIM/CPC model over gRPC (sim.v2.SimEncoder): stream 16 kHz audio in, "
                    "get latent frames and calibrated OOD scores back. Prints 'listening on HOST:PORT' when ready. "
                    "SIGTERM drains: health turns NOT_SERVING, open streams get --drain-grace seconds to finish.",
)
    ap.add_argument("--model", required=True, help="exported model directory (python -m export.onnx ... --out DIR)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 or :: to serve other machines) (default %(default)s)")
    ap.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one (default %(default)s)")
    ap.add_argument("--metrics-port", type=int, default=None,
                    help="serve Prometheus metrics at http://HOST:PORT/metrics (0 picks a free port; off if unset)")
    ap.add_argument("--tls-cert", help="PEM certificate chain; with --tls-key serves TLS only")
    ap.add_argument("--tls-key", help="PEM private key of --tls-cert")
    ap.add_argument("--tls-client-ca", help="PEM CA certificate(s): with --tls-cert, every client must present a "
                                            "certificate signed by one of them (mutual TLS)")
    ap.add_argument("--token-file", help="file holding a bearer token; calls must send 'authorization: Bearer TOKEN' "
                                         "(the health service stays open)")
    d = Limits()
    from serve.server import ServerOptions

    o = ServerOptions(model_dir="")
    ap.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes,
                    help="largest request message; larger ones end the call with RESOURCE_EXHAUSTED (default %(default)s)")
    ap.add_argument("--max-streams", type=int, default=d.max_streams, help="concurrent streams; more get RESOURCE_EXHAUSTED (default %(default)s)")
    ap.add_argument("--max-stream-seconds", type=float, default=d.max_stream_seconds,
                    help="audio per stream; longer streams end with OUT_OF_RANGE (default %(default)s)")
    ap.add_argument("--max-streams-per-connection", type=int, default=d.max_streams_per_connection,
                    help="concurrent streams on one client connection; more get RESOURCE_EXHAUSTED (0: only "
                         "--max-streams) (default %(default)s)")
    ap.add_argument("--max-streams-per-peer", type=int, default=d.max_streams_per_peer,
                    help="concurrent streams from one client address over all its connections; more get "
                         "RESOURCE_EXHAUSTED (0: no limit; behind a load balancer every stream comes from the "
                         "balancer's address) (default %(default)s)")
    ap.add_argument("--max-metadata-bytes", type=int, default=d.max_metadata_bytes,
                    help="request metadata (headers) per call; larger is refused (default %(default)s)")
    ap.add_argument("--idle-timeout", type=float, default=d.idle_timeout_seconds,
                    help="seconds a stream may send nothing before it ends with OUT_OF_RANGE (0: no limit) (default %(default)s)")
    ap.add_argument("--unread-timeout", type=float, default=d.unread_timeout_seconds,
                    help="seconds a stream's responses may go unread (the client stopped reading) before the stream "
                         "ends with RESOURCE_EXHAUSTED (0: no limit) (default %(default)s)")
    ap.add_argument("--keepalive", type=float, default=o.keepalive_seconds,
                    help="seconds between HTTP/2 pings on every connection; a peer that vanished without closing "
                         "(no FIN or RST) is detected by an unanswered ping and its streams freed (0: no pings) "
                         "(default %(default)s)")
    ap.add_argument("--keepalive-timeout", type=float, default=o.keepalive_timeout_seconds,
                    help="seconds a ping may go unanswered before the connection is closed (default %(default)s)")
    ap.add_argument("--drain-grace", type=float, default=30.0, help="seconds open streams get to finish on SIGTERM (default %(default)s)")
    ap.add_argument("--threads", type=int, default=None,
                    help="onnxruntime intra-op threads (default: 1 for an int8 step, which then leaves the other "
                         "cores to gRPC; one per core for fp32)")
    ap.add_argument("--no-spin", dest="spin", action="store_false",
                    help="stop onnxruntime's threads from busy-waiting: saves about a core while idle, but costs "
                         "tail latency under load (default: spinning on)")
    ap.add_argument("--batch-wait-ms", type=float, default=0.0,
                    help="when audio arrives, wait this long for other streams before running a batch (default %(default)s)")
    ap.add_argument("--workers", type=int, default=1,
                    help="server processes sharing the port (SO_REUSEPORT; connections are spread over them, each "
                         "process has its own model, batches, limits and metrics on --metrics-port + i) (default %(default)s)")
    ap.add_argument("--reuse-port", action="store_true",
                    help="bind with SO_REUSEPORT so several servers can share the port (set for you by --workers)")
    ap.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return ap


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if bool(args.tls_cert) != bool(args.tls_key):
        return fail("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        return fail("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
    for flag in ("tls_cert", "tls_key", "tls_client_ca", "token_file"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            return fail(f"--{flag.replace('_', '-')} {path}: no such file")
    for flag, what in (("tls_cert", "CERTIFICATE"), ("tls_key", "PRIVATE KEY"), ("tls_client_ca", "CERTIFICATE")):
        path = getattr(args, flag)
        if path and what not in Path(path).read_text(errors="replace"):
            return fail(f"--{flag.replace('_', '-')} {path}: not a PEM {what.lower()}")
    for flag in ("max_message_bytes", "max_streams", "max_stream_seconds", "max_metadata_bytes"):
        if getattr(args, flag) <= 0:
            return fail(f"--{flag.replace('_', '-')} must be positive")
    for flag in ("max_streams_per_connection", "max_streams_per_peer"):
        if getattr(args, flag) < 0:
            return fail(f"--{flag.replace('_', '-')} must not be negative")
    if min(args.idle_timeout, args.unread_timeout, args.keepalive, args.drain_grace, args.batch_wait_ms) < 0:
        return fail("--idle-timeout, --unread-timeout, --keepalive, --drain-grace and --batch-wait-ms must not be "
                    "negative")
    if args.keepalive_timeout <= 0:
        return fail("--keepalive-timeout must be positive")
    if args.threads is not None and args.threads < 1:
        return fail("--threads must be at least 1")
    if args.workers < 1:
        return fail("--workers must be at least 1")
    if args.workers > 1:
        from serve.workers import supervise

        return supervise(list(sys.argv[1:] if argv is None else argv), args.workers, args.host, args.port,
                         args.metrics_port)

    from serve.auth import TokenError, read_token
    from serve.model_dir import ManifestError
    from serve.server import Server, ServerOptions

    try:
        token = read_token(args.token_file) if args.token_file else None
    except TokenError as exc:
        return fail(str(exc))
    opts = ServerOptions(
        model_dir=args.model, host=args.host, port=args.port, metrics_port=args.metrics_port,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca, token=token,
        drain_grace_seconds=args.drain_grace,
        keepalive_seconds=args.keepalive, keepalive_timeout_seconds=args.keepalive_timeout,
        threads=args.threads, spin=args.spin, reuse_port=args.reuse_port, batch_wait_s=args.batch_wait_ms / 1000.0,
        limits=Limits(max_message_bytes=args.max_message_bytes, max_streams=args.max_streams,
                      max_stream_seconds=args.max_stream_seconds, idle_timeout_seconds=args.idle_timeout,
                      unread_timeout_seconds=args.unread_timeout,
                      max_streams_per_connection=args.max_streams_per_connection,
                      max_streams_per_peer=args.max_streams_per_peer, max_metadata_bytes=args.max_metadata_bytes))
    try:
        server = Server(opts)
    except ManifestError as exc:
        return fail(str(exc))

    def ready(s: Server) -> None:
        m = s.model
        scheme = ("mutual TLS" if opts.tls_client_ca else "TLS") if opts.tls_cert else "plaintext"
        print(announce.listening(opts.host, s.port, f"{scheme}{', token' if token else ''}; model {m.dir.name}, "
                                 f"method {m.manifest['method']}, levels {' '.join(m.levels)}"), flush=True)
        if s.metrics_port is not None:
            print(announce.metrics(opts.host, s.metrics_port), flush=True)

    try:
        asyncio.run(server.run(ready))
    except OSError as exc:
        return fail(f"cannot start the server: {exc}")
    print("stopped", flush=True)
    return 0
