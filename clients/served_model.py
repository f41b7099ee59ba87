"""What the server says about the model it serves (the Info RPC): the clients' only source for the
sample rate, the levels, their frame rates and widths, and the calibration."""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from clients.connection import ClientError, Connection, describe_rpc_error
from protos.sim.v2 import sim_pb2 as pb


@dataclass(frozen=True)
class Level:
    name: str
    dim: int
    hop_samples: int  # samples per frame
    has_logvar: bool
    has_decoder: bool
    threshold: float | None  # the OOD threshold on the window score; None when the level has no calibration
    window_frames: int = 1  # frames of the rolling mean the flag is decided on


@dataclass(frozen=True)
class ServedModel:
    model: str
    method: str
    sample_rate: int
    hop: int  # samples per top-level frame
    lookahead: int  # samples a top-level frame needs past its own hop
    levels: dict[str, Level]  # in the model's order

    @classmethod
    def from_info(cls, info: pb.InfoResponse) -> ServedModel:
        levels = {lv.name: Level(lv.name, lv.dim, lv.hop_samples, lv.has_logvar, lv.has_decoder,
                                 lv.calibration.threshold if lv.HasField("calibration") else None,
                                 max(1, lv.calibration.window_frames))
                  for lv in info.levels}
        return cls(info.model, info.method, info.sample_rate, info.hop, info.lookahead, levels)

    def level(self, name: str, option: str = "--level") -> Level:
        """The level called name; ClientError naming the option and the model's levels if it has none."""
        if name not in self.levels:
            raise ClientError(f"{option} {name}: the served model ({self.method}) has levels "
                              f"{', '.join(self.levels)}")
        return self.levels[name]

    def frame_seconds(self, level: str) -> float:
        return self.levels[level].hop_samples / self.sample_rate

    def window_seconds(self, level: str) -> float:
        """Audio the flag of a frame of this level averages over."""
        return self.levels[level].window_frames * self.frame_seconds(level)


def fetch(conn: Connection, timeout: float = 10.0) -> ServedModel:
    """Ask the server (Info); ClientError when the call fails."""
    try:
        info = conn.stub.Info(pb.InfoRequest(), metadata=conn.metadata, timeout=timeout)
    except grpc.RpcError as exc:
        raise ClientError(f"Info failed: {describe_rpc_error(exc)}") from None
    return ServedModel.from_info(info)
