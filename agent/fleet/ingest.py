"""What `fleet serve` keeps from the messages: a FleetState plus what the exporter, the page and
the history need, fed one message at a time by the MQTT thread.

Pure (no I/O; settled sums go to the history's in-memory `add_totals`) and single-writer;
readers use `reading()`. Each payload is decoded and checked once (agent.fleet.schema, outside
the lock) and handed to `FleetState`, so `/api/fleet.json` is exactly `fleet watch --json`.
Each window is merged once, into its (time bucket, model group) pending sums; `settle()` folds
those into the group sums that /metrics and the page read and hands them to the history.

Exact totals across replicas: every stats payload carries the boot's cumulative counters
(`since_boot`). For each (device, boot) we keep the values of the highest seq seen, which are
the same whichever replica saw it and however often: `max by (device, boot)` over replicas,
summed, is the fleet's exact total (docs/fleet.md). Windows' own counts (deltas) are summed
per (model, version, rollout, cohort) too: exact per replica, and over replicas whenever the
broker delivers each message to one replica only.
"""

from __future__ import annotations

import gc
import math
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from agent.fleet.history import BUCKET_S
from agent.fleet.schema import FUTURE_S, PAST_S, Invalid, decode_json, decode_stats, utc_epoch
from agent.fleet.state import FleetState, Totals
from agent.monitoring.metric_catalog import DRIFT_ONLY, METRICS
from agent.monitoring.payloads import SinceBoot
from agent.telemetry.message import DEFAULT_PREFIX

CUMULATIVE = SinceBoot.FIELDS          # windows, frames, speech_frames, utterances, ...
MAX_BOOTS = 4                          # boots kept per device for the cumulative series
RECENT = 16                            # windows per device kept for the drill-down plots
RECENT_FIELDS = ("end", "utterances", "accepted", "abstained", "accuracy", "rms_dbfs")
METRIC_NAMES = tuple(m.name for m in (*METRICS, *DRIFT_ONLY))  # drift entries, in order
GroupKey = tuple[str, str, str, str]   # (model, model version, rollout, cohort)
DEVICE_METRICS = frozenset({"input_rms_dbfs"})  # metrics summed per device (see FleetState)
_NAN = math.nan
_INT_ONLY = {int}
_FLOAT_OR_NONE = {float, type(None)}


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


class BucketedState(FleetState):
    """FleetState whose model-group sums go first to per (time bucket, group) pending sums;
    `settle()` folds them into `groups` and returns them for the history. One merge per window
    then serves /metrics, the page and the history (which used to merge every window again)."""

    def __init__(self, prefix: str, clock: Callable[[], float], bucket_s: int) -> None:
        # per device only the input level (device rows, drill-down); the histograms are summed
        # per model group, where the exporter, the page's plots and the history read them
        super().__init__(prefix, clock=clock, device_metrics=DEVICE_METRICS)
        self.bucket_s = bucket_s
        self.pending: dict[tuple[int | None, GroupKey], Totals] = {}
        self.drift: dict[tuple[int | None, GroupKey], list[list[float]]] = {}
        self.received: dict[tuple[int | None, GroupKey], float] = {}  # server clock, latest
        self.window_end = _NAN  # epoch of the last merged window's end
        self.window_slot: tuple[int | None, GroupKey] = (None, ("", "", "", ""))  # and its slot

    def _group_totals(self, key: GroupKey, p: Mapping[str, Any]) -> Totals:
        end = self.window_end = utc_epoch(p["window"]["end_utc"])
        now = self._clock()
        # only a plausible wall-clock end is plotted (a 1970 RTC's windows are counted only)
        bucket = int(end // self.bucket_s * self.bucket_s) \
            if now - PAST_S <= end <= now + FUTURE_S else None
        self.window_slot = slot = (bucket, key)
        self.received[slot] = now  # the history ages rows by the server's clock too
        t = self.pending.get(slot)
        if t is None:
            t = self.pending[slot] = Totals()
            self.drift[slot] = [[0.0] * len(METRIC_NAMES), [0] * len(METRIC_NAMES)]
        return t

    def settle(self) -> list[tuple[int, GroupKey, Totals, list[list[float]], float]]:
        """Fold the pending sums into `groups`; returns (bucket, group, sums, [drift score sums,
        drift score counts], received) of those with a readable window end, for the history
        (received: the server's clock at the latest of their windows)."""
        out = []
        for (bucket, key), t in self.pending.items():
            g = self.groups.get(key)
            if g is None:  # a copy: `t` goes to the history as it is now
                g = self.groups[key] = Totals()
            g.merge_in(t)
            if bucket is not None:
                out.append((bucket, key, t, self.drift.pop((bucket, key), [[], []]),
                            self.received[bucket, key]))
        self.pending.clear()
        self.drift.clear()
        self.received.clear()
        return out


class FleetModel:
    """The server's state. `ingest(topic, payload, retained)` from one thread; readers use
    `reading()` (the lock, with every window merged so far settled into the sums)."""

    def __init__(self, prefix: str = DEFAULT_PREFIX, clock: Callable[[], float] = time.time,
                 history: Any = None) -> None:
        self.state = BucketedState(prefix, clock, history.bucket_s if history else BUCKET_S)
        self.prefix = self.state.prefix
        self.extras: dict[str, DeviceExtras] = {}
        self.outcomes: dict[str, int] = {}
        self.lock = threading.Lock()
        self.history = history    # agent.fleet.history.History: gets the settled sums
        self.clock = clock
        self.started = clock()

    # --- input -----------------------------------------------------------------------------
    def ingest(self, topic: str, payload: bytes, retained: bool = False) -> str:
        kind = topic.rsplit("/", 1)[-1]
        parsed: Any = None  # parsed here, outside the lock the HTTP threads read under
        if kind in ("stats", "alarm"):
            try:
                parsed = (decode_stats if kind == "stats" else decode_json)(payload)
            except Invalid as e:
                parsed = e  # FleetState counts it against the device (without parsing again)
        with self.lock:
            st = self.state
            outcome = st.ingest(topic, payload, retained, decoded=parsed)
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
            if outcome == "stats":
                self._stats(parsed, st.window_end, st.group_key, st.drift[st.window_slot])
        return outcome

    def settle(self) -> None:
        """Fold the windows merged since the last call into the group sums and hand them to
        the history (call before reading `state.groups`, and before flushing the history)."""
        with self.lock:
            done = self.state.settle()
        self._to_history(done)

    @contextmanager
    def reading(self) -> Iterator[None]:
        """The lock, with the sums settled: what every view holds while it copies state."""
        with self.lock:
            self._to_history(self.state.settle())
            yield

    def _to_history(self, done: list[tuple[int, GroupKey, Totals, list[list[float]], float]]
                    ) -> None:
        if self.history is not None:
            for bucket, key, totals, drift, received in done:
                self.history.add_totals(bucket, key, totals, drift, received=received)

    def _stats(self, p: Mapping[str, Any], end: float, group: GroupKey,
               drift_sums: list[list[float]]) -> None:
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
        scores = drift_scores(p.get("drift"))
        sums, ns = drift_sums
        for i, v in enumerate(scores):
            if v == v:  # not NaN
                sums[i] += v
                ns[i] += 1
        last = self.state.devices[dev_id].last
        if last is not None and last["boot_id"] == boot and last["seq"] == seq:
            # this window is now the device's latest: its scores are the current ones
            x.group = group
            x.drift = array("f", scores)
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


def tune_gc() -> None:
    """Run the cyclic garbage collector's young generation every 20,000 allocations instead of
    700. A stats payload decodes into ~150 containers that reference counting frees (they hold
    no cycles), so the default ran a collection every few messages for nothing: ~10 % of the
    ingest core here (benchmarks/bench_fleet_ingest.py). What exists at start-up (modules,
    tables) is frozen out of the scans."""
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def drift_scores(drift: Any) -> list[float]:
    """The window's drift score per catalogue metric (METRIC_NAMES order), NaN where there is
    none. `drift` is read leniently: an odd entry only loses its own score."""
    if type(drift) is not dict:
        return [_NAN] * len(METRIC_NAMES)
    get = drift.get
    try:  # the usual shape, checked in C: every entry a dict whose score is a float or null
        scores = [get(n)["score"] for n in METRIC_NAMES]
        if set(map(type, scores)) <= _FLOAT_OR_NONE:
            return [_NAN if v is None else v for v in scores]
    except (TypeError, KeyError):
        pass
    return list(map(_score, map(get, METRIC_NAMES)))


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
