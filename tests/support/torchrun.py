"""Helpers for the tests that start torchrun jobs (tests/test_distributed.py, tests/test_pipeline.py).

Every job runs with a timeout (TIMEOUT), one thread per process, and this checkout first on the path."""
from __future__ import annotations

import os

from support.serving import PY, ROOT

__all__ = ["ROOT", "TIMEOUT", "job_env", "torchrun"]
TIMEOUT = 240  # seconds for any one job; a hang fails the test instead of blocking CI


def job_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def torchrun(*args: str) -> list[str]:
    """The command line of `torchrun ARGS -m train.sim` (append train.sim's flags)."""
    return [PY, "-m", "torch.distributed.run", *args, "-m", "train.sim"]
