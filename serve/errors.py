"""The one error type a stream can fail with: a gRPC status code and a message for the client."""
from __future__ import annotations

import grpc


class StreamError(Exception):
    """Ends one call with `code` and `message`; other calls are not affected."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"StreamError({self.code.name}, {self.message!r})"


def outcome_label(code: grpc.StatusCode | None) -> str:
    """Prometheus label value for how a stream ended: "ok", "cancelled" or the status code name."""
    if code is None or code == grpc.StatusCode.OK:
        return "ok"
    return code.name.lower()
