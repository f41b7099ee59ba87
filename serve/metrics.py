"""Prometheus metrics of the server, in base units, with no per-stream labels.

Each Server owns its own CollectorRegistry, so several servers can live in one process.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)
# KL in nats and squared Mahalanobis distances both grow with the latent width (hundreds of
# channels): geometric buckets from 0.1 to ~1e6.
SCORE_BUCKETS = tuple(0.1 * 2.0 ** i for i in range(24))


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.frame_latency = Histogram(
            "sim_frame_latency_seconds",
            "Time from the arrival of the audio that completed a top-level frame to sending its result",
            buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("sim_batch_size", "Streams per batched decode_streams call",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.tick_duration = Histogram("sim_tick_duration_seconds", "Wall time of one batched decode_streams "
                                       "call (one or more streaming steps, and flushes)",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.active_streams = Gauge("sim_active_streams", "StreamEncode calls in progress", registry=r)
        self.ood_score = Histogram("sim_ood_score", "Calibrated OOD score per frame (KL in nats or squared "
                                   "Mahalanobis distance, per the model's calibration)", ["level"],
                                   buckets=SCORE_BUCKETS, registry=r)
        self.frames = Counter("sim_frames", "Frames sent", ["level"], registry=r)
        self.flagged_frames = Counter("sim_flagged_frames", "Frames flagged out-of-distribution", ["level"],
                                      registry=r)
        self.streams = Counter("sim_streams", "Finished StreamEncode calls by outcome (ok, cancelled, "
                               "or the status code)", ["outcome"], registry=r)
        self.audio_seconds = Counter("sim_audio_seconds", "Seconds of audio received", registry=r)
        self.decode_requests = Counter("sim_decode_requests", "Decode calls by outcome", ["outcome"], registry=r)

    def serve(self, port: int, host: str = "127.0.0.1") -> tuple[object, int]:
        """Start the /metrics HTTP endpoint in a daemon thread; returns (server, bound port)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, server.server_address[1]
