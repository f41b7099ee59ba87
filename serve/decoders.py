"""The Decode RPC's engine: latents of one level -> audio through MODEL_DIR/decoder_<level>.onnx.

A decoder graph takes latents (batch, frames, channels), channels last like everything the
service returns, and gives audio (batch, samples) (train.decoder.Decoder exported to ONNX by
`python -m export.onnx ... --decoders DIR`). The levels that can be decoded are those whose
decoder the manifest lists. Sessions are opened on first use (after re-checking the file's
sha256) and kept.
"""
from __future__ import annotations

import threading

import grpc
import numpy as np

from protos.sim.v2 import codec
from serve.errors import StreamError
from serve.model_dir import ModelInfo, sha256_file
from serve.onnx_sessions import make_session


class DecoderBank:
    def __init__(self, model: ModelInfo, max_frames: int = 6000):
        self.model_dir = model.dir
        self.files = dict(model.decoder_files)  # level -> file name
        self.hashes = {name: model.manifest["files"][name].get("sha256") for name in self.files.values()}
        self.level_dims = dict(model.level_dims)
        self.max_frames = max_frames
        self._sessions: dict[str, object] = {}
        self._lock = threading.Lock()

    def available(self, level: str) -> bool:
        return level in self.files and level in self.level_dims

    def _session(self, level: str):
        with self._lock:
            if level in self._sessions:
                return self._sessions[level]
            path = self.model_dir / self.files[level]
            expected = self.hashes[path.name]
            try:
                digest = sha256_file(path)
            except OSError as exc:
                raise StreamError(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"decoder for level {level!r} is unreadable ({path.name}: {exc.strerror})") from None
            if digest != expected:
                raise StreamError(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"{path.name} changed since the model was exported (sha256 mismatch); "
                                  "re-export the model and restart the server")
            try:
                sess = make_session(path)
            except Exception as exc:  # onnxruntime raises several types for unreadable graphs
                raise StreamError(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"decoder for level {level!r} cannot be loaded ({path.name}: {exc})") from None
            inputs = sess.get_inputs()
            shape = inputs[0].shape if inputs else None
            if len(inputs) != 1 or len(shape) != 3:
                raise StreamError(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"{path.name} is not a decoder graph: expected one input (batch, frames, channels)")
            channels = shape[2]
            if isinstance(channels, int) and channels != self.level_dims[level]:
                raise StreamError(grpc.StatusCode.FAILED_PRECONDITION,
                                  f"{path.name} expects {channels} channels but level {level!r} of the served "
                                  f"model has {self.level_dims[level]}: the decoder belongs to another model")
            self._sessions[level] = sess
            return sess

    def decode(self, level: str, num_frames: int, latents: bytes) -> np.ndarray:
        """Audio samples (float32) for num_frames x dim latents (packed float32, sim.v2). Raises
        StreamError with the status to send."""
        if level not in self.level_dims:
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"unknown level {level!r}; the model has {', '.join(self.level_dims)}")
        if not self.available(level):
            have = ", ".join(lv for lv in self.level_dims if lv in self.files) or "none"
            raise StreamError(grpc.StatusCode.NOT_FOUND,
                              f"the served model has no decoder for level {level!r} (levels with one: {have}; "
                              "`python -m export.onnx CHECKPOINT --decoders DIR` exports the conv levels' decoders)")
        dim = self.level_dims[level]
        if num_frames < 1:
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, f"num_frames must be at least 1, got {num_frames}")
        if num_frames > self.max_frames:
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"num_frames {num_frames} exceeds the limit of {self.max_frames} per call")
        size = codec.FLOAT.itemsize
        if len(latents) % size:
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"latents has {len(latents)} bytes, not a multiple of {size} (float32 values)")
        if len(latents) != num_frames * dim * size:
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"latents has {len(latents) // size} values; level {level!r} needs num_frames x {dim} = "
                              f"{num_frames * dim}")
        z = codec.unpack(latents, num_frames, dim)
        if not np.isfinite(z).all():
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, "latents contain NaN or infinite values")
        sess = self._session(level)
        name = sess.get_inputs()[0].name
        audio = sess.run(None, {name: z.reshape(1, num_frames, dim)})[0]
        return np.asarray(audio, dtype=np.float32).reshape(-1)
