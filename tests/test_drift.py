"""Drift scores, baselines, alarm rules with hysteresis."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from agent.errors import AgentError, ConfigError
from agent.monitoring.drift import (
    DEFAULT_ALARMS,
    AlarmRule,
    AlarmTracker,
    Baseline,
    DeviceBaselineLearner,
    DriftScore,
    drift_score,
    js_distance,
    psi,
    rules_from_config,
    score_window,
)
from agent.monitoring.metric_catalog import BY_NAME
from agent.monitoring.windows import (
    Histogram,
    Trailing,
    WindowAggregator,
    WindowSummary,
    empty_hists,
)

RMS = BY_NAME["input_rms_dbfs"].edges


# --- scores ------------------------------------------------------------------------------
def test_js_known_values():
    assert js_distance([5, 3, 0, 2], [10, 6, 0, 4]) == pytest.approx(0.0, abs=1e-12)
    assert js_distance([1, 2, 0, 0], [0, 0, 3, 4]) == pytest.approx(1.0)
    # p = (1, 0), q = (1/2, 1/2), m = (3/4, 1/4)
    expected = math.sqrt(0.5 * math.log2(4 / 3) + 0.25 * math.log2(2 / 3) + 0.25 * 1.0)
    assert js_distance([4, 0], [2, 2]) == pytest.approx(expected, rel=1e-12)
    assert js_distance([4, 0], [2, 2]) == pytest.approx(js_distance([2, 2], [4, 0]))  # symmetric


def test_js_is_bounded_on_random_histograms():
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = rng.integers(0, 5, 20) * (rng.random(20) < 0.5)
        q = rng.integers(0, 5, 20)
        if p.sum() and q.sum():
            assert 0.0 <= js_distance(p, q) <= 1.0


def test_psi_known_values_and_smoothing():
    assert psi([5, 3, 2], [10, 6, 4]) == pytest.approx(0.0, abs=1e-12)
    expected = 0.25 * math.log(2) + 0.25 * math.log(1.5)  # (.5,.5) vs (.25,.75)
    assert psi([2, 2], [1, 3], eps=0.0) == pytest.approx(expected, rel=1e-12)
    disjoint = psi([1, 0], [0, 1])
    assert math.isfinite(disjoint) and disjoint > 10  # eps keeps it finite, but huge
    assert psi([3, 1, 0], [1, 3, 0]) == pytest.approx(psi([1, 3, 0], [3, 1, 0]))


def test_scores_reject_bad_input():
    with pytest.raises(ValueError):
        js_distance([0, 0], [1, 1])
    with pytest.raises(ValueError):
        js_distance([1, 1, 1], [1, 1])
    with pytest.raises(ConfigError, match="allowed: js, psi"):
        drift_score(Histogram(RMS), Histogram(RMS), "kl")


def test_drift_score_on_histograms_detects_a_shift():
    rng = np.random.default_rng(1)
    base, same, muffled = Histogram(RMS), Histogram(RMS), Histogram(RMS)
    base.add(rng.normal(-25, 3, 5000))
    same.add(rng.normal(-25, 3, 500))
    muffled.add(rng.normal(-43, 3, 500))
    assert drift_score(same, base, "js") < 0.15
    assert drift_score(muffled, base, "js") > 0.9
    assert drift_score(same, base, "psi") < 0.1 < 0.25 < drift_score(muffled, base, "psi")
    assert drift_score(Histogram(RMS), base) is None


# --- baselines ---------------------------------------------------------------------------
def _summary(start: float, end: float, values: dict[str, list[float]], utterances: int = 0
             ) -> WindowSummary:
    hists = empty_hists()
    for k, v in values.items():
        hists[k].add(v)
    counts = dict.fromkeys(("frames", "speech_frames", "accepted", "abstained",
                            "dropped_frames"), 0)
    counts["utterances"] = utterances
    return WindowSummary(start, end, end - start, counts, {}, hists)


def test_baseline_save_load_round_trip(tmp_path):
    s = _summary(0, 60, {"input_rms_dbfs": [-20.0, -25.0, -30.0], "snr_db": [30.0]})
    b = Baseline.from_summary("training", s, {"model": "digits-v1"})
    p = tmp_path / "calibration" / "digits-v1" / "baseline.json"
    b.save(p)
    c = Baseline.load(p)
    assert c.name == "training" and c.meta["model"] == "digits-v1" and c.meta["seconds"] == 60
    assert c.hists["input_rms_dbfs"] == b.hists["input_rms_dbfs"]
    assert not (tmp_path / "calibration" / "digits-v1" / "baseline.json.tmp").exists()


def test_baseline_load_errors_name_the_problem(tmp_path):
    with pytest.raises(AgentError, match="not found"):
        Baseline.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(AgentError, match="unreadable"):
        Baseline.load(bad)
    d = Baseline("x", {"input_rms_dbfs": Histogram([0.0, 1.0])}).to_dict()
    (tmp_path / "edges.json").write_text(json.dumps(d))
    with pytest.raises(AgentError, match="input_rms_dbfs has bin edges"):
        Baseline.load(tmp_path / "edges.json")


def test_device_baseline_learns_freezes_and_persists(tmp_path):
    path = tmp_path / "state" / "device-baseline.json"
    learner = DeviceBaselineLearner(120.0, path=path, meta={"model": "m1"})
    assert learner.add(_summary(0, 60, {"input_rms_dbfs": [-20.0]})) is None
    assert not learner.frozen and not path.exists()
    b = learner.add(_summary(60, 120, {"input_rms_dbfs": [-22.0, -24.0]}))
    assert b is not None and learner.frozen and path.exists()
    assert b.hists["input_rms_dbfs"].count == 3 and b.meta["learned_s"] == 120
    # frozen: later windows (even wildly different) do not change it
    assert learner.add(_summary(120, 180, {"input_rms_dbfs": [-70.0] * 50})) is None
    assert learner.baseline.hists["input_rms_dbfs"].count == 3
    # a restart picks it up; a different model relearns
    again = DeviceBaselineLearner.resume(path, 120.0, meta={"model": "m1"})
    assert again.frozen and again.baseline.hists["input_rms_dbfs"] == b.hists["input_rms_dbfs"]
    other = DeviceBaselineLearner.resume(path, 120.0, meta={"model": "m2"})
    assert not other.frozen and "m2" in other.note


def test_device_baseline_waits_for_enough_utterances():
    learner = DeviceBaselineLearner(60.0, min_utterances=5)
    assert learner.add(_summary(0, 60, {}, utterances=2)) is None  # silent start
    assert learner.add(_summary(60, 120, {"snr_db": [20.0]}, utterances=3)) is not None
    assert learner.baseline.meta["utterances"] == 5


def test_score_window_keeps_the_worst_baseline():
    rng = np.random.default_rng(2)
    train = _summary(0, 1, {"input_rms_dbfs": list(rng.normal(-25, 3, 2000))})
    device = _summary(0, 1, {"input_rms_dbfs": list(rng.normal(-40, 3, 2000))})
    w = _summary(0, 10, {"input_rms_dbfs": list(rng.normal(-40, 3, 200))})
    scores = score_window(w, [Baseline.from_summary("training", train),
                              Baseline.from_summary("device", device)])
    d = scores["input_rms_dbfs"]
    assert d.baseline == "training" and d.score > 0.8 and d.n == 200
    assert d.by_baseline["device"] < 0.3
    assert scores["snr_db"].score is None  # nothing observed


# --- alarm rules -------------------------------------------------------------------------
def _drift(metric: str, score: float | None, n: int = 100) -> dict[str, DriftScore]:
    return {metric: DriftScore(metric, score, "device", "js", n, {"device": score})}


def _run(tracker: AlarmTracker, scores: list[float | None], metric: str = "input_rms_dbfs",
         n: int = 100) -> list[tuple[int, str]]:
    events = []
    for i, s in enumerate(scores):
        w = _summary(i * 10.0, (i + 1) * 10.0, {})
        events += [(i, e.state) for e in tracker.update(w, _drift(metric, s, n))]
    return events


def test_raise_after_n_in_a_row_and_clear_after_m():
    t = AlarmTracker([AlarmRule("input_rms_dbfs", 0.5, raise_after=3, clear_after=2)])
    scores = [0.1, 0.6, 0.7, 0.1, 0.6, 0.7, 0.8, 0.9, 0.2, 0.9, 0.1, 0.1, 0.1]
    assert _run(t, scores) == [(6, "raised"), (11, "cleared")]
    assert t.active == frozenset()


def test_no_flapping_around_the_threshold():
    t = AlarmTracker([AlarmRule("input_rms_dbfs", 0.5, raise_after=2, clear_after=2)])
    assert _run(t, [0.6, 0.4] * 20) == []
    t2 = AlarmTracker([AlarmRule("input_rms_dbfs", 0.5, raise_after=2, clear_after=2)])
    events = _run(t2, [0.6, 0.6] + [0.4, 0.6] * 20)
    assert events == [(1, "raised")]  # raised once, never cleared by alternating windows
    assert "input_rms_dbfs" in t2.active


def test_min_count_windows_neither_raise_nor_clear():
    rule = AlarmRule("input_rms_dbfs", 0.5, raise_after=2, clear_after=2, min_count=10)
    t = AlarmTracker([rule])
    assert _run(t, [0.9] * 5, n=3) == []  # too few values: no evidence
    assert _run(t, [0.9, 0.9], n=50) == [(1, "raised")]
    assert _run(t, [0.1] * 5, n=3) == []  # still raised: thin windows cannot clear
    assert t.active == {"input_rms_dbfs"}
    assert _run(t, [None, 0.1, None, 0.1]) == [(3, "cleared")]  # gaps do not break a streak


def test_value_rules_and_event_contents():
    t = AlarmTracker([
        AlarmRule("snr_db", 10.0, raise_after=1, clear_after=1, on="value_low", stat="p50"),
        AlarmRule("queue_depth", 64, raise_after=1, clear_after=1, on="value_high", stat="max"),
    ])
    ev = t.update(_summary(0, 10, {"snr_db": [5.0, 6.0, 30.0], "queue_depth": [1.0, 2.0]}))
    assert [(e.metric, e.stage, e.state) for e in ev] == [("snr_db", "audio", "raised")]
    e = ev[0]
    assert e.threshold == 10.0 and e.window_end_s == 10 and e.value < 10
    assert "snr_db p50" in e.reason and "<=" in e.reason
    ev = t.update(_summary(10, 20, {"snr_db": [25.0], "queue_depth": [100.0]}))
    assert sorted((e.metric, e.state) for e in ev) == [("queue_depth", "raised"),
                                                      ("snr_db", "cleared")]


def test_drift_rule_against_a_named_baseline():
    rule = AlarmRule("confidence", 0.5, raise_after=1, clear_after=1, baseline="training")
    t = AlarmTracker([rule])
    d = {"confidence": DriftScore("confidence", 0.9, "device", "js", 50,
                                  {"device": 0.9, "training": 0.2})}
    assert t.update(_summary(0, 10, {}), d) == []  # the device baseline is not this rule's
    d2 = {"confidence": DriftScore("confidence", 0.9, "device", "js", 50,
                                   {"device": 0.9, "training": 0.7})}
    (e,) = t.update(_summary(10, 20, {}), d2)
    assert e.value == 0.7 and "training baseline" in e.reason


def test_reload_keeps_state_and_clears_removed_rules():
    r = AlarmRule("input_rms_dbfs", 0.5, raise_after=1, clear_after=5)
    t = AlarmTracker([r])
    assert _run(t, [0.9]) == [(0, "raised")]
    assert t.replace_rules([AlarmRule("input_rms_dbfs", 0.6, raise_after=1, clear_after=5)]) == []
    assert t.active == {"input_rms_dbfs"}  # same key: state survives the threshold change
    (e,) = t.replace_rules([AlarmRule("snr_db", 0.5)])
    assert (e.metric, e.state, e.value, e.reason) == ("input_rms_dbfs", "cleared", None,
                                                      "rule removed")
    assert t.active == frozenset()


# --- rules from config -------------------------------------------------------------------
def test_rules_from_both_toml_shapes():
    by_metric = rules_from_config({
        "input_rms_dbfs": {"threshold": 0.5, "raise_after": 2},
        "snr_db": [{"on": "value_low", "threshold": 10.0, "stat": "p50"},
                   {"threshold": 0.4, "min_count": 8}],
    })
    assert [(r.metric, r.on, r.threshold) for r in by_metric] == [
        ("input_rms_dbfs", "drift", 0.5), ("snr_db", "value_low", 10.0), ("snr_db", "drift", 0.4)]
    arr = rules_from_config([{"metric": "queue_depth", "on": "value_high", "threshold": 64}])
    assert arr[0].metric == "queue_depth" and arr[0].raise_after == 3
    assert len(rules_from_config(DEFAULT_ALARMS)) == len(DEFAULT_ALARMS)


@pytest.mark.parametrize("section, message", [
    ({"input_rms": {"threshold": 1}}, r"alarms\.input_rms: 'input_rms' is not a metric; "
                                      r"allowed: input_rms_dbfs"),
    ({"snr_db": {"threshold": 1, "on": "up"}}, r"alarms\.snr_db\.on: 'up' not allowed; "
                                               r"allowed: drift, value_high, value_low"),
    ({"snr_db": {"threshold": 1, "trheshold": 2}}, r"alarms\.snr_db\.trheshold: unknown key; "
                                                   r"allowed: on, threshold"),
    ({"snr_db": {"raise_after": 2}}, r"alarms\.snr_db\.threshold: missing"),
    ({"snr_db": {"threshold": "high"}}, r"alarms\.snr_db\.threshold: 'high' not allowed"),
    ({"snr_db": [{"threshold": 1}, {"threshold": 1, "raise_after": 0}]},
     r"alarms\.snr_db\[1\]\.raise_after: 0 not allowed; allowed: an integer >= 1"),
    ({"snr_db": {"threshold": 1, "stat": "p99"}}, r"alarms\.snr_db\.stat: 'p99' not allowed; "
                                                  r"allowed: mean, p50, p95, min, max"),
    ([{"metric": "snr_db", "threshold": 1}, {"metric": "snr_db", "threshold": 2}],
     r"alarms\[1\]: duplicates alarms\[0\]"),
    ([{"threshold": 1}], r"alarms\[0\]\.metric: None is not a metric"),
    ("nope", r"alarms: must be a table"),
])
def test_rule_config_errors_name_key_and_allowed(section, message):
    with pytest.raises(ConfigError, match=message) as info:
        rules_from_config(section)
    assert info.value.exit_code == 2


def test_default_rules_stay_quiet_on_a_stable_stream_and_fire_on_a_muffled_one():
    """End to end on synthetic windows: stable audio gives no alarm, a -18 dB drop does."""
    rng = np.random.default_rng(7)
    agg = WindowAggregator(10.0)

    def feed(t0: float, level: float, floor: float) -> None:
        for i in range(100):
            t = t0 + i * 0.1
            agg.observe("noise_floor_dbfs", rng.normal(floor, 1.5), t)
            if i % 25 == 0:
                agg.observe("input_rms_dbfs", rng.normal(level, 3), t)
                agg.observe("snr_db", rng.normal(level - floor, 3), t)

    for k in range(12):  # 2 minutes to learn from
        feed(k * 10.0, -25, -60)
    learner = DeviceBaselineLearner(120.0)
    for w in agg.advance(120.0):
        learner.add(w)
    assert learner.frozen
    tracker = AlarmTracker(rules_from_config(DEFAULT_ALARMS))
    trailing = Trailing(3)
    events = []
    for k in range(12, 42):  # 5 minutes: stable until 240 s, then muffled + noisy
        drifted = k * 10.0 >= 240
        feed(k * 10.0, -43 if drifted else -25, -50 if drifted else -60)
        for w in agg.advance((k + 1) * 10.0):
            view = trailing.add(w)
            events += tracker.update(view, score_window(view, [learner.baseline]))
    raised = [e for e in events if e.state == "raised"]
    assert raised and all(e.window_end_s > 240 for e in raised)
    assert min(e.window_end_s for e in raised) <= 240 + 60
    assert {e.stage for e in raised} == {"audio"}
