"""pyproject.toml: the console scripts resolve to the commands' main functions, and the base install
(server and clients) pulls in no training packages."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_console_scripts_resolve_to_callables():
    scripts = PROJECT["scripts"]
    assert set(scripts) == {"sim-train", "sim-export", "sim-serve", "sim-stream", "sim-mic", "sim-monitor"}
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name


def test_the_base_install_is_the_server_and_the_clients():
    base = names(PROJECT["dependencies"])
    extras = {extra: names(reqs) for extra, reqs in PROJECT["optional-dependencies"].items()}
    assert not base & {"torch", "onnx", "tensorboard", "matplotlib", "espeakng-loader", "sounddevice"}
    assert {"onnxruntime-gpu", "tqdm", "grpcio"} <= base and "onnxruntime" not in base
    assert extras["mic"] == {"sounddevice"} and "torch" in extras["train"]
    assert {"pytest", "ruff", "scikit-learn", "librosa"} <= extras["dev"]
