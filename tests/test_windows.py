"""Histograms (merge, quantiles), windows on the audio clock, roll-ups."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.monitoring.metric_catalog import BY_NAME, MAX_BINS, METRICS, STAGES, WINDOW_DERIVED
from agent.monitoring.windows import (
    HOUR_S,
    Histogram,
    RollUp,
    Trailing,
    WindowAggregator,
    merge_summaries,
)

RMS = BY_NAME["input_rms_dbfs"].edges


# --- catalogue ---------------------------------------------------------------------------
def test_catalogue_is_complete_and_small():
    names = [m.name for m in METRICS]
    assert names == [
        "input_rms_dbfs", "input_peak_dbfs", "clipping_ratio", "snr_db", "noise_floor_dbfs",
        "audio_outage_s", "utterance_length_s", "vad_speech_ratio", "utterance_rate_per_min",
        "wake_score", "wake_latency_ms", "confidence", "margin", "digit_confidence",
        "unknown_ratio",
        "compute_latency_ms", "eou_latency_ms", "queue_depth", "config_reload_ok",
        "state_write_errors", "state_files_quarantined",
        "telemetry_restarts", "action_latency_ms", "action_outcome", "socket_dropped"]
    assert {m.stage for m in METRICS} == set(STAGES)
    for m in METRICS:
        assert m.bins <= MAX_BINS, m.name
        assert all(b > a for a, b in zip(m.edges, m.edges[1:], strict=False)), m.name
    assert WINDOW_DERIVED <= set(names)


# --- histogram ---------------------------------------------------------------------------
def test_bins_are_left_closed_with_underflow_and_overflow():
    h = Histogram([0.0, 1.0, 2.0])
    h.add([-5.0, 0.0, 0.5, 1.0, 1.999, 2.0, 100.0])
    assert h.counts.tolist() == [1, 2, 2, 2]
    assert h.sparse() == [[0, 1], [1, 2], [2, 2], [3, 2]]
    assert (h.min, h.max, h.count) == (-5.0, 100.0, 7)


def test_compact_encoding_round_trips():
    h = Histogram([0.0, 1.0, 2.0, 3.0, 4.0])
    assert h.compact() == []
    h.add([1.5, 1.6, 3.5])
    assert h.compact() == [2, 2, 0, 1]  # bins 2..4, the empty bin 3 kept inside the run
    g = Histogram.from_compact(h.edges, h.compact(), min=h.min, max=h.max, mean=h.mean)
    assert g == h and g.quantile(0.5) == h.quantile(0.5)
    with pytest.raises(ValueError):
        Histogram.from_compact(h.edges, [5, 1, 1])


def test_scalar_and_vector_adds_agree():
    rng = np.random.default_rng(1)
    x = rng.normal(-30, 8, 500)
    a, b = Histogram(RMS), Histogram(RMS)
    a.add(x)
    for v in x:
        b.add(float(v))
    assert a == b
    assert a.mean == pytest.approx(float(x.mean()), rel=1e-12)


def test_nan_is_counted_invalid_and_infinities_stay_finite():
    h = Histogram(RMS)
    h.add([np.nan, -np.inf, -20.0, np.inf])
    assert h.invalid == 1
    assert h.count == 3
    assert h.counts[0] == 1 and h.counts[-1] == 1  # -inf underflow, +inf overflow
    assert math.isfinite(h.min) and math.isfinite(h.max) and math.isfinite(h.mean)
    assert h.min < RMS[0] and h.max > RMS[-1]


def test_merge_of_parts_equals_whole():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(-25, 4, 3000), rng.uniform(-120, 10, 200)])
    whole = Histogram(RMS)
    whole.add(x)
    parts = [Histogram(RMS) for _ in range(7)]
    for p, chunk in zip(parts, np.array_split(rng.permutation(x), 7), strict=True):
        p.add(chunk)
    merged = Histogram(RMS)
    for p in reversed(parts):  # order must not matter
        merged.merge_in(p)
    assert merged == whole  # counts, min, max exact
    assert merged.counts.tolist() == whole.counts.tolist()
    assert merged.sum == pytest.approx(whole.sum, rel=1e-12)
    assert parts[0].merged(parts[1]).count == parts[0].count + parts[1].count


def test_merge_rejects_other_edges():
    with pytest.raises(ValueError):
        Histogram(RMS).merge_in(Histogram([0.0, 1.0]))


def test_dict_round_trip_is_lossless():
    h = Histogram(RMS)
    h.add([-30.0, -31.5, -90.0, 3.0])
    g = Histogram.from_dict(h.to_dict())
    assert g == h and g.sum == h.sum
    empty = Histogram.from_dict(Histogram(RMS).to_dict())
    assert empty.count == 0 and empty.mean is None and empty.quantile(0.5) is None


@pytest.mark.parametrize("metric", [m.name for m in METRICS])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantiles_within_documented_bound(metric, seed):
    """p50/p95 (and others) vs numpy's inverted-CDF quantile, within the clipped bin width."""
    edges = np.asarray(BY_NAME[metric].edges)
    rng = np.random.default_rng(seed)
    lo, hi = edges[0], edges[-1]
    span = hi - lo
    x = np.concatenate([rng.uniform(lo - 0.1 * span, hi + 0.1 * span, 700),
                        rng.choice(edges, 50)])  # values exactly on edges too
    h = Histogram(edges)
    h.add(x)
    for q in (0.0, 0.05, 0.5, 0.9, 0.95, 0.99, 1.0):
        true = float(np.quantile(x, q, method="inverted_cdf"))
        est = h.quantile(q)
        bound = h.quantile_error_bound(q)
        assert abs(est - true) <= bound + 1e-9, (q, est, true, bound)
        # the bound is one bin: never wider than the widest inner bin or the tails' extent
        assert bound <= max(np.diff(edges).max(), edges[0] - x.min(), x.max() - edges[-1])


def test_quantile_bound_is_tight_enough_to_be_useful():
    rng = np.random.default_rng(5)
    x = rng.normal(-25, 5, 20000)
    h = Histogram(RMS)
    h.add(x)
    # 4 dB bins: the inverted-CDF median must come out within one bin (and in practice closer)
    assert abs(h.quantile(0.5) - np.median(x)) < 1.0
    assert h.quantile_error_bound(0.5) == pytest.approx(4.0)
    assert h.quantile(0.0) == x.min() and h.quantile(1.0) == x.max()


def test_quantile_single_value_and_bad_q():
    h = Histogram(RMS)
    h.add(-33.3)
    assert h.quantile(0.5) == -33.3 and h.quantile(0.95) == -33.3
    with pytest.raises(ValueError):
        h.quantile(1.5)


# --- windows on the audio clock ----------------------------------------------------------
def test_windows_roll_over_on_audio_clock_and_are_aligned():
    agg = WindowAggregator(10.0)
    agg.count("frames", 100, now_s=0.5)
    agg.observe("input_rms_dbfs", -20.0, now_s=3.0)
    assert agg.advance(9.999) == []  # nothing closes before the boundary
    agg.observe("input_rms_dbfs", [-21.0, -22.0], now_s=10.0)  # exactly on the boundary: next
    closed = agg.advance(10.0)
    assert [(w.start_s, w.end_s) for w in closed] == [(0.0, 10.0)]
    w = closed[0]
    assert w.hists["input_rms_dbfs"].count == 1 and w.counts["frames"] == 100
    assert not w.partial
    closed = agg.advance(25.0)
    assert [(w.start_s, w.end_s) for w in closed] == [(10.0, 20.0)]
    assert closed[0].hists["input_rms_dbfs"].count == 2


def test_gap_closes_empty_windows_with_zero_counts():
    agg = WindowAggregator(10.0)
    agg.count("frames", 5, now_s=1.0)
    agg.count("utterances", 1, now_s=2.0)
    agg.count("frames", 7, now_s=41.0)  # 30 s later
    closed = agg.advance(41.0)
    assert [(w.start_s, w.end_s) for w in closed] == [(0, 10), (10, 20), (20, 30), (30, 40)]
    assert [w.counts["frames"] for w in closed] == [5, 0, 0, 0]
    for w in closed[1:]:
        assert not any(w.counts.values()) and all(h.count == 0 for h in w.hists.values())


def test_partial_last_window_and_finish_is_terminal():
    agg = WindowAggregator(60.0)
    agg.count("frames", 10, now_s=61.0)
    closed = agg.finish(75.5)
    assert [(w.start_s, w.end_s) for w in closed] == [(0.0, 60.0), (60.0, 75.5)]
    assert closed[-1].partial and closed[-1].counts["frames"] == 10
    with pytest.raises(RuntimeError):
        agg.advance(80.0)


def test_finish_on_boundary_adds_no_empty_partial():
    agg = WindowAggregator(10.0)
    agg.count("frames", 1, now_s=1.0)
    assert [(w.start_s, w.end_s) for w in agg.finish(20.0)] == [(0, 10), (10, 20)]


def test_stale_timestamp_lands_in_open_window():
    agg = WindowAggregator(10.0)
    agg.advance(15.0)
    agg.observe("snr_db", 20.0, now_s=3.0)  # reported late
    (w,) = agg.advance(20.0)
    assert (w.start_s, w.hists["snr_db"].count) == (10.0, 1)


def test_decisions_classes_and_derived_metrics():
    agg = WindowAggregator(30.0)
    agg.count("frames", 1000, now_s=1.0)
    agg.count("speech_frames", 250, now_s=1.0)
    agg.count("utterances", 4, now_s=5.0)
    agg.record_decision("3", True, now_s=5.0, confidence=0.9, margin=0.7)
    agg.record_decision("unknown", False, now_s=6.0, confidence=0.4, margin=0.1)
    agg.record_decision("3", True, now_s=7.0, confidence=0.8, margin=0.6)
    agg.record_decision("7", False, now_s=8.0, confidence=0.5, margin=0.2)
    (w,) = agg.advance(30.0)
    assert (w.counts["accepted"], w.counts["abstained"], w.decisions) == (2, 2, 4)
    assert w.classes == {"3": 2, "7": 1, "unknown": 1}
    assert w.hists["confidence"].mean == pytest.approx(0.65)
    assert w.hists["margin"].count == 4
    assert w.hists["vad_speech_ratio"].sum == pytest.approx(0.25)
    assert w.hists["utterance_rate_per_min"].sum == pytest.approx(8.0)
    assert w.hists["unknown_ratio"].sum == pytest.approx(0.25)
    with pytest.raises(ValueError):
        agg.observe("vad_speech_ratio", 0.5, now_s=31.0)
    with pytest.raises(KeyError):
        agg.observe("no_such_metric", 1.0, now_s=31.0)
    with pytest.raises(KeyError):
        agg.count("no_such_counter", 1, now_s=31.0)


def test_window_of_silence_has_no_derived_values_without_frames():
    agg = WindowAggregator(10.0)
    (w,) = agg.advance(10.0)
    assert w.hists["vad_speech_ratio"].count == 0
    assert w.hists["utterance_rate_per_min"].count == 0


def _stream(agg: WindowAggregator, seconds: float, seed: int) -> list:
    """Feed a synthetic stream: frames every second, an utterance every ~2.5 s."""
    rng = np.random.default_rng(seed)
    out = []
    t = 0.0
    while t < seconds:
        agg.count("frames", 33, t)
        agg.observe("noise_floor_dbfs", rng.normal(-60, 2), t)
        if rng.random() < 0.4:
            agg.count("utterances", 1, t)
            agg.observe("input_rms_dbfs", rng.normal(-25, 3), t)
            agg.record_decision(str(rng.integers(10)), bool(rng.random() < 0.8), t,
                                confidence=float(rng.uniform(0.5, 1.0)), margin=0.3)
        out += agg.advance(t)
        t += 1.0
    return out + agg.finish(seconds)


def test_rollup_merges_windows_exactly():
    windows = _stream(WindowAggregator(60.0), 2 * HOUR_S + 900, seed=3)
    roll = RollUp(HOUR_S)
    hours = [r for w in windows for r in roll.add(w)] + roll.finish()
    assert [(h.start_s, h.end_s) for h in hours] == [(0, 3600), (3600, 7200), (7200, 8100)]
    assert [h.windows for h in hours] == [60, 60, 15]
    assert not hours[0].partial and hours[-1].partial
    whole = merge_summaries(windows)
    again = merge_summaries(hours)
    assert again.counts == whole.counts and again.classes == whole.classes
    for k, h in whole.hists.items():
        assert again.hists[k] == h, k
    assert sum(h.counts["frames"] for h in hours) == sum(w.counts["frames"] for w in windows)
    # windows merge exactly into the hour they belong to
    first_hour = merge_summaries(windows[:60])
    assert hours[0].hists["input_rms_dbfs"] == first_hour.hists["input_rms_dbfs"]


def test_daily_rollup_of_hourly_rollups():
    windows = _stream(WindowAggregator(600.0), 3 * HOUR_S, seed=4)
    hourly, daily = RollUp(HOUR_S), RollUp(24 * HOUR_S)
    hours = [r for w in windows for r in hourly.add(w)]
    days = [d for h in hours for d in daily.add(h)] + daily.finish()
    assert len(hours) == 3 and len(days) == 1 and days[0].partial
    assert days[0].counts == merge_summaries(windows).counts


def test_rollup_rejects_windows_crossing_its_boundary():
    roll = RollUp(100.0)
    agg = WindowAggregator(60.0)
    agg.count("frames", 1, 0.0)
    w1, w2 = agg.advance(120.0)
    roll.add(w1)
    with pytest.raises(ValueError, match="multiple of the window"):
        roll.add(w2)


def test_rollup_closes_on_gap():
    roll = RollUp(100.0)
    agg = WindowAggregator(50.0)
    agg.count("frames", 1, 0.0)
    (w,) = agg.advance(50.0)
    assert roll.add(w) == []
    later = WindowAggregator(50.0, start_s=300.0)
    later.count("frames", 2, 300.0)
    (w3,) = later.advance(350.0)
    (closed,) = roll.add(w3)  # a window from a later period closes the open one
    assert (closed.start_s, closed.end_s, closed.counts["frames"]) == (0.0, 50.0, 1)


def test_trailing_merges_last_n():
    agg = WindowAggregator(10.0)
    tr = Trailing(3)
    views = []
    for i in range(5):
        agg.count("utterances", i + 1, now_s=i * 10.0 + 1)
        views += [tr.add(w) for w in agg.advance((i + 1) * 10.0)]
    assert [v.counts["utterances"] for v in views] == [1, 3, 6, 9, 12]
    assert (views[-1].start_s, views[-1].end_s, views[-1].windows) == (20.0, 50.0, 3)


def test_quantiles_in_one_pass_equal_quantile_one_by_one():
    rng = np.random.default_rng(3)
    for m in METRICS:
        h = Histogram(m.edges)
        assert h.quantiles((0.5, 0.95)) == [None, None]
        lo, hi = m.edges[0], m.edges[-1]
        h.add(rng.uniform(lo - (hi - lo) * 0.1, hi + (hi - lo) * 0.1, 37))
        qs = (0.0, 0.05, 0.5, 0.95, 1.0)
        assert h.quantiles(qs) == [h.quantile(q) for q in qs], m.name


def test_digest_equals_count_quantiles_and_compact():
    """`digest` (the payload's one read of a histogram) against the numpy-based forms."""
    rng = np.random.default_rng(4)
    qs = (0.0, 0.05, 0.5, 0.95, 1.0)
    for m in METRICS:
        h = Histogram(m.edges)
        assert h.digest(qs) == (0, [None] * 5, [])
        lo, hi = m.edges[0], m.edges[-1]
        for n in (1, 2, 3, 19, 20, 500):
            h = Histogram(m.edges)
            h.add(rng.uniform(lo - (hi - lo) * 0.1, hi + (hi - lo) * 0.1, n))
            nz = np.flatnonzero(h.counts)
            compact = [int(nz[0])] + [int(c) for c in h.counts[nz[0]:nz[-1] + 1]]
            assert h.digest(qs) == (int(h.counts.sum()), [h.quantile(q) for q in qs],
                                    compact), (m.name, n)
            assert h.compact() == compact and h.count == n
            assert h.digest(qs, at_least=n + 1) == (n, [None] * 5, [])
