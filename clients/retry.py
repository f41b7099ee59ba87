"""Trying a stream again when the server went away: `--retry N` with exponential backoff.

A stream's state lives in the server that served it, so a stream cut by a server that died,
restarted or drained (UNAVAILABLE) cannot be resumed: the retry opens a new stream and sends the
audio again from its start (frame indices start at 0 again). Behind an HTTP/2 proxy such as nginx,
a stream whose server died after its first response is reset by the proxy instead, which gRPC
reports as INTERNAL with "RST_STREAM" in its details: that is retried too. Other codes are the
request's own fault or a limit, and are not retried.
"""
from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from clients.connection import describe_rpc_error

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
T = TypeVar("T")


def retryable(exc: grpc.RpcError) -> bool:
    """Whether the stream ended because its server went away (module docstring)."""
    code = exc.code() if hasattr(exc, "code") else None
    if code in RETRYABLE:
        return True
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    return code == grpc.StatusCode.INTERNAL and "RST_STREAM" in details


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 0  # new streams after the first one fails; 0: no retry
    first_delay_s: float = 0.5
    max_delay_s: float = 10.0
    multiplier: float = 2.0
    jitter: float = 0.2  # each delay is scaled by a random factor in [1 - jitter, 1 + jitter]

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `retry` (1, 2, ...)."""
        base = min(self.max_delay_s, self.first_delay_s * self.multiplier ** (retry - 1))
        return base * (1.0 + self.jitter * (2.0 * (rng or random).random() - 1.0))


def add_retry_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("retry")
    g.add_argument("--retry", type=int, default=0, metavar="N",
                   help="when the server ends a stream with UNAVAILABLE (it died, restarted or is draining; behind "
                        "a proxy: a reset stream), open a new stream up to N times and send the audio again from its "
                        "start (default %(default)s)")
    g.add_argument("--retry-backoff", type=float, default=RetryPolicy.first_delay_s, metavar="S",
                   help="seconds before the first retry; each next wait doubles, up to "
                        f"{RetryPolicy.max_delay_s:g} s (default %(default)s)")


def policy_from_args(args: argparse.Namespace) -> RetryPolicy:
    if args.retry < 0 or args.retry_backoff < 0:
        raise ValueError("--retry and --retry-backoff must not be negative")
    return RetryPolicy(retries=args.retry, first_delay_s=args.retry_backoff)


def with_retry(attempt: Callable[[], T], policy: RetryPolicy, say: Callable[[str], None], what: str = "the stream",
               sleep: Callable[[float], None] = time.sleep) -> T:
    """attempt(), tried again after a retryable grpc.RpcError as the policy allows; say() tells
    the user each time. The last error is raised when the retries are spent."""
    retry = 0
    while True:
        try:
            return attempt()
        except grpc.RpcError as exc:
            if not retryable(exc) or retry >= policy.retries:
                raise
            retry += 1
            wait = policy.delay(retry)
            say(f"{what} ended with {describe_rpc_error(exc)}; opening a new stream in {wait:.1f} s "
                f"(retry {retry} of {policy.retries}), sending the audio again from its start")
            sleep(wait)
