"""What `fleet serve` keeps from the messages: a FleetState plus what the exporter, the page and
the history need, fed one message at a time by the MQTT thread.

Pure (no I/O; history rows go to a `sink` callable) and single-writer; readers take `lock`.
Each payload is decoded once and handed to `FleetState` as a dict, so `/api/fleet.json` is
exactly `fleet watch --json`.

Exact totals across replicas: every stats payload carries the boot's cumulative counters
(`since_boot`). For each (device, boot) we keep the values of the highest seq seen, which are
the same whichever replica saw it and however often: `max by (device, boot)` over replicas,
summed, is the fleet's exact total (docs/fleet.md). Windows' own counts (deltas) are summed
per (model, version, rollout, cohort) too: exact per replica, and over replicas whenever the
broker delivers each message to one replica only.
"""

from __future__ import annotations

import math
import threading
import time
from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agent.fleet.state import FleetState, _decode, _Invalid, group_key
from agent.metric_catalog import METRICS
from agent.payloads import SinceBoot
from agent.telemetry.message import DEFAULT_PREFIX

CUMULATIVE = SinceBoot.FIELDS          # windows, frames, speech_frames, utterances, ...
MAX_BOOTS = 4                          # boots kept per device for the cumulative series
RECENT = 16                            # windows per device kept for the drill-down plots
RECENT_FIELDS = ("end", "utterances", "accepted", "abstained", "accuracy", "rms_dbfs")
METRIC_NAMES = tuple(m.name for m in METRICS)
DEVICE_METRICS = frozenset({"input_rms_dbfs"})  # metrics summed per device (see FleetState)
_NAN = math.nan
_INT_ONLY = {int}


def utc_epoch(iso: str) -> float:
    """'2024-05-01T12:00:00.000Z' → epoch seconds (NaN if unreadable)."""
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError):
        return _NAN


@dataclass(slots=True)
class DeviceExtras:
    """Per device, beyond FleetState: cumulative counters per boot, latest scores, recent
    windows (a flat array, RECENT x RECENT_FIELDS, oldest overwritten)."""

    boots: dict[str, list[int]] = field(default_factory=dict)  # boot -> [seq, *CUMULATIVE]
    exact: bool = True          # every stats payload of this device carried since_boot
    group: tuple[str, str, str, str] = ("", "", "", "")
    drift: array = field(default_factory=lambda: array("f"))  # NaN = no score
    accuracy: float | None = None
    last_end: float = _NAN      # epoch of the latest window's end (current boot first)
    recent: array = field(default_factory=lambda: array("d"))
    recent_n: int = 0


class FleetModel:
    """The server's state. `ingest(topic, payload, retained)` from one thread; everything else
    under `lock`."""

    def __init__(self, prefix: str = DEFAULT_PREFIX, clock: Callable[[], float] = time.time,
                 sink: Callable[[float, tuple[str, str, str, str], dict[str, Any]], None]
                 | None = None) -> None:
        # per device only the input level (device rows, drill-down); the histograms are summed
        # per model group, where the exporter, the page's plots and the history read them
        self.state = FleetState(prefix, clock=clock, device_metrics=DEVICE_METRICS)
        self.prefix = self.state.prefix
        self.extras: dict[str, DeviceExtras] = {}
        self.outcomes: dict[str, int] = {}
        self.lock = threading.Lock()
        self.sink = sink          # (window end epoch, group, payload) for the history
        self.clock = clock
        self.started = clock()

    # --- input -----------------------------------------------------------------------------
    def ingest(self, topic: str, payload: bytes, retained: bool = False) -> str:
        kind = topic.rsplit("/", 1)[-1]
        parsed: Any = payload
        if kind in ("stats", "alarm"):
            try:
                parsed = _decode(payload)
            except _Invalid:
                parsed = payload  # FleetState counts it against the device
        with self.lock:
            outcome = self.state.ingest(topic, parsed, retained)
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
            if outcome == "stats":
                end = utc_epoch(parsed["window"]["end_utc"])
                self._stats(parsed, end)
        if outcome == "stats" and self.sink is not None:
            self.sink(end, group_key(parsed), parsed)
        return outcome

    def _stats(self, p: Mapping[str, Any], end: float) -> None:
        dev_id = p["device_id"]
        x = self.extras.get(dev_id)
        if x is None:
            x = self.extras[dev_id] = DeviceExtras()
        boot, seq = p["boot_id"], p["seq"]
        row = x.boots.get(boot)
        if row is None:
            if len(x.boots) >= MAX_BOOTS:  # forget the boot seen longest ago
                del x.boots[next(iter(x.boots))]
            row = x.boots[boot] = [-1, *([0] * len(CUMULATIVE))]
        since = p.get("since_boot")
        if type(since) is dict and set(map(type, map(since.get, CUMULATIVE))) == _INT_ONLY:
            if seq > row[0]:
                row[0] = seq
                row[1:] = [since[k] for k in CUMULATIVE]
        else:  # an older agent: this replica's own sum of the windows (exact for one replica)
            x.exact = False
            row[0] = max(row[0], seq)
            row[1] += 1
            c = p["counts"]
            for i, k in enumerate(CUMULATIVE[1:], 2):
                row[i] += c.get(k, 0)
        dev = self.state.devices[dev_id]
        last = dev.last
        if last is not None and last["boot_id"] == boot and last["seq"] == seq:
            # this window is now the device's latest: its scores are the current ones
            x.group = group_key(p)
            drift = p.get("drift")
            drift = drift if isinstance(drift, dict) else {}
            x.drift = array("f", map(_score, map(drift.get, METRIC_NAMES)))
            x.accuracy = p["estimated_accuracy"].get("value")
            x.last_end = end
        rms = p["metrics"].get("input_rms_dbfs") or {}
        c = p["counts"]
        acc = p["estimated_accuracy"].get("value")
        values = (end, c["utterances"], c["accepted"],
                  c["abstained"], _NAN if acc is None else acc,
                  _NAN if rms.get("mean") is None else rms["mean"])
        if len(x.recent) < RECENT * len(RECENT_FIELDS):
            x.recent.extend(values)
        else:
            i = (x.recent_n % RECENT) * len(RECENT_FIELDS)
            x.recent[i:i + len(RECENT_FIELDS)] = array("d", values)
        x.recent_n += 1

    # --- views (call with `lock` held) ------------------------------------------------------
    def recent_windows(self, device: str) -> list[dict[str, float]]:
        """The device's recent windows, oldest first, by window end."""
        x = self.extras.get(device)
        if x is None:
            return []
        k = len(RECENT_FIELDS)
        rows = [dict(zip(RECENT_FIELDS, x.recent[i:i + k], strict=True))
                for i in range(0, len(x.recent), k)]
        return sorted(rows, key=lambda r: r["end"])


def _score(entry: Any) -> float:
    """A drift entry's score, NaN when absent or not a number (float32 is plenty for a
    score in [0, 1] and keeps 10,000 devices' scores small)."""
    if type(entry) is dict:
        s = entry.get("score")
        if type(s) is float and math.isfinite(s):
            return s
        if type(s) is int:
            return float(s)
    return _NAN
