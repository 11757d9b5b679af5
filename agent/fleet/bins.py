"""Exact fixed-edge metric sums for the operator side, lean enough for 10,000 devices.

`agent.monitoring.windows.Histogram` is the device's tool (numpy counts, a per-histogram edge list
for fast scalar adds). An operator holds one merged histogram per device and metric and merges ~35
of them per message, thousands of messages a second: there a plain list of ints that adds the
payload's run-trimmed `hist` in place is ~10x cheaper in time and memory. Counts stay exact
integers; quantiles use the same inverted-CDF estimate as `Histogram.quantiles` (tested equal).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping, Sequence
from operator import add
from typing import Any

import numpy as np

from agent.monitoring.windows import Histogram

_EDGE_LISTS: dict[int, tuple[np.ndarray, list[float]]] = {}


def edge_list(edges: np.ndarray) -> list[float]:
    """The edges as floats, one list per (shared) edges array."""
    hit = _EDGE_LISTS.get(id(edges))
    if hit is None or hit[0] is not edges:
        hit = _EDGE_LISTS[id(edges)] = (edges, [float(x) for x in edges])
    return hit[1]


def fits(edges: np.ndarray, compact: Sequence[int]) -> bool:
    """Whether a run-trimmed `hist` ([first, c, c, ...]) fits these edges."""
    return not compact or (0 <= compact[0] and compact[0] + len(compact) - 1 <= len(edges) + 1)


def quantiles(counts: Sequence[int], edges: Sequence[float], lo: float, hi: float,
              qs: Sequence[float]) -> list[float | None]:
    """`Histogram.quantiles` on plain lists (bins clipped to the observed [lo, hi])."""
    n = sum(counts)
    if n == 0:
        return [None for _ in qs]
    cum = list(itertools.accumulate(counts))
    last = len(edges)
    out: list[float | None] = []
    for q in qs:
        k = min(n - 1, max(0, math.ceil(q * n - 1e-9) - 1))
        if k == 0:
            out.append(lo)
            continue
        if k == n - 1:
            out.append(hi)
            continue
        b = bisect.bisect_right(cum, k)
        c = counts[b]
        j = k - (cum[b] - c)
        b_lo = lo if b == 0 else max(edges[b - 1], lo)
        b_hi = hi if b == last else min(edges[b], hi)
        out.append(b_lo + (j + 0.5) / c * (b_hi - b_lo))
    return out


def compact(counts: Sequence[int] | None) -> list[int]:
    """The payload's run-trimmed encoding of dense counts ([] when empty)."""
    if not counts:
        return []
    nz = [i for i, c in enumerate(counts) if c]
    if not nz:
        return []
    return [nz[0], *counts[nz[0]:nz[-1] + 1]]


class MetricSum:
    """One metric summed over windows: exact binned counts (dense, allocated on first use),
    the binned values' sum/min/max, every counted value (`count`) and the published means."""

    __slots__ = ("edges", "counts", "sum", "min", "max", "count", "mean_sum", "mean_n")

    def __init__(self, edges: np.ndarray) -> None:
        self.edges = edges            # shared with every other sum of this metric
        self.counts: list[int] | None = None
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.count = 0                # every value the windows counted, binned or not
        self.mean_sum = 0.0           # sum of mean * count over windows that published a mean
        self.mean_n = 0

    def add(self, entry: Mapping[str, Any]) -> None:
        """Add one validated payload entry (count, mean, min, max, hist that fits)."""
        n = entry["count"]
        if not n:
            return
        self.count += n
        mean = entry["mean"]
        if mean is not None:
            self.mean_sum += mean * n
            self.mean_n += n
        h = entry["hist"]
        if not h:
            return
        c = self.counts
        if c is None:
            c = self.counts = [0] * (len(self.edges) + 1)
        first = h[0]
        end = first + len(h) - 1
        c[first:end] = map(add, c[first:end], h[1:])  # in C: this runs ~35 times a message
        self.sum += mean * n  # a binned entry has a mean and its hist sums to count
        lo, hi = entry["min"], entry["max"]
        if lo < self.min:
            self.min = lo
        if hi > self.max:
            self.max = hi

    def merge_in(self, other: MetricSum) -> None:
        self.count += other.count
        self.mean_sum += other.mean_sum
        self.mean_n += other.mean_n
        if other.counts is None:
            return
        if self.counts is None:
            self.counts = list(other.counts)
        else:
            self.counts[:] = map(add, self.counts, other.counts)
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    @property
    def binned(self) -> int:
        return sum(self.counts) if self.counts else 0

    @property
    def mean(self) -> float | None:
        return self.mean_sum / self.mean_n if self.mean_n else None

    def quantiles(self, qs: Sequence[float]) -> list[float | None]:
        if not self.counts:
            return [None for _ in qs]
        return quantiles(self.counts, edge_list(self.edges), self.min, self.max, qs)

    def to_histogram(self) -> Histogram:
        h = Histogram(self.edges)
        if self.counts:
            h.counts = np.asarray(self.counts, dtype=np.int64)
            h.sum, h.min, h.max = self.sum, self.min, self.max
        return h
