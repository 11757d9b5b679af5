"""The stats payload's bytes are frozen: optimising how it is built must not change them.

tests/data/payloads/stats_payloads.json holds inputs (real windows of the demo recording from
the agent's own pipeline and monitor, plus synthetic edge cases) and the exact bytes the payload
code produced for them before its per-window cost was cut (see freeze_stats_payloads.py there).
"""

from __future__ import annotations

import copy
import json
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agent.monitoring.drift import AlarmEvent, DriftScore
from agent.monitoring.metric_catalog import spec
from agent.monitoring.payloads import alarm_payload, iso_utc, payload_bytes, stats_payload
from agent.monitoring.windows import Histogram, WindowSummary
from agent.telemetry.message import Message, json_bytes

FROZEN = json.loads((Path(__file__).parent / "data" / "payloads" /
                     "stats_payloads.json").read_text())
CASES = FROZEN["cases"]


def summary_from(d: dict[str, Any]) -> WindowSummary:
    hists = {k: Histogram.from_dict({"edges": spec(k).edges, **h}) for k, h in d["hists"].items()}
    return WindowSummary(d["start_s"], d["end_s"], d["nominal_s"], dict(d["counts"]),
                         dict(d["classes"]), hists, d["windows"])


def drift_from(d: dict[str, Any] | None) -> dict[str, DriftScore] | None:
    return None if d is None else {k: DriftScore(**v) for k, v in d.items()}


def build(case: dict[str, Any]) -> dict[str, Any]:
    kw = dict(case["kwargs"])
    kw["active_alarms"] = frozenset(kw["active_alarms"])
    return stats_payload(summary_from(case["summary"]), drift_from(case["drift"]), **kw)


def test_the_frozen_cases_cover_what_they_claim():
    names = [c["name"] for c in CASES]
    assert sum(n.startswith("demo ") for n in names) >= 8
    assert any("partial" in n for n in names)
    encoded = [json.loads(c["bytes"]) for c in CASES]
    # below k and at or above k, suppressed and published classes, drift in every state
    assert {p["outputs"]["suppressed"] for p in encoded} == {True, False}
    assert {e["state"] for p in encoded for e in p["drift"].values()} == {"ok", "alarm",
                                                                          "no_data"}
    assert any(p["metrics"]["input_rms_dbfs"]["p50"] is None and
               p["metrics"]["input_rms_dbfs"]["count"] > 0 for p in encoded)
    assert any(p["historical"] for p in encoded) and any("since_boot" in p for p in encoded)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_stats_payload_bytes_are_unchanged(case):
    p = build(case)
    want = case["bytes"].encode("utf-8")
    assert payload_bytes(p) == want
    assert json_bytes(p) == want  # what the outbox stores and the broker carries
    assert p == json.loads(want)
    line = json.loads(Message("eva/kitchen-pi-04/stats", p).to_json_line())
    assert json_bytes(line["payload"]) == want


def vandalise(x: Any) -> None:
    """Add to every dict and list inside `x`, depth first."""
    if isinstance(x, dict):
        for v in x.values():
            vandalise(v)
        x["vandalised"] = True
    elif isinstance(x, list):
        for v in x:
            vandalise(v)
        x.append(-1)


def test_payloads_share_no_mutable_parts():
    """A caller may edit its payload (the monitor adds sections; tests strip fields): that must
    not leak into another window's payload through anything cached between calls."""
    for case in (CASES[0], CASES[-1], CASES[-2]):  # real, few values, empty
        first, second = build(case), build(case)
        want = copy.deepcopy(second)
        vandalise(first)
        assert second == want
        assert payload_bytes(build(case)) == case["bytes"].encode("utf-8")


def test_alarm_payload_bytes_are_unchanged():
    p = alarm_payload(AlarmEvent("input_rms_dbfs", "audio", "raised", 0.71234567, 0.7,
                                 3600.0004, "input_rms_dbfs JS distance 0.712 >= 0.7"),
                      device_id="kitchen-pi-04", boot_id="4f1c2a9e0b7d4c3a", seq=3)
    assert payload_bytes(p) == FROZEN["alarm"].encode("utf-8")


def test_iso_utc_matches_the_strftime_form_it_replaced():
    """iso_utc formats with isoformat now (cheaper); the strftime form is the reference,
    including half-millisecond ties, leap days, and years before 1000 (unpadded there)."""
    def reference(epoch_s: float) -> str:
        dt = datetime.fromtimestamp(round(epoch_s, 3), tz=UTC)
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"

    rng = random.Random(3)
    values = [0.0, 0.0005, 0.0015, 59.9995, 1714564800.25, 1709164799.9995, 951782400.0,
              4102444799.9999, -1.0, -0.0004, -31_000_000_000.5]
    values += [rng.uniform(-1e9, 4.2e9) for _ in range(3000)]
    values += [round(rng.uniform(1.6e9, 1.8e9), 3) + 0.0005 for _ in range(1000)]
    for v in values:
        assert iso_utc(v) == reference(v), v
