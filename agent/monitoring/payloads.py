"""Build the stats and alarm payloads (schema 1, docs/stats.schema.json, docs/alarm.schema.json).

Pure functions: the caller passes the window, drift scores, identity and process figures, and a
wall-clock anchor for audio time 0 (the only place wall time enters: to label windows in UTC).

Encoding choices that keep a payload with every metric filled far below 8 KB:
* `hist` is run-trimmed: [first_bin, count, count, ...] -- the counts of consecutive bins from
  the first to the last non-empty one ([] when empty); bin indices as in
  agent.monitoring.metric_catalog (0 = underflow, len(edges) = overflow). Edges are not repeated:
  they are part of schema 1. `Histogram.from_compact(spec.edges, hist, ...)` rebuilds it on the
  operator side.
* floats are rounded to 5 significant digits (window bounds to 1 ms, drift scores to 4
  decimals); counts are exact, so operators can still merge histograms exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from agent.monitoring.drift import AlarmEvent, DriftScore
from agent.monitoring.metric_catalog import (
    DRIFT_ONLY,
    MEAN_MIN_VALUES,
    METRICS,
    PER_UTTERANCE,
    MetricSpec,
)
from agent.monitoring.privacy import DEFAULT_K, class_outputs
from agent.monitoring.windows import Histogram, WindowSummary
from agent.telemetry.message import json_bytes

STATS_SCHEMA = 1
ALARM_SCHEMA = 1
MAX_PAYLOAD_BYTES = 8192
ACCURACY_METHOD = "mean_calibrated_top_probability"
ACCURACY_VALID_IF = "calibration_holds"
COUNTS = ("frames", "speech_frames", "utterances", "accepted", "abstained", "dropped_frames",
          "state_write_errors")
WAKE_COUNTS = ("wakes", "wake_commands", "wakes_unused")  # wake mode only, like its metrics


# Room for the command model's class names in a wake-mode payload: the wake stage's two
# histograms, three counts and their drift entries take ~535 B of the 8 KB, so a worst-case
# window fits when the names take at most this many bytes (`class_names_bytes`; measured in
# tests/test_privacy_payloads.py). In always mode every vocabulary the word rule allows fits.
WAKE_CLASS_NAMES_BUDGET = 240


def class_names_bytes(classes: Sequence[str]) -> int:
    """What a vocabulary's names take in `outputs.classes`: each quoted name, colon, comma."""
    return sum(len(json_bytes(c)) + 2 for c in classes)


def payload_bytes(payload: Any) -> bytes:
    """Compact UTF-8 JSON, the same encoding the telemetry sinks put on the wire."""
    return json_bytes(payload)


@functools.lru_cache(maxsize=4)  # a window's end is the next window's start
def iso_utc(epoch_s: float) -> str:
    """ISO 8601 UTC with milliseconds and a Z: 2024-05-01T12:00:00.000Z."""
    dt = datetime.fromtimestamp(round(epoch_s, 3), tz=UTC)
    if dt.year < 1000:  # strftime does not pad the year to 4 digits, isoformat does
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
    # isoformat truncates to milliseconds like `microsecond // 1000`; cheaper than strftime
    return dt.isoformat(timespec="milliseconds")[:-6] + "Z"  # "+00:00" -> "Z"


def _anchor_epoch(utc_anchor: float | datetime) -> float:
    if isinstance(utc_anchor, datetime):
        if utc_anchor.tzinfo is None:
            raise ValueError("utc_anchor must be timezone-aware (wall time at audio time 0)")
        return utc_anchor.timestamp()
    return float(utc_anchor)


def _num(x: float | None, digits: int = 5) -> float | None:
    """Round to `digits` significant digits; None stays None."""
    return None if x is None else float(f"{x:.{digits}g}")


def _num5(x: float) -> float:
    """`_num(x)` for a float, the hot path (~75 per window): no per-call format spec."""
    return float(f"{x:.5g}")


_QS = (0.5, 0.95)


def metric_entry(spec: MetricSpec, h: Histogram, min_values: int = 1,
                 distribution_min: int = 1) -> dict[str, Any]:
    """One `metrics` entry. Below `min_values` values only stage and count are published;
    below `distribution_min` also the mean, but no min, max, quantiles or histogram."""
    n, (p50, p95), hist = h.digest(_QS, max(min_values, distribution_min))
    if n == 0 or n < min_values:
        return {"stage": spec.stage, "count": n, "mean": None, "min": None, "max": None,
                "p50": None, "p95": None, "hist": []}
    if n < distribution_min:
        return {"stage": spec.stage, "count": n, "mean": _num5(h.sum / n), "min": None,
                "max": None, "p50": None, "p95": None, "hist": []}
    return {"stage": spec.stage, "count": n, "mean": _num5(h.sum / n), "min": _num5(h.min),
            "max": _num5(h.max), "p50": _num5(p50), "p95": _num5(p95),  # type: ignore[arg-type]
            "hist": hist}


def drift_entry(d: DriftScore | None, active: bool) -> dict[str, Any]:
    """One `drift` entry; state is alarm (a rule on the metric is raised), ok, or no_data."""
    if d is None or d.score is None:
        return {"score": None, "baseline": None, "state": "alarm" if active else "no_data"}
    return {"score": round(d.score, 4), "baseline": d.baseline,
            "state": "alarm" if active else "ok"}


def stats_payload(summary: WindowSummary, drift: Mapping[str, DriftScore] | None, *,
                  device_id: str, boot_id: str, seq: int, model: Mapping[str, Any],
                  process: Mapping[str, Any], utc_anchor: float | datetime,
                  historical: bool = False, k: int = DEFAULT_K,
                  active_alarms: Collection[str] = (),
                  catalog: Sequence[MetricSpec] = METRICS, min_values: int = 1,
                  utc_source: str = "wall", utc_synced: bool | None = None,
                  since_boot: Mapping[str, int] | None = None,
                  wake_stage: bool = False) -> dict[str, Any]:
    """The `{prefix}/{device_id}/stats` payload for one closed window (or roll-up).

    `since_boot` (the boot's cumulative counters including this window, see `SinceBoot`) lets
    fleet replicas that each see only part of the messages stay exact.

    `utc_anchor` is the wall-clock time (epoch seconds or an aware datetime) of audio time 0;
    `utc_source` says how it was taken (`wall`: the live wall clock, re-anchored on a step;
    `file`: a replayed file's audio clock from the start of processing, not live) and
    `utc_synced` whether that wall clock was synchronised (None: unknown); see agent.daemon.clock.
    `wake_stage`: the device runs in wake mode (agent/recognition/wake.py); only then are the wake
    stage's metrics and counts in the payload. `estimated_accuracy` is the mean calibrated top
    probability of the window's decisions; it estimates accuracy only while the model's calibration
    holds, which the payload states.
    """
    t0 = _anchor_epoch(utc_anchor)
    drift = drift or {}
    catalog = [m for m in catalog if wake_stage or m.stage != "wake"]
    hists = summary.hists
    # per-utterance metrics (metric_catalog.PER_UTTERANCE): no individual values, see there
    utt_min = max(min_values, MEAN_MIN_VALUES)
    metrics = {}
    for m in catalog:
        name = m.name
        h = hists.get(name)
        if h is None:
            h = Histogram(m.edges)
        metrics[name] = (metric_entry(m, h, utt_min, k) if name in PER_UTTERANCE
                         else metric_entry(m, h, min_values))
    # the probability that the recognised digit is right, averaged: an accuracy estimate
    conf = hists.get("digit_confidence")
    if conf is None or conf.count == 0:
        conf = hists.get("confidence")
    n_conf = conf.count if conf is not None else 0
    if n_conf < MEAN_MIN_VALUES:  # one or two decisions' confidence is theirs alone
        n_conf = 0
    counts = summary.counts
    out = {
        "schema": STATS_SCHEMA,
        "device_id": device_id,
        "boot_id": boot_id,
        "seq": int(seq),
        "historical": bool(historical),
        "window": {"start_s": round(summary.start_s, 3), "end_s": round(summary.end_s, 3),
                   "start_utc": iso_utc(t0 + summary.start_s),
                   "end_utc": iso_utc(t0 + summary.end_s),
                   "utc_source": utc_source, "utc_synced": utc_synced},
        "counts": {k_: int(counts.get(k_, 0))
                   for k_ in COUNTS + (WAKE_COUNTS if wake_stage else ())},
        "metrics": metrics,
        "drift": {m.name: drift_entry(drift.get(m.name), m.name in active_alarms)
                  for m in (*catalog, *DRIFT_ONLY)},  # class_distribution: None below k
        "estimated_accuracy": {"value": _num(conf.mean, 4) if n_conf else None, "n": n_conf,
                               "method": ACCURACY_METHOD, "valid_if": ACCURACY_VALID_IF},
        "outputs": class_outputs(summary.classes, counts.get("utterances", 0), k),
        "model": dict(model),
        "process": {key: (_num5(v) if isinstance(v, float) else v)
                    for key, v in process.items()},
    }
    if since_boot is not None:
        out["since_boot"] = {k_: int(v) for k_, v in since_boot.items()}
    return out


class SinceBoot:
    """The boot's cumulative counters, carried in every stats payload (`since_boot`).

    A window's own counts are deltas: summing them is exact only for a receiver that sees each
    window exactly once. The running totals make the value idempotent per (device, boot, seq),
    so receivers that each see a share of the messages, duplicated or reordered, agree on the
    total by taking the one with the highest seq.
    """

    FIELDS = ("windows", "frames", "speech_frames", "utterances", "accepted", "abstained",
              "dropped_frames")

    def __init__(self) -> None:
        self.totals = dict.fromkeys(self.FIELDS, 0)

    def add(self, summary: WindowSummary) -> dict[str, int]:
        """Count one closed window in; returns a copy of the totals including it."""
        self.totals["windows"] += 1
        for k_ in self.FIELDS[1:]:
            self.totals[k_] += int(summary.counts.get(k_, 0))
        return dict(self.totals)


def alarm_payload(event: AlarmEvent, *, device_id: str, boot_id: str, seq: int
                  ) -> dict[str, Any]:
    """The `{prefix}/{device_id}/alarm` payload for one raised/cleared transition."""
    return {
        "schema": ALARM_SCHEMA,
        "device_id": device_id,
        "boot_id": boot_id,
        "seq": int(seq),
        "metric": event.metric,
        "stage": event.stage,
        "state": event.state,
        "value": _num(event.value),
        "threshold": float(event.threshold),
        "window_end_s": round(event.window_end_s, 3),
        "reason": event.reason,
    }
