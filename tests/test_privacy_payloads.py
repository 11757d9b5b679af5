"""k-suppression, the payload privacy check, payload builders against the JSON Schemas, size."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from jsonschema import Draft202012Validator

from agent.monitoring.drift import AlarmEvent, AlarmRule, AlarmTracker, DriftScore
from agent.monitoring.metric_catalog import DRIFT_ONLY, EVENT_ALARMS, METRICS, STAGES
from agent.monitoring.payloads import (
    MAX_PAYLOAD_BYTES,
    SinceBoot,
    alarm_payload,
    iso_utc,
    payload_bytes,
    stats_payload,
)
from agent.monitoring.privacy import DEFAULT_K, assert_private, class_outputs, find_violations
from agent.monitoring.windows import Histogram, WindowAggregator, WindowSummary, empty_hists

DOCS = Path(__file__).resolve().parents[1] / "docs"
STATS = Draft202012Validator(json.loads((DOCS / "stats.schema.json").read_text()))
ALARM = Draft202012Validator(json.loads((DOCS / "alarm.schema.json").read_text()))
ANCHOR = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
MODEL = {"name": "digits-mlp", "version": "1.0.0", "sha256": "ab" * 32, "mode": "partial",
         "threshold": 0.72}
PROCESS = {"cpu_percent": 3.25, "rss_mb": 71.4, "uptime_s": 3600.0}
IDS = {"device_id": "kitchen-pi-04", "boot_id": "4f1c2a9e0b7d4c3a", "seq": 0}


def _valid(validator: Draft202012Validator, payload: dict) -> list[str]:
    return [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(payload)]


def _full_summary(classes: int = 11, utterances: int = 400) -> WindowSummary:
    """Worst case for size: every bin of every metric non-empty, big counts, many classes."""
    rng = np.random.default_rng(0)
    hists = empty_hists()
    for m in METRICS:
        e = np.asarray(m.edges)
        centres = np.concatenate([[e[0] - 1.0], (e[:-1] + e[1:]) / 2, [e[-1] + 1.0]])
        hists[m.name].add(np.repeat(centres, 1000) + rng.normal(0, 1e-6, centres.size * 1000))
        hists[m.name].add(rng.uniform(e[0], e[-1], 12345))
    counts = {"frames": 2_000_000, "speech_frames": 900_000, "utterances": utterances,
              "accepted": utterances - 37, "abstained": 37, "dropped_frames": 12}
    names = [str(d) for d in range(classes - 1)] + ["unknown"]
    cls = {c: utterances // classes for c in names}
    return WindowSummary(3600.0, 3660.0, 60.0, counts, cls, hists)


def _drift_all(score: float = 0.123456) -> dict[str, DriftScore]:
    return {m.name: DriftScore(m.name, score, "training", "js", 100, {"training": score})
            for m in (*METRICS, *DRIFT_ONLY)}


# --- suppression -------------------------------------------------------------------------
def test_classes_suppressed_below_k():
    few = {"1": 1, "9": 1, "8": 1, "4": 1}
    assert class_outputs(few, utterances=4) == {"classes": None, "suppressed": True}
    assert class_outputs({"3": 19}, utterances=19)["suppressed"] is True
    assert class_outputs({"3": 10, "4": 10}, utterances=20) == {
        "classes": {"3": 10, "4": 10}, "suppressed": False}
    # the anonymity set is the smaller of utterances and decided ones
    assert class_outputs({"3": 5}, utterances=50)["suppressed"] is True
    assert class_outputs({"3": 30}, utterances=5)["suppressed"] is True
    assert class_outputs({"3": 2}, utterances=2, k=2)["suppressed"] is False
    assert DEFAULT_K == 20


def test_pin_in_a_quiet_minute_cannot_be_read_from_the_payload():
    agg = WindowAggregator(60.0)
    agg.count("frames", 2000, now_s=0.0)
    for i, digit in enumerate("1984"):
        t = 10.0 + 2.0 * i
        agg.count("utterances", 1, t)
        agg.observe("utterance_length_s", 0.5, t)
        agg.record_decision(digit, True, t + 0.3, confidence=0.95, margin=0.9)
    (w,) = agg.advance(60.0)
    p = stats_payload(w, None, utc_anchor=ANCHOR, model=MODEL, process=PROCESS, **IDS)
    assert p["outputs"] == {"classes": None, "suppressed": True}
    assert find_violations(p) == []

    def strings(x):
        if isinstance(x, dict):
            for k, v in x.items():
                yield str(k)
                yield from strings(v)
        elif isinstance(x, list):
            for v in x:
                yield from strings(v)
        elif isinstance(x, str):
            yield x

    assert not {"1", "9", "8", "4", "1984"} & set(strings(p))
    assert _valid(STATS, p) == []


def test_privacy_check_flags_per_utterance_content():
    p = stats_payload(_full_summary(), _drift_all(), utc_anchor=ANCHOR, model=MODEL,
                      process=PROCESS, **IDS)
    assert find_violations(p) == []
    assert_private(p)
    leaky = copy.deepcopy(p)
    leaky["window"]["utterances"] = [{"label": "7", "start": 1.0, "end": 1.5, "decided_at": 2}]
    found = find_violations(leaky)
    assert {"window.utterances[0].label: forbidden key",
            "window.utterances[0].start: forbidden key",
            "window.utterances[0].decided_at: forbidden key"} <= set(found)
    leaky = copy.deepcopy(p)
    leaky["audio"] = list(range(8000))
    assert any("audio" in f for f in find_violations(leaky))
    assert any("list of 8000" in f for f in find_violations(leaky))
    leaky = copy.deepcopy(p)
    leaky["model"]["name"] = "x" * 500
    assert find_violations(leaky) == ["model.name: string of 500 characters (> 200)"]
    leaky = copy.deepcopy(p)
    leaky["counts"]["utterances"] = 5
    assert any("< k=20" in f for f in find_violations(leaky))
    leaky = copy.deepcopy(p)
    leaky["outputs"] = {"classes": None, "suppressed": False}
    assert find_violations(leaky) == ["outputs.suppressed: must be true when classes are withheld"]
    with pytest.raises(ValueError, match="forbidden key"):
        assert_private({"text": "open the door"})


def test_class_names_are_not_mistaken_for_forbidden_keys():
    s = _full_summary()
    s.classes = {"start": 30, "end": 30}
    p = stats_payload(s, None, utc_anchor=ANCHOR, model=MODEL, process=PROCESS, **IDS)
    assert p["outputs"]["suppressed"] is False and find_violations(p) == []


# --- stats payload -----------------------------------------------------------------------
def test_full_stats_payload_validates_and_fits_in_8_kb():
    big = dict(zip(SinceBoot.FIELDS, (525_600, 3_153_600_000, 1_500_000_000, 9_999_999,
                                      9_000_000, 999_999, 99_999_999), strict=True))  # a year
    p = stats_payload(_full_summary(), _drift_all(), utc_anchor=ANCHOR, model=MODEL,
                      process=PROCESS, historical=True, active_alarms={"snr_db"},
                      device_id="d" * 64, boot_id="b" * 64, seq=123456789, since_boot=big)
    assert _valid(STATS, p) == []
    for m in METRICS:
        if m.stage == "wake":  # published in wake mode only (below)
            assert m.name not in p["metrics"]
            continue
        entry = p["metrics"][m.name]
        assert entry["count"] > 0 and len(entry["hist"]) == m.bins + 1  # every bin filled
    size = len(payload_bytes(p))
    print(f"full stats payload: {size} bytes")
    assert size <= MAX_PAYLOAD_BYTES
    # "well under": at least 9 % headroom in this worst case (every bin of every metric
    # filled, a year-long boot's since_boot totals: ~170 B of it); real windows are ~5.3 KB.
    # (15 % until the three action/socket metrics of agent/actions took ~650 B of it; 10 %
    # until the class_distribution drift entry took 73 B: 7,444 B here.)
    assert size <= 0.91 * MAX_PAYLOAD_BYTES
    # wake mode adds the wake stage (two small histograms, three counts): still under 8 KB
    # (7,904 bytes in this worst case when it was added)
    woke = stats_payload(_full_summary(), _drift_all(), utc_anchor=ANCHOR, model=MODEL,
                         process=PROCESS, historical=True, active_alarms={"snr_db"},
                         device_id="d" * 64, boot_id="b" * 64, seq=123456789, since_boot=big,
                         wake_stage=True)
    assert _valid(STATS, woke) == []
    assert {"wake_score", "wake_latency_ms"} <= set(woke["metrics"])
    assert {"wakes", "wake_commands", "wakes_unused"} <= set(woke["counts"])
    assert len(payload_bytes(woke)) <= MAX_PAYLOAD_BYTES


def test_stats_payload_content():
    s = _full_summary()
    p = stats_payload(s, _drift_all(0.5), utc_anchor=ANCHOR.timestamp(), model=MODEL,
                      process=PROCESS, active_alarms={"snr_db"}, utc_source="file",
                      utc_synced=True, **IDS)
    assert p["schema"] == 1 and p["historical"] is False
    assert p["window"] == {"start_s": 3600.0, "end_s": 3660.0,
                           "start_utc": "2024-05-01T13:00:00.000Z",
                           "end_utc": "2024-05-01T13:01:00.000Z",
                           "utc_source": "file", "utc_synced": True}
    assert p["counts"]["utterances"] == 400 and p["counts"]["dropped_frames"] == 12
    assert p["outputs"]["suppressed"] is False and sum(p["outputs"]["classes"].values()) > 0
    rms = p["metrics"]["input_rms_dbfs"]
    h = s.hists["input_rms_dbfs"]
    assert rms["stage"] == "audio" and rms["count"] == h.count
    assert rms["p50"] == pytest.approx(h.quantile(0.5), rel=1e-4)
    assert sum(rms["hist"][1:]) == h.count  # the compact hist keeps exact counts
    back = Histogram.from_compact(METRICS[0].edges, rms["hist"], min=rms["min"], max=rms["max"],
                                  mean=rms["mean"])
    assert back.counts.tolist() == h.counts.tolist()
    assert p["drift"]["snr_db"]["state"] == "alarm"
    assert p["drift"]["input_rms_dbfs"] == {"score": 0.5, "baseline": "training", "state": "ok"}
    acc = p["estimated_accuracy"]
    assert acc["value"] == pytest.approx(s.hists["digit_confidence"].mean, abs=1e-4)
    assert acc["n"] == s.hists["digit_confidence"].count and acc["valid_if"] == "calibration_holds"


def test_empty_window_payload_validates():
    (w,) = WindowAggregator(10.0).advance(10.0)
    p = stats_payload(w, {}, utc_anchor=ANCHOR, model={"name": "m"},
                      process={"cpu_percent": None, "rss_mb": None}, **IDS)
    assert _valid(STATS, p) == []
    assert all(e["count"] == 0 and e["mean"] is None and e["hist"] == []
               for e in p["metrics"].values())
    assert all(d == {"score": None, "baseline": None, "state": "no_data"}
               for d in p["drift"].values())
    assert p["estimated_accuracy"]["value"] is None
    assert p["outputs"] == {"classes": None, "suppressed": True}


def test_min_values_withholds_statistics_of_thin_metrics():
    agg = WindowAggregator(10.0)
    agg.observe("utterance_length_s", 0.61, now_s=1.0)
    (w,) = agg.advance(10.0)
    p = stats_payload(w, None, utc_anchor=ANCHOR, model={"name": "m"},
                      process={"cpu_percent": 1.0, "rss_mb": 60.0}, min_values=3, **IDS)
    assert p["metrics"]["utterance_length_s"] == {
        "stage": "vad", "count": 1, "mean": None, "min": None, "max": None, "p50": None,
        "p95": None, "hist": []}
    assert _valid(STATS, p) == []


def test_schema_is_strict():
    p = stats_payload(_full_summary(), _drift_all(), utc_anchor=ANCHOR, model=MODEL,
                      process=PROCESS, **IDS)
    bad = copy.deepcopy(p)
    bad["transcript"] = "one nine eight four"
    assert _valid(STATS, bad)
    bad = copy.deepcopy(p)
    bad["outputs"]["suppressed"] = True  # classes present but marked suppressed
    assert _valid(STATS, bad)
    bad = copy.deepcopy(p)
    bad["metrics"]["input_rms_dbfs"]["samples"] = [0.1, 0.2]
    assert _valid(STATS, bad)
    bad = copy.deepcopy(p)
    bad["metrics"]["made_up"] = bad["metrics"]["snr_db"]
    assert _valid(STATS, bad)
    bad = copy.deepcopy(p)
    bad["window"]["start_utc"] = "2024-05-01 13:00:00"
    assert _valid(STATS, bad)


def test_schemas_match_the_catalogue():
    schema = json.loads((DOCS / "stats.schema.json").read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["properties"]["metrics"]["propertyNames"]["enum"] == [m.name for m in METRICS]
    assert schema["$defs"]["metric"]["properties"]["stage"]["enum"] == list(STAGES)
    alarm = json.loads((DOCS / "alarm.schema.json").read_text())
    assert alarm["properties"]["metric"]["enum"] == [m.name for m in METRICS] + \
        list(EVENT_ALARMS)
    Draft202012Validator.check_schema(schema)
    Draft202012Validator.check_schema(alarm)


def test_since_boot_totals_accumulate_and_validate():
    totals = SinceBoot()
    windows = [_full_summary(utterances=n) for n in (40, 37, 50)]
    payloads = [stats_payload(w, None, utc_anchor=ANCHOR, model=MODEL, process=PROCESS,
                              since_boot=totals.add(w), **IDS) for w in windows]
    for i, p in enumerate(payloads):
        assert _valid(STATS, p) == []
        assert p["since_boot"]["windows"] == i + 1
        for k in SinceBoot.FIELDS[1:]:
            assert p["since_boot"][k] == sum(w.counts.get(k, 0) for w in windows[:i + 1])
    assert payloads[0]["since_boot"] is not payloads[1]["since_boot"]  # a copy per payload
    bad = copy.deepcopy(payloads[0])
    bad["since_boot"]["utterances"] = -1
    assert _valid(STATS, bad)
    bad["since_boot"] = {"windows": 1}
    assert _valid(STATS, bad)
    assert "since_boot" not in stats_payload(windows[0], None, utc_anchor=ANCHOR, model=MODEL,
                                             process=PROCESS, **IDS)


def test_iso_utc_and_naive_anchor():
    assert iso_utc(0.0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(1714564800.25) == "2024-05-01T12:00:00.250Z"
    (w,) = WindowAggregator(10.0).advance(10.0)
    with pytest.raises(ValueError, match="timezone-aware"):
        stats_payload(w, None, utc_anchor=datetime(2024, 5, 1), model={"name": "m"},
                      process={"cpu_percent": 0.0, "rss_mb": 1.0}, **IDS)


# --- alarm payload -----------------------------------------------------------------------
def test_alarm_payload_from_tracker_validates():
    t = AlarmTracker([AlarmRule("snr_db", 10.0, raise_after=1, clear_after=1, on="value_low")])
    hists = empty_hists()
    hists["snr_db"].add([3.0, 4.0])
    counts = dict.fromkeys(("frames", "speech_frames", "utterances", "accepted", "abstained",
                            "dropped_frames"), 0)
    (e,) = t.update(WindowSummary(240.0, 250.0, 10.0, counts, {}, hists))
    p = alarm_payload(e, **IDS)
    assert _valid(ALARM, p) == []
    assert p == {"schema": 1, **IDS, "metric": "snr_db", "stage": "audio", "state": "raised",
                 "value": 3.5, "threshold": 10.0, "window_end_s": 250.0, "reason": e.reason}
    assert find_violations(p) == []
    cleared = AlarmEvent("snr_db", "audio", "cleared", None, 10.0, 260.0, "rule removed")
    assert _valid(ALARM, alarm_payload(cleared, **IDS)) == []
    bad = alarm_payload(cleared, **IDS) | {"state": "flapping"}
    assert _valid(ALARM, bad)
    assert len(payload_bytes(p)) < 1024
