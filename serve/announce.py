"""The lines `python -m serve` prints on stdout once it is ready, and their parser.

    listening on HOST:PORT (DETAIL)                 one server process
    listening on HOST:PORT (N workers; DETAIL)      the --workers supervisor
    metrics on http://HOST:PORT/metrics             with --metrics-port (per worker: "worker I metrics on ...")

Whatever starts a server and waits for it (the tests, bench/serve_capacity.py, the --workers
supervisor) reads them with parse(), so the format has this one definition.
"""
from __future__ import annotations

import re
from typing import NamedTuple

_LISTENING = re.compile(r"listening on \S+:(\d+) \((?:(\d+) workers; )?(.*)\)$")
_METRICS = re.compile(r"(?:worker \d+ )?metrics on http://\S+:(\d+)/metrics$")


class Ready(NamedTuple):
    kind: str  # "listening" or "metrics"
    port: int
    workers: int = 1  # server processes behind a listening line
    detail: str = ""  # a listening line's text in parentheses, without the worker count


def listening(host: str, port: int, detail: str) -> str:
    return f"listening on {host}:{port} ({detail})"


def metrics(host: str, port: int) -> str:
    return f"metrics on http://{host}:{port}/metrics"


def parse(line: str) -> Ready | None:
    """The ready line's fields, or None for any other line."""
    line = line.rstrip("\n")
    if m := _LISTENING.match(line):
        return Ready("listening", int(m.group(1)), int(m.group(2) or 1), m.group(3))
    if m := _METRICS.match(line):
        return Ready("metrics", int(m.group(1)))
    return None
