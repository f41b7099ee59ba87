"""The requests of a StreamEncode call: the config, then audio messages."""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import numpy as np

from protos.sim.v2 import codec
from protos.sim.v2 import sim_pb2 as pb


def config_request(sample_rate: int, levels: Iterable[str] = (), return_logvar: bool = False,
                   encoding: int = pb.FLOAT32) -> pb.StreamEncodeRequest:
    """The first message: sample_rate must be the served model's (Info.sample_rate)."""
    return pb.StreamEncodeRequest(config=pb.StreamConfig(sample_rate=sample_rate, encoding=encoding,
                                                         levels=list(levels), return_logvar=return_logvar))


def audio_request(samples: np.ndarray, encoding: int = pb.FLOAT32) -> pb.StreamEncodeRequest:
    return pb.StreamEncodeRequest(audio=codec.encode_samples(samples, encoding))


def file_requests(audio: np.ndarray, sample_rate: int, chunk_samples: int, *, realtime: bool = False,
                  levels: Iterable[str] = (), return_logvar: bool = False, encoding: int = pb.FLOAT32
                  ) -> Iterator[pb.StreamEncodeRequest]:
    """Config, then the audio (at sample_rate) in chunks; with realtime each chunk leaves when its
    last sample would have been recorded."""
    yield config_request(sample_rate, levels, return_logvar, encoding)
    start = time.monotonic()
    for pos in range(0, len(audio), chunk_samples):
        chunk = audio[pos:pos + chunk_samples]
        if realtime:
            delay = start + (pos + len(chunk)) / sample_rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        yield audio_request(chunk, encoding)
