"""The operator-side metric sums (agent.fleet.bins) against the device's Histogram."""

from __future__ import annotations

import numpy as np

from agent.fleet.bins import MetricSum, compact
from agent.monitoring.metric_catalog import BY_NAME
from agent.monitoring.windows import Histogram


def test_metric_sum_merges_payload_hists_exactly_and_quantiles_match_histogram() -> None:
    rng = np.random.default_rng(5)
    spec = BY_NAME["snr_db"]
    edges = np.asarray(spec.edges, dtype=np.float64)
    total, acc = Histogram(spec.edges), MetricSum(edges)
    for _ in range(30):
        h = Histogram(spec.edges)
        h.add(rng.normal(rng.uniform(-10, 50), 8, size=int(rng.integers(1, 60))))
        entry = {"count": h.count, "mean": h.sum / h.count, "min": h.min, "max": h.max,
                 "hist": h.compact()}
        acc.add(entry)
        total.merge_in(h)
    acc.add({"count": 3, "mean": 12.0, "min": None, "max": None, "hist": []})  # withheld
    assert acc.counts == total.counts.tolist() and acc.binned == total.count
    assert acc.count == total.count + 3
    assert compact(acc.counts) == total.compact()
    assert (acc.min, acc.max) == (total.min, total.max)
    qs = (0.0, 0.1, 0.5, 0.9, 0.95, 1.0)
    assert acc.quantiles(qs) == total.quantiles(qs)
    other = MetricSum(edges)
    other.merge_in(acc)
    other.merge_in(acc)
    assert other.counts == (2 * total.counts).tolist() and other.count == 2 * acc.count
    assert other.to_histogram().quantiles(qs) == other.quantiles(qs)
