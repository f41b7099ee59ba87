"""The checked-in generated gRPC code is what protos/generate.py makes from the .proto files."""
from __future__ import annotations

import subprocess
from importlib.metadata import version

from support.serving import PY, ROOT


def test_regenerating_the_protos_gives_the_checked_in_files():
    proc = subprocess.run([PY, "protos/generate.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (f"generated code differs from grpcio-tools {version('grpcio-tools')}'s output "
                                  f"(run python protos/generate.py):\n{proc.stdout}{proc.stderr}")


def test_generated_code_is_the_sim_v1_api():
    from protos.sim.v1 import sim_pb2, sim_pb2_grpc

    service = sim_pb2.DESCRIPTOR.services_by_name["SimEncoder"]
    assert service.full_name == "sim.v1.SimEncoder"
    assert [m.name for m in service.methods] == ["StreamEncode", "Info", "Decode"]
    stream = service.methods_by_name["StreamEncode"]
    assert stream.client_streaming and stream.server_streaming
    assert hasattr(sim_pb2_grpc, "SimEncoderStub") and hasattr(sim_pb2_grpc, "add_SimEncoderServicer_to_server")


def test_server_and_clients_never_import_torch():
    modules = ["serve.cli", "serve.server", "serve.servicer", "serve.batcher", "serve.decoders", "clients.stream",
               "clients.mic", "clients.monitor"]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "assert not bad, bad\n"
            "assert 'sounddevice' not in sys.modules  # only clients.mic imports it, and only when recording\n")
    proc = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr

