"""The checked-in generated gRPC code is what protos/generate.py makes from the .proto files; the
wire format's packed arrays (protos/sim/v2/codec.py)."""
from __future__ import annotations

import subprocess
from importlib.metadata import version

import numpy as np
import pytest

from support.serving import PY, ROOT


def test_regenerating_the_protos_gives_the_checked_in_files():
    proc = subprocess.run([PY, "protos/generate.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (f"generated code differs from grpcio-tools {version('grpcio-tools')}'s output "
                                  f"(run python protos/generate.py):\n{proc.stdout}{proc.stderr}")


def test_generated_code_is_the_sim_v2_api():
    from protos.sim.v2 import sim_pb2, sim_pb2_grpc

    service = sim_pb2.DESCRIPTOR.services_by_name["SimEncoder"]
    assert service.full_name == "sim.v2.SimEncoder"
    assert [m.name for m in service.methods] == ["StreamEncode", "Info", "Decode"]
    stream = service.methods_by_name["StreamEncode"]
    assert stream.client_streaming and stream.server_streaming
    assert hasattr(sim_pb2_grpc, "SimEncoderStub") and hasattr(sim_pb2_grpc, "add_SimEncoderServicer_to_server")


def test_audio_samples_round_trip_in_both_encodings():
    from protos.sim.v2 import codec
    from protos.sim.v2 import sim_pb2 as pb

    x = np.array([0.0, 0.5, -0.25, 1.0, -1.0, 2.0, 1e-5], np.float32)
    data = codec.encode_samples(x, pb.LINEAR16)
    assert data == np.array([0, 16384, -8192, 32767, -32768, 32767, 0], "<i2").tobytes()  # rounded and clipped
    np.testing.assert_array_equal(codec.decode_samples(data, pb.LINEAR16),
                                  np.array([0, 16384, -8192, 32767, -32768, 32767, 0], np.float32) / 32768)
    assert codec.encode_samples(x, pb.FLOAT32) == x.astype("<f4").tobytes()
    np.testing.assert_array_equal(codec.decode_samples(codec.encode_samples(x, pb.FLOAT32), pb.FLOAT32), x)


def test_level_frames_pack_and_unpack_row_major():
    from protos.sim.v2 import codec

    rng = np.random.default_rng(0)
    mu, maha, score = rng.standard_normal((5, 3)), rng.gamma(2.0, 1.0, 5), rng.gamma(2.0, 1.0, 5)
    ood = np.array([0, 1, 0, 0, 1], bool)
    msg = codec.level_frames("m2", 40, mu, maha, score, ood, kl=score)
    assert (msg.first_index, msg.count, msg.dim) == (40, 5, 3) and msg.mu[:4] == np.float32(mu[0, 0]).tobytes()
    assert msg.ood == b"\x00\x01\x00\x00\x01" and msg.logvar == b"" and msg.p_value == b""
    f = codec.frames_of(msg)
    np.testing.assert_array_equal(f.mu, mu.astype(np.float32))
    np.testing.assert_array_equal(f.ood, ood)
    assert f.index.tolist() == [40, 41, 42, 43, 44] and f.logvar is None and f.p_value is None
    np.testing.assert_array_equal(f.kl, score.astype(np.float32))
    msg.count = 4  # the arrays no longer fit the shape the message states
    with pytest.raises(ValueError, match="do not hold 4x3 values"):
        codec.frames_of(msg)
