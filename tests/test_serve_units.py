"""Small pieces of the server, checked against the reference implementations they replace."""
from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from protos.sim.v1 import sim_pb2 as pb
from serve.frames import MU_FIELD, PackedFloats
from serve.metrics import SCORE_BUCKETS, Metrics


def test_packed_floats_set_a_repeated_float_field_exactly():
    rng = np.random.default_rng(0)
    for width in (1, 16, 300, 512):  # lengths with 1- and 2-byte varints
        row = rng.standard_normal(width).astype(np.float32)
        row[0] = -0.0
        fast, slow = pb.Frame(level="m1", index=3), pb.Frame(level="m1", index=3)
        PackedFloats(MU_FIELD, width).set(fast, row)
        slow.mu.extend(row.tolist())
        assert fast == slow and fast.SerializeToString() == slow.SerializeToString()
        np.testing.assert_array_equal(np.asarray(fast.mu, np.float32), row)


def test_bulk_histogram_exports_what_a_prometheus_histogram_would():
    values = {"m3": [0.05, 0.1, 0.2, 5.0, 1e7, 0.1, 3.3], "ar": [40.0, 0.0]}
    metrics = Metrics()
    reference = CollectorRegistry()
    hist = Histogram("sim_ood_score", "x", ["level"], buckets=SCORE_BUCKETS, registry=reference)
    for level, vals in values.items():
        metrics.ood_score.observe_many(level, np.asarray(vals[:3]))
        metrics.ood_score.observe_many(level, np.asarray(vals[3:]))
        for v in vals:
            hist.labels(level).observe(v)

    def samples(registry):
        return sorted(line for line in generate_latest(registry).decode().splitlines()
                      if line.startswith("sim_ood_score") and "_created" not in line)

    assert samples(metrics.registry) == samples(reference)
