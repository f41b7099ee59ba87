"""Connecting to the service: the command-line options every client shares, channel and credentials."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import grpc

from protos.sim.v2 import sim_pb2_grpc as pb_grpc


class ClientError(RuntimeError):
    """A user-facing client failure (bad option, unreachable server); printed as `error: ...`."""


def add_connection_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("connection")
    g.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of the service (default %(default)s)")
    g.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's root certificates")
    g.add_argument("--tls-ca", metavar="PEM", help="connect with TLS, trusting this CA (or self-signed) certificate")
    g.add_argument("--tls-server-name", metavar="NAME", help="expected name in the server certificate, when it "
                                                              "differs from HOST")
    g.add_argument("--tls-client-cert", metavar="PEM", help="present this certificate (mutual TLS; with "
                                                             "--tls-client-key)")
    g.add_argument("--tls-client-key", metavar="PEM", help="private key of --tls-client-cert")
    g.add_argument("--token-file", metavar="FILE", help="file holding the bearer token the server asks for")
    g.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server to be reachable "
                                                               "(default %(default)s)")


@dataclass
class Connection:
    channel: grpc.Channel
    stub: pb_grpc.SimEncoderStub
    metadata: tuple[tuple[str, str], ...]

    def close(self) -> None:
        self.channel.close()


def connect(args: argparse.Namespace, wait: bool = True) -> Connection:
    """Open a channel from the parsed connection options; with wait, fail clearly if nobody answers."""
    metadata: tuple[tuple[str, str], ...] = ()
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ClientError(f"--token-file {args.token_file}: {exc.strerror}") from None
        if not token:
            raise ClientError(f"--token-file {args.token_file}: empty")
        metadata = (("authorization", f"Bearer {token}"),)
    options = [("grpc.max_receive_message_length", 64 << 20)]
    if args.tls_server_name:
        options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    client_cert, client_key = getattr(args, "tls_client_cert", None), getattr(args, "tls_client_key", None)
    if bool(client_cert) != bool(client_key):
        raise ClientError("--tls-client-cert and --tls-client-key go together")
    tls = bool(args.tls or args.tls_ca or client_cert)
    if tls:
        pem = {}
        for flag, path in (("--tls-ca", args.tls_ca), ("--tls-client-cert", client_cert),
                           ("--tls-client-key", client_key)):
            try:
                pem[flag] = Path(path).read_bytes() if path else None
            except OSError as exc:
                raise ClientError(f"{flag} {path}: {exc.strerror}") from None
        creds = grpc.ssl_channel_credentials(root_certificates=pem["--tls-ca"], private_key=pem["--tls-client-key"],
                                             certificate_chain=pem["--tls-client-cert"])
        channel = grpc.secure_channel(args.server, creds, options)
    else:
        channel = grpc.insecure_channel(args.server, options)
    if wait:
        try:
            grpc.channel_ready_future(channel).result(timeout=args.timeout)
        except grpc.FutureTimeoutError:
            channel.close()
            hint = ("is it running, and does it serve TLS?" if args.tls or args.tls_ca
                    else "is it running? a server started with --tls-cert needs --tls or --tls-ca here")
            raise ClientError(f"cannot reach the server at {args.server} within {args.timeout:g} s ({hint})") from None
    return Connection(channel, pb_grpc.SimEncoderStub(channel), metadata)


def describe_rpc_error(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{code.name if code else 'RPC error'}: {details}"
