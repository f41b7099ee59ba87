"""Bearer-token authentication: a server interceptor that rejects calls without the right token.

Clients send the metadata `authorization: Bearer <token>`. The health service stays open so
that orchestrators can probe a server they hold no token for.
"""
from __future__ import annotations

import hmac
from pathlib import Path

import grpc
from grpc import aio

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


class TokenError(ValueError):
    pass


def read_token(path: str | Path) -> str:
    """The token in a file (surrounding whitespace stripped); TokenError if missing or empty."""
    path = Path(path)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise TokenError(f"{path}: cannot read token file ({exc.strerror})") from None
    if not token:
        raise TokenError(f"{path}: token file is empty")
    return token


def _rejecting(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with UNAUTHENTICATED."""

    async def reject(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kwargs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(reject, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(reject, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(reject, **kwargs)
    return grpc.unary_unary_rpc_method_handler(reject, **kwargs)


class TokenInterceptor(aio.ServerInterceptor):
    def __init__(self, token: str, on_reject=None):
        self._expected = f"Bearer {token}".encode()
        self._on_reject = on_reject

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        sent = dict(details.invocation_metadata or ()).get("authorization")
        if sent is not None and hmac.compare_digest(str(sent).encode(), self._expected):
            return handler
        if self._on_reject is not None:
            self._on_reject(details.method)
        why = "missing authorization metadata" if sent is None else "invalid token"
        return _rejecting(handler, f"{why}: send 'authorization: Bearer <token>'")
