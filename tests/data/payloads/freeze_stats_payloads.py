#!/usr/bin/env python3
"""Freeze stats payloads: inputs and the exact bytes the payload code produces for them.

    python tests/data/payloads/freeze_stats_payloads.py > tests/data/payloads/stats_payloads.json

Why: building the payload is on the pipeline thread once per window and gets optimised; its
bytes must not change (operators' decoders, dedup by content, the schema). The committed
stats_payloads.json was written by the payload code BEFORE the per-window cost work (main at
5219f92); tests/test_payload_bytes.py rebuilds every case with today's code and compares bytes.
Re-running this script with newer code re-freezes whatever that code does: only do it for a
deliberate change of the payload (and say so in the commit).

Cases: real windows (the bundled demo recording looped through the agent's own pipeline and
monitor, 60 s and 10 s windows, the last partial one included), plus synthetic edge cases
(every bin filled, empty, one or two values, -inf levels, below k) and each option of
`stats_payload` (historical, utc source/synced, since_boot, active alarms, k, min_values).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import agent.monitoring.monitor  # noqa: E402
from agent import service  # noqa: E402
from agent.audio.sources import open_source  # noqa: E402
from agent.config import load  # noqa: E402
from agent.monitoring.drift import AlarmEvent, DriftScore  # noqa: E402
from agent.monitoring.metric_catalog import METRICS  # noqa: E402
from agent.monitoring.payloads import alarm_payload, payload_bytes, stats_payload  # noqa: E402
from agent.monitoring.windows import WindowSummary, empty_hists  # noqa: E402
from agent.resources import demo_audio  # noqa: E402

MODEL = {"name": "fsdd-digits", "version": "2.0.0", "sha256": "b5" * 32, "mode": "partial",
         "threshold": 0.746984, "slot": "bundled"}


def summary_to_json(s: WindowSummary) -> dict[str, Any]:
    return {"start_s": s.start_s, "end_s": s.end_s, "nominal_s": s.nominal_s,
            "counts": s.counts, "classes": s.classes, "windows": s.windows,
            "hists": {k: {f: v for f, v in h.to_dict().items() if f != "edges"}
                      for k, h in s.hists.items()}}  # edges: the catalogue's


def drift_to_json(drift: dict[str, DriftScore] | None) -> dict[str, Any] | None:
    if drift is None:
        return None
    return {k: {"metric": d.metric, "score": d.score, "baseline": d.baseline,
                "method": d.method, "n": d.n, "by_baseline": dict(d.by_baseline)}
            for k, d in drift.items()}


def pipeline_windows(window_s: float, seconds: float) -> list[tuple[WindowSummary, dict]]:
    """(summary, drift) exactly as the monitor hands them to stats_payload."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load(None, {"agent.state_dir": tmp, "monitoring.window_s": window_s})
        pipeline = service.build_pipeline(cfg)
        monitor = service.build_monitor(cfg, pipeline, "freeze", lambda m: None)
        out: list[tuple[WindowSummary, dict]] = []

        def recording(summary: WindowSummary, drift: Any, **kw: Any) -> dict[str, Any]:
            out.append((summary, dict(drift or {})))
            return stats_payload(summary, drift, **kw)

        pipeline.observers.append(monitor)
        clip = str(demo_audio())
        with mock.patch.object(agent.monitoring.monitor, "stats_payload", recording):
            while pipeline.clock_s < seconds:
                for block in open_source(clip, cfg.audio.block_ms, 0.0):
                    pipeline.feed(block)
            pipeline.finish()
            monitor.finish(pipeline.clock_s)
    return out


def synthetic() -> list[tuple[str, WindowSummary, dict | None]]:
    rng = np.random.default_rng(5)
    full = empty_hists()
    for m in METRICS:  # every bin of every metric non-empty (the size worst case)
        e = np.asarray(m.edges)
        centres = np.concatenate([[e[0] - 1.0], (e[:-1] + e[1:]) / 2, [e[-1] + 1.0]])
        full[m.name].add(np.repeat(centres, 7) + rng.normal(0, 1e-6, centres.size * 7))
        full[m.name].add(rng.uniform(e[0], e[-1], 1234))
    counts = {"frames": 2_000_000, "speech_frames": 900_000, "utterances": 400,
              "accepted": 363, "abstained": 37, "dropped_frames": 12, "state_write_errors": 1}
    classes = {str(d): 36 for d in range(10)} | {"unknown": 40}
    drift_all = {m.name: DriftScore(m.name, float(rng.uniform(0, 1)), "training", "js", 99,
                                    {"training": 0.5}) for m in METRICS}
    few = empty_hists()
    few["input_rms_dbfs"].add([-math.inf, -31.25])           # digital silence + one value
    few["input_peak_dbfs"].add(-3.0)                           # one value
    few["confidence"].add([0.91, 0.97, 0.42])                  # MEAN_MIN_VALUES exactly
    few["noise_floor_dbfs"].add(rng.normal(-62.0, 3.0, 500))  # not per utterance
    few["noise_floor_dbfs"].add([math.inf, math.nan])
    few["vad_speech_ratio"].add(0.123456789)
    few_counts = {"frames": 3000, "speech_frames": 40, "utterances": 3, "accepted": 2,
                  "abstained": 1, "dropped_frames": 0}
    partial_drift = {"input_rms_dbfs": DriftScore("input_rms_dbfs", None, None, "js", 2, {}),
                     "noise_floor_dbfs": DriftScore("noise_floor_dbfs", 0.00004999, "device",
                                                    "js", 500, {"device": 0.00004999})}
    return [
        ("synthetic every bin", WindowSummary(3600.0, 3660.0, 60.0, counts, classes, full),
         drift_all),
        ("synthetic empty", WindowSummary(120.0, 180.0, 60.0, dict.fromkeys(counts, 0), {},
                                          empty_hists()), {}),
        ("synthetic few values", WindowSummary(59.9995, 119.0004, 60.0, few_counts,
                                               {"3": 2, "unknown": 1}, few), partial_drift),
    ]


def case(name: str, s: WindowSummary, drift: dict | None, **opts: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {"device_id": "kitchen-pi-04", "boot_id": "4f1c2a9e0b7d4c3a",
                          "seq": 17, "model": MODEL, "utc_anchor": 1714564800.25,
                          "process": {"cpu_percent": 3.25, "rss_mb": 71.43219,
                                      "uptime_s": 3600.0, "threads": 7}}
    kw.update(opts)
    payload = stats_payload(s, drift, **kw)
    return {"name": name, "summary": summary_to_json(s), "drift": drift_to_json(drift),
            "kwargs": {**kw, "active_alarms": sorted(kw.get("active_alarms", ()))},
            "bytes": payload_bytes(payload).decode("utf-8")}


def main() -> None:
    cases = []
    long = pipeline_windows(60.0, 180.0)
    for i, (s, d) in enumerate(long[:3]):
        cases.append(case(f"demo 60 s window {i}", s, d, seq=i,
                          since_boot={"windows": i + 1, "frames": 2000 * (i + 1)}))
    short = pipeline_windows(10.0, 40.0)
    for i, (s, d) in enumerate(short):
        cases.append(case(f"demo 10 s window {i}{' (partial)' if s.partial else ''}", s, d,
                          seq=i, active_alarms={"snr_db", "audio_outage_s"},
                          utc_source="file", utc_synced=False))
    s, d = long[1]
    cases.append(case("demo 60 s window, historical, k=5, min_values=4", s, d,
                      historical=True, k=5, min_values=4, utc_synced=True))
    for name, s, d in synthetic():
        cases.append(case(name, s, d, active_alarms={"input_rms_dbfs"}))
    alarm = alarm_payload(AlarmEvent("input_rms_dbfs", "audio", "raised", 0.71234567, 0.7,
                                     3600.0004, "input_rms_dbfs JS distance 0.712 >= 0.7"),
                          device_id="kitchen-pi-04", boot_id="4f1c2a9e0b7d4c3a", seq=3)
    # one case per line: reviewable diffs, no indentation bulk
    lines = [json.dumps(c, separators=(",", ":")) for c in cases]
    print('{"frozen_at":"5219f92","alarm":' + json.dumps(payload_bytes(alarm).decode("utf-8"))
          + ',"cases":[\n' + ",\n".join(lines) + "\n]}")


if __name__ == "__main__":
    main()
