"""onnxruntime sessions: the one place that chooses execution providers and session options."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import onnxruntime as ort

# A 69-byte ONNX model (one Identity node, opset 17) used to find out whether CUDA really works here:
# onnxruntime-gpu lists CUDAExecutionProvider even where the CUDA libraries are missing.
_PROBE_MODEL = (b'\x08\x08:;\n\x10\n\x01x\x12\x01y"\x08Identity\x12\x05probeZ\x0f\n\x01x\x12\n\n\x08\x08\x01\x12'
                b'\x04\n\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\x11')
_providers_cache: list[str] | None = None
_providers_lock = threading.Lock()
PROVIDER_ENV = "SIM_ORT_PROVIDER"  # "cpu" forces the CPU provider


def providers() -> list[str]:
    """Execution providers for every session: CUDA first when it actually loads here, else CPU only.

    Decided once per process. Set SIM_ORT_PROVIDER=cpu to force the CPU."""
    global _providers_cache
    with _providers_lock:
        if _providers_cache is None:
            chosen = ["CPUExecutionProvider"]
            forced_cpu = os.environ.get(PROVIDER_ENV, "").lower() == "cpu"
            if not forced_cpu and "CUDAExecutionProvider" in ort.get_available_providers():
                ort.set_default_logger_severity(4)  # a failed CUDA load logs an error; this probe expects it
                try:
                    probe = ort.InferenceSession(_PROBE_MODEL, providers=["CUDAExecutionProvider",
                                                                          "CPUExecutionProvider"])
                    if "CUDAExecutionProvider" in probe.get_providers():
                        chosen = ["CUDAExecutionProvider", "CPUExecutionProvider"]
                except Exception:  # any failure to start CUDA means: run on the CPU
                    pass
                finally:
                    ort.set_default_logger_severity(2)
            _providers_cache = chosen
        return list(_providers_cache)


def make_session(path: str | Path, intra_op_threads: int | None = None, spin: bool = True) -> ort.InferenceSession:
    """An onnxruntime session for one graph on providers().

    spin=False stops the intra-op threads from busy-waiting between parallel sections: less CPU
    while idle, a thread wake-up per section under load (docs/benchmarks.md)."""
    opts = ort.SessionOptions()
    if intra_op_threads:
        opts.intra_op_num_threads = intra_op_threads
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=providers())
