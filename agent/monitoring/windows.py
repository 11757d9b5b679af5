"""Fixed-bin histograms and windows on the audio clock: the mergeable core of monitoring.

Everything here is pure. Time is always *audio* time in seconds (samples consumed / rate), never
wall time, so a file replayed at 100x and a microphone produce the same windows, and a stalled
capture thread cannot invent or lose windows.

Exactness: histogram counts, min and max merge exactly (integers and order statistics); the sum
(and so the mean) merges up to float rounding (relative ~1e-15 per addition).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from agent.monitoring.metric_catalog import METRICS, WINDOW_DERIVED, MetricSpec

COUNTERS: tuple[str, ...] = (
    "frames", "speech_frames", "utterances", "accepted", "abstained", "dropped_frames",
    "state_write_errors", "wakes", "wake_commands", "wakes_unused")
HOUR_S = 3600.0
DAY_S = 86400.0
_EPS_S = 1e-9  # tolerance when comparing audio-clock boundaries


_EDGES: dict[tuple[float, ...], tuple[np.ndarray, list[float]]] = {}
_EDGES_MAX = 256  # distinct edge sets kept (the catalogue has ~20); others are built per call


def _shared_edges(edges: Sequence[float] | np.ndarray) -> tuple[np.ndarray, list[float]]:
    """One read-only edges array and list (for the scalar fast path's bisect) per edge set:
    every window builds a histogram per metric, and a private copy of each window's edges was
    most of its memory."""
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.size == 0 or not np.all(np.isfinite(e)) or np.any(np.diff(e) <= 0):
        raise ValueError("histogram edges must be a non-empty, finite, increasing sequence")
    key = tuple(e.tolist())
    shared = _EDGES.get(key)
    if shared is None:
        e.flags.writeable = False
        shared = (e, list(key))
        if len(_EDGES) < _EDGES_MAX:
            _EDGES[key] = shared
    return shared


class Histogram:
    """Counts over fixed edges plus exact count/min/max and the sum.

    Bins: index 0 is (-inf, e0), index i is [e(i-1), e(i)), index len(edges) is [e(-1), +inf).
    NaN values are not binned (counted in `invalid`); -inf/+inf (e.g. dBFS of digital silence)
    are recorded as one first/last bin width beyond the outer edges, so they land in the
    underflow/overflow bin and keep mean/min/max finite.

    Quantiles use the inverted-CDF definition (numpy ``method="inverted_cdf"``): the order
    statistic x(k) with k = ceil(q*n) - 1. The bin holding x(k) is found exactly from the counts;
    inside it the c values are assumed evenly spread, the j-th at lo + (j + 0.5)/c * (hi - lo).
    Bin bounds are clipped to [min, max] (the outer bins use min/max as their open side), so
    the estimate and the true value lie in the same clipped bin:

        |estimate - true quantile| <= width of that clipped bin   (`quantile_error_bound`)

    and it is exact at q where k is 0 or n-1 (returns min/max). The outer bins' width is the
    observed extent beyond the edges, which is why edges cover each metric's plausible range.
    """

    __slots__ = ("edges", "counts", "sum", "min", "max", "invalid", "_edge_list")

    def __init__(self, edges: Sequence[float] | np.ndarray) -> None:
        self.edges, self._edge_list = _shared_edges(edges)
        self.counts = np.zeros(self.edges.size + 1, dtype=np.int64)
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.invalid = 0

    @classmethod
    def for_metric(cls, spec: MetricSpec) -> Histogram:
        return cls(spec.edges)

    # --- filling and merging -------------------------------------------------------------
    def add(self, values: float | ArrayLike) -> None:
        """Add one value or an array of values (vectorised)."""
        if isinstance(values, float | int) and math.isfinite(values):
            # one value per utterance is the common case on the pipeline thread: ~1 µs
            x = float(values)
            self.counts[bisect.bisect_right(self._edge_list, x)] += 1
            self.sum += x
            if x < self.min:
                self.min = x
            if x > self.max:
                self.max = x
            return
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return
        nan = np.isnan(v)
        if nan.any():
            self.invalid += int(nan.sum())
            v = v[~nan]
            if v.size == 0:
                return
        if np.isinf(v).any():
            e = self.edges
            w_lo = e[1] - e[0] if e.size > 1 else 1.0
            w_hi = e[-1] - e[-2] if e.size > 1 else 1.0
            v = np.where(v == -np.inf, e[0] - w_lo, np.where(v == np.inf, e[-1] + w_hi, v))
        idx = np.searchsorted(self.edges, v, side="right")
        self.counts += np.bincount(idx, minlength=self.counts.size)
        self.sum += float(v.sum())
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))

    def _check_same(self, other: Histogram) -> None:
        if not np.array_equal(self.edges, other.edges):
            raise ValueError("cannot merge histograms with different edges")

    def merge_in(self, other: Histogram) -> Histogram:
        """Add `other`'s counts into this histogram (exact); returns self."""
        self._check_same(other)
        self.counts += other.counts
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.invalid += other.invalid
        return self

    def merged(self, other: Histogram) -> Histogram:
        """A new histogram holding both (neither input changes)."""
        return self.copy().merge_in(other)

    def copy(self) -> Histogram:
        h = Histogram.__new__(Histogram)
        h.edges = self.edges
        h._edge_list = self._edge_list
        h.counts = self.counts.copy()
        h.sum, h.min, h.max, h.invalid = self.sum, self.min, self.max, self.invalid
        return h

    # --- statistics ----------------------------------------------------------------------
    @property
    def count(self) -> int:
        return sum(self.counts.tolist())  # ~25 bins: cheaper in plain Python than numpy's sum

    @property
    def mean(self) -> float | None:
        n = self.count
        return self.sum / n if n else None

    def _bin_bounds(self, b: int) -> tuple[float, float]:
        e = self._edge_list  # the same floats as self.edges, without numpy scalar indexing
        lo = self.min if b == 0 else e[b - 1]
        hi = self.max if b == len(e) else e[b]
        return max(lo, self.min), min(hi, self.max)

    def _locate(self, q: float) -> tuple[int, int, int, int]:
        """(k, bin, j, c): order statistic index, its bin, its rank in the bin, bin count."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile {q} outside [0, 1]")
        n = self.count
        k = min(n - 1, max(0, math.ceil(q * n - 1e-9) - 1))
        cum = np.cumsum(self.counts)
        b = int(np.searchsorted(cum, k, side="right"))
        c = int(self.counts[b])
        return k, b, k - int(cum[b] - c), c

    def quantile(self, q: float) -> float | None:
        """Inverted-CDF quantile estimate, within `quantile_error_bound(q)` of the true one."""
        n = self.count
        if n == 0:
            return None
        k, b, j, c = self._locate(q)
        if k == 0:
            return self.min
        if k == n - 1:
            return self.max
        lo, hi = self._bin_bounds(b)
        return lo + (j + 0.5) / c * (hi - lo)

    def quantiles(self, qs: Sequence[float]) -> list[float | None]:
        """`quantile(q)` for each q with one pass over the bins (payload building is on the
        pipeline thread once per window)."""
        counts = self.counts.tolist()
        return self._quantiles(counts, list(itertools.accumulate(counts)), qs)

    def digest(self, qs: Sequence[float], at_least: int = 1
               ) -> tuple[int, list[float | None], list[int]]:
        """(count, quantiles(qs), compact()) from one read of the counts: the stats payload
        needs all three for every metric of every window, on the pipeline thread. Below
        `at_least` values only the count is computed (quantiles None, compact [])."""
        counts = self.counts.tolist()
        cum = list(itertools.accumulate(counts))
        n = cum[-1]
        if n == 0 or n < at_least:
            return n, [None for _ in qs], []
        # the run of bins from the first to the last non-empty one, found on the running sum
        first, end = bisect.bisect_right(cum, 0), bisect.bisect_left(cum, n) + 1
        return n, self._quantiles(counts, cum, qs), [first, *counts[first:end]]

    def _quantiles(self, counts: list[int], cum: list[int], qs: Sequence[float]
                   ) -> list[float | None]:
        """The inverted-CDF estimates of the class docstring from the counts and their running
        sum (plain Python: ~25 bins, numpy's per-call overhead would dominate)."""
        n = cum[-1]
        if n == 0:
            return [None for _ in qs]
        lo_v, hi_v, e = self.min, self.max, self._edge_list
        out: list[float | None] = []
        for q in qs:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"quantile {q} outside [0, 1]")
            k = min(n - 1, max(0, math.ceil(q * n - 1e-9) - 1))
            if k == 0:
                out.append(lo_v)
            elif k == n - 1:
                out.append(hi_v)
            else:  # as in `quantile`, with `_bin_bounds` inlined
                b = bisect.bisect_right(cum, k)
                c = counts[b]
                lo = lo_v if b == 0 else max(e[b - 1], lo_v)
                hi = hi_v if b == len(e) else min(e[b], hi_v)
                out.append(lo + (k - (cum[b] - c) + 0.5) / c * (hi - lo))
        return out

    def quantile_error_bound(self, q: float) -> float | None:
        """Largest possible |quantile(q) - true inverted-CDF quantile| for this histogram."""
        n = self.count
        if n == 0:
            return None
        k, b, _, _ = self._locate(q)
        if k in (0, n - 1):
            return 0.0
        lo, hi = self._bin_bounds(b)
        return hi - lo

    # --- encodings -----------------------------------------------------------------------
    def sparse(self) -> list[list[int]]:
        """Non-empty bins as [[bin_index, count], ...] in index order (payload encoding)."""
        nz = np.flatnonzero(self.counts)
        return [[int(i), int(self.counts[i])] for i in nz]

    def compact(self) -> list[int]:
        """Payload encoding: [first, c_first, c_first+1, ..., c_last] -- the counts of the run of
        bins from the first to the last non-empty one; [] when empty. Typical windows fill a few
        adjacent bins, so this is shorter than index/count pairs and never longer than 25 ints."""
        return self.digest(())[2]

    @classmethod
    def from_compact(cls, edges: Sequence[float], enc: Sequence[int], *,
                     min: float | None = None, max: float | None = None,
                     mean: float | None = None) -> Histogram:
        """Rebuild from a payload entry (counts exact; sum/min/max as published, rounded)."""
        h = cls(edges)
        if enc:
            first, run = int(enc[0]), np.asarray(enc[1:], dtype=np.int64)
            if first < 0 or first + run.size > h.counts.size or np.any(run < 0):
                raise ValueError("compact histogram does not fit these edges")
            h.counts[first:first + run.size] = run
            n = h.count
            h.min = float(min) if min is not None else math.inf
            h.max = float(max) if max is not None else -math.inf
            h.sum = float(mean) * n if mean is not None else 0.0
        return h

    def to_dict(self) -> dict:
        """Lossless JSON-ready form (dense counts) for baselines and state files."""
        n = self.count
        return {"edges": [float(x) for x in self.edges], "counts": [int(c) for c in self.counts],
                "sum": self.sum, "min": self.min if n else None, "max": self.max if n else None,
                "invalid": self.invalid}

    @classmethod
    def from_dict(cls, d: Mapping) -> Histogram:
        h = cls(d["edges"])
        counts = np.asarray(d["counts"], dtype=np.int64)
        if counts.shape != h.counts.shape or np.any(counts < 0):
            raise ValueError(f"histogram needs {h.counts.size} non-negative counts")
        h.counts = counts
        h.sum = float(d.get("sum", 0.0))
        if counts.sum():
            h.min, h.max = float(d["min"]), float(d["max"])
        h.invalid = int(d.get("invalid", 0))
        return h

    def __eq__(self, other: object) -> bool:
        """Exact equality of edges, counts, min, max and invalid (the sum is float-merged)."""
        if not isinstance(other, Histogram):
            return NotImplemented
        return (np.array_equal(self.edges, other.edges)
                and np.array_equal(self.counts, other.counts)
                and self.min == other.min and self.max == other.max
                and self.invalid == other.invalid)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Histogram(n={self.count}, bins={self.sparse()})"


def empty_hists(catalog: Iterable[MetricSpec] = METRICS) -> dict[str, Histogram]:
    return {m.name: Histogram.for_metric(m) for m in catalog}


@dataclass
class WindowSummary:
    """One closed window (or roll-up): [start_s, end_s) of audio time, counters, histograms."""

    start_s: float
    end_s: float
    nominal_s: float
    counts: dict[str, int]
    classes: dict[str, int]
    hists: dict[str, Histogram]
    windows: int = 1  # how many base windows were merged into this one

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def partial(self) -> bool:
        """True when the window covers less audio than its nominal length."""
        return self.duration_s < self.nominal_s - _EPS_S

    @property
    def decisions(self) -> int:
        return self.counts.get("accepted", 0) + self.counts.get("abstained", 0)


def merge_into(acc: WindowSummary, part: WindowSummary) -> WindowSummary:
    """Add `part` into `acc` in place (exact, see the module docstring); returns `acc`.

    Roll-ups and the device baseline keep one running merge instead of every window, so memory
    stays flat over days of uptime."""
    for k, h in part.hists.items():
        if k in acc.hists:
            acc.hists[k].merge_in(h)
        else:
            acc.hists[k] = h.copy()
    for k, v in part.counts.items():
        acc.counts[k] = acc.counts.get(k, 0) + v
    for k, v in part.classes.items():
        acc.classes[k] = acc.classes.get(k, 0) + v
    acc.classes = dict(sorted(acc.classes.items()))
    acc.start_s = min(acc.start_s, part.start_s)
    acc.end_s = max(acc.end_s, part.end_s)
    acc.windows += part.windows
    return acc


def copy_summary(s: WindowSummary, nominal_s: float | None = None) -> WindowSummary:
    """An independent copy (histograms copied) to merge into."""
    return WindowSummary(s.start_s, s.end_s, s.nominal_s if nominal_s is None else nominal_s,
                         dict(s.counts), dict(s.classes),
                         {k: h.copy() for k, h in s.hists.items()}, s.windows)


def merge_summaries(parts: Sequence[WindowSummary], nominal_s: float | None = None
                    ) -> WindowSummary:
    """Exact merge of windows into one spanning min(start)..max(end)."""
    if not parts:
        raise ValueError("nothing to merge")
    acc = copy_summary(parts[0])
    for p in parts[1:]:
        merge_into(acc, p)
    acc.classes = dict(sorted(acc.classes.items()))
    acc.nominal_s = nominal_s if nominal_s is not None else acc.end_s - acc.start_s
    return acc


class WindowAggregator:
    """Accumulates metrics into windows aligned to multiples of `window_s` on the audio clock.

    Every method takes `now_s` (audio seconds). Before recording, all windows ending at or before
    `now_s` are closed, including empty ones (a silent stretch still produces windows, with zero
    counts). Closed windows queue up until `advance()` or `finish()` returns them. Events stamped
    before the open window's start (a stale timestamp) are counted in the open window: the
    pipeline's clock is monotonic, and losing telemetry is worse than a slightly late bin.

    When a window closes, the aggregator records the per-window metrics itself (WINDOW_DERIVED):
    vad_speech_ratio and utterance_rate_per_min when the window saw frames, unknown_ratio when it
    saw decisions, state_write_errors when it counted any.
    """

    def __init__(self, window_s: float = 60.0, *, catalog: Sequence[MetricSpec] = METRICS,
                 unknown_label: str = "unknown", start_s: float = 0.0) -> None:
        if not window_s > 0:
            raise ValueError(f"window length must be > 0 s, got {window_s}")
        self.window_s = float(window_s)
        self.catalog = tuple(catalog)
        self._names = {m.name for m in self.catalog}
        self.unknown_label = unknown_label
        self._index = math.floor(start_s / self.window_s + _EPS_S)
        self._closed: list[WindowSummary] = []
        self._finished = False
        self._reset()

    # --- window bookkeeping --------------------------------------------------------------
    @property
    def window_start_s(self) -> float:
        return self._index * self.window_s

    @property
    def window_end_s(self) -> float:
        return (self._index + 1) * self.window_s

    def _reset(self) -> None:
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._classes: dict[str, int] = {}
        self._hists = empty_hists(self.catalog)

    def _close(self, end_s: float) -> None:
        start = self.window_start_s
        c = self._counts
        if "vad_speech_ratio" in self._names and c["frames"] > 0:
            self._hists["vad_speech_ratio"].add(c["speech_frames"] / c["frames"])
        if "utterance_rate_per_min" in self._names and c["frames"] > 0 and end_s > start:
            self._hists["utterance_rate_per_min"].add(c["utterances"] * 60.0 / (end_s - start))
        decisions = c["accepted"] + c["abstained"]
        if "unknown_ratio" in self._names and decisions > 0:
            self._hists["unknown_ratio"].add(self._classes.get(self.unknown_label, 0) / decisions)
        if "state_write_errors" in self._names and c.get("state_write_errors"):
            self._hists["state_write_errors"].add(c["state_write_errors"])
        self._closed.append(WindowSummary(start, end_s, self.window_s, dict(c),
                                          dict(sorted(self._classes.items())), self._hists))
        self._reset()

    def _roll(self, now_s: float) -> None:
        if self._finished:
            raise RuntimeError("aggregator already finished")
        while now_s >= self.window_end_s - _EPS_S:
            self._close(self.window_end_s)
            self._index += 1

    # --- recording -----------------------------------------------------------------------
    def observe(self, metric: str, values: float | ArrayLike, now_s: float) -> None:
        """Add value(s) of a catalogue metric observed at audio time `now_s`."""
        if metric not in self._names:
            raise KeyError(f"unknown metric {metric!r}; allowed: {', '.join(sorted(self._names))}")
        if metric in WINDOW_DERIVED:
            raise ValueError(f"{metric} is derived by the aggregator when a window closes")
        self._roll(now_s)
        self._hists[metric].add(values)

    def count(self, counter: str, n: int, now_s: float) -> None:
        """Add `n` to one of COUNTERS."""
        if counter not in self._counts:
            raise KeyError(f"unknown counter {counter!r}; allowed: {', '.join(COUNTERS)}")
        self._roll(now_s)
        self._counts[counter] += int(n)

    def record_decision(self, label: str, accepted: bool, now_s: float, *,
                        confidence: float | None = None, margin: float | None = None) -> None:
        """One model decision: accepted/abstained, its class, and its confidence and margin."""
        self._roll(now_s)
        self._counts["accepted" if accepted else "abstained"] += 1
        self._classes[label] = self._classes.get(label, 0) + 1
        if confidence is not None and "confidence" in self._names:
            self._hists["confidence"].add(confidence)
        if margin is not None and "margin" in self._names:
            self._hists["margin"].add(margin)

    def advance(self, now_s: float) -> list[WindowSummary]:
        """Close every window ending at or before `now_s`; return all closed, not yet returned."""
        self._roll(now_s)
        out, self._closed = self._closed, []
        return out

    def finish(self, now_s: float) -> list[WindowSummary]:
        """Close full windows up to `now_s` and the partial last one [start, now_s); terminal."""
        self._roll(now_s)
        has_data = any(self._counts.values()) or any(h.count for h in self._hists.values())
        if now_s > self.window_start_s + _EPS_S or has_data:
            self._close(max(now_s, self.window_start_s))
        self._finished = True
        out, self._closed = self._closed, []
        return out


class RollUp:
    """Merges closed windows into aligned periods (e.g. HOUR_S, DAY_S) on the audio clock.

    A roll-up is emitted as soon as the window that reaches its period end arrives, or when a
    window of a later period arrives (a gap); `finish()` returns the partial last one. Windows must
    not straddle a period boundary: choose a period that is a multiple of the window length.
    Each window is merged in as it arrives (fixed-bin histograms merge exactly), so a day-long
    roll-up holds one summary, not 1,440 windows.
    """

    def __init__(self, period_s: float) -> None:
        if not period_s > 0:
            raise ValueError(f"roll-up period must be > 0 s, got {period_s}")
        self.period_s = float(period_s)
        self._acc: WindowSummary | None = None
        self._period: int | None = None

    def _emit(self) -> list[WindowSummary]:
        out, self._acc, self._period = self._acc, None, None
        return [out] if out is not None else []

    def add(self, summary: WindowSummary) -> list[WindowSummary]:
        """Take one closed window; return the roll-ups it completes (zero, one or two)."""
        p = math.floor(summary.start_s / self.period_s + _EPS_S)
        if summary.end_s > (p + 1) * self.period_s + _EPS_S:
            raise ValueError(f"window {summary.start_s}-{summary.end_s} s crosses a "
                             f"{self.period_s:g} s roll-up boundary; use a period that is a "
                             "multiple of the window length")
        out = self._emit() if self._period is not None and p != self._period else []
        self._period = p
        if self._acc is None:
            self._acc = copy_summary(summary, nominal_s=self.period_s)
        else:
            merge_into(self._acc, summary)
        if summary.end_s >= (p + 1) * self.period_s - _EPS_S:
            out += self._emit()
        return out

    def finish(self) -> list[WindowSummary]:
        """The partial roll-up still open, if any."""
        return self._emit()


class Trailing:
    """The merge of the last `n` closed windows: a longer, sliding view updated every window.

    Scoring drift on it gives per-utterance metrics enough samples in short windows while still
    reacting within n windows.
    """

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError("trailing window count must be >= 1")
        self._last: deque[WindowSummary] = deque(maxlen=n)

    def add(self, summary: WindowSummary) -> WindowSummary:
        self._last.append(summary)
        last = list(self._last)
        return merge_summaries(last, nominal_s=sum(s.nominal_s for s in last))

