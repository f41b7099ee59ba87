"""Prometheus metrics of the server, in base units, with no per-stream labels.

Each Server owns its own CollectorRegistry, so several servers can live in one process.
"""
from __future__ import annotations

import threading

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)
# KL in nats and squared Mahalanobis distances both grow with the latent width (hundreds of
# channels): geometric buckets from 0.1 to ~1e6.
SCORE_BUCKETS = tuple(0.1 * 2.0 ** i for i in range(24))


class BulkHistogram(Collector):
    """A labelled histogram fed whole arrays at a time (numpy bucketing), exported at scrape time.

    prometheus_client's Histogram takes one value per call; the OOD score histogram gets every
    frame of every level (up to 1,200 values per second per stream), which made it one of the
    server's larger Python costs."""

    def __init__(self, name: str, documentation: str, label: str, buckets, registry: CollectorRegistry):
        self.name, self.documentation, self.label = name, documentation, label
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self._counts: dict[str, np.ndarray] = {}
        self._sums: dict[str, float] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, label_value: str, values) -> int:
        """Add the values; returns how many were not finite. Those count in the +Inf bucket but not
        in the sum, so one NaN or inf does not make the sum (and every rate over it) NaN for good."""
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return 0
        finite = np.isfinite(v)
        idx = np.where(finite, np.searchsorted(self.bounds, v, side="left"), self.bounds.size)  # i: <= bounds[i]
        add = np.bincount(idx, minlength=self.bounds.size + 1)
        total = float(v[finite].sum()) if not finite.all() else float(v.sum())
        with self._lock:
            counts = self._counts.setdefault(label_value, np.zeros(self.bounds.size + 1, np.int64))
            counts += add
            self._sums[label_value] = self._sums.get(label_value, 0.0) + total
        return int(v.size - np.count_nonzero(finite))

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        with self._lock:
            items = [(k, c.copy(), self._sums[k]) for k, c in self._counts.items()]
        for label_value, counts, total in items:
            cumulative = np.cumsum(counts)
            buckets = [(repr(float(b)), int(c)) for b, c in zip(self.bounds, cumulative[:-1])]
            buckets.append(("+Inf", int(cumulative[-1])))
            family.add_metric([label_value], buckets, total)
        yield family

    def describe(self):
        return [HistogramMetricFamily(self.name, self.documentation, labels=[self.label])]


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
        self.ood_score = BulkHistogram("sim_ood_score", "Per-frame OOD score the flags are built on (KL in nats "
                                       "or squared Mahalanobis distance, per the model's calibration); "
                                       "non-finite scores count in +Inf only", "level", SCORE_BUCKETS, r)
        self.nonfinite_scores = Counter("sim_nonfinite_scores", "Frames whose OOD score was NaN or infinite "
                                        "(flagged)", ["level"], registry=r)
        self.frames = Counter("sim_frames", "Frames produced for streams", ["level"], registry=r)
        self.flagged_frames = Counter("sim_flagged_frames", "Frames flagged out-of-distribution (their window "
                                      "score above the calibrated threshold)", ["level"], registry=r)
        self.streams = Counter("sim_streams", "Finished StreamEncode calls by outcome (ok, cancelled, "
                               "or the status code)", ["outcome"], registry=r)
        self.audio_seconds = Counter("sim_audio_seconds", "Seconds of audio received", registry=r)
        self.decode_requests = Counter("sim_decode_requests", "Decode calls by outcome", ["outcome"], registry=r)

    def count_frames(self, by_level: dict[str, list]) -> None:
        """One tick's scored frames (serve.scoring.ScoredFrames, grouped by level): frame
        and flagged counters and the score histogram, one update per level instead of per stream."""
        for level, parts in by_level.items():
            scores = parts[0].score if len(parts) == 1 else np.concatenate([p.score for p in parts])
            flagged = sum(int(np.count_nonzero(p.ood)) for p in parts)
            self.frames.labels(level).inc(scores.size)
            nonfinite = self.ood_score.observe_many(level, scores)
            if nonfinite:
                self.nonfinite_scores.labels(level).inc(nonfinite)
            if flagged:
                self.flagged_frames.labels(level).inc(flagged)

    def serve(self, port: int, host: str = "127.0.0.1") -> tuple[object, int]:
        """Start the /metrics HTTP endpoint in a daemon thread; returns (server, bound port)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, server.server_address[1]
