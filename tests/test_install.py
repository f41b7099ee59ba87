"""The README's server-and-clients install (`pip install -e .`, no torch) runs every command it claims.

A fresh virtual environment WITHOUT the system's or this venv's packages, so a dependency missing
from pyproject.toml fails here as it would for a user; pip installs from whatever index pip is
configured with (on the development machines and in CI: the local package folders). It takes a
minute or two (onnxruntime is a large wheel), the longest test of the suite; marked `install`
(`-m "not install"` leaves it out of a quick local run; CI runs it).
"""
from __future__ import annotations

import subprocess
import sys
import venv

import pytest

from support.serving import ROOT

# every module the README documents for the server-and-clients install
COMMANDS = ("serve", "clients.stream", "clients.monitor", "clients.mic")


@pytest.mark.install
def test_server_and_client_install_runs_every_documented_command(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    py = env_dir / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-compile", "-e", str(ROOT)],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    for module in COMMANDS:
        proc = subprocess.run([str(py), "-m", module, "--help"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0 and "usage:" in proc.stdout, f"python -m {module} --help:\n{proc.stderr[-2000:]}"
    # the layering promise: the server and the clients import without torch, which this install lacks
    check = subprocess.run([str(py), "-c", "import importlib.util, sys; import clients.stream, clients.monitor, "
                            "serve.server; sys.exit(importlib.util.find_spec('torch') is not None)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr[-2000:] or "torch is installed by the server-and-clients install"
