"""The merged state of a fleet, built from the messages its devices publish.

Pure and single-threaded: `FleetState.ingest(topic, payload, retained)` takes one message as it
came off the broker (or a file) and never raises on bad input -- a fleet view must survive one
broken or hostile device, so every problem is counted against the device it came from.

Semantics (see docs/fleet.md):
* Delivery is at-least-once (QoS 1, outbox replays), so stats and alarms are deduplicated by
  (device, boot_id, seq); `seq` is one counter per boot across stats and alarm.
* Gaps are the seq numbers missing between the lowest and highest seen of each boot: messages
  lost for good (an outbox that had to drop) or not arrived yet (a replay still running).
* Counts and histograms are sums over every distinct window received, whatever its order or
  `historical` flag. Histograms use fixed edges (agent.monitoring.metric_catalog, or the device's
  birth for metrics the catalogue does not know), so merging across windows and devices adds integer
  counts and is exact; a payload whose device declared different edges is refused (`edges_mismatch`)
  rather than merged into meaningless bins.
* Active alarms are those of the device's current boot: a restarted agent starts with no raised
  rule and never clears the previous boot's alarms itself.
"""

from __future__ import annotations

import json
import math
import re
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from agent.fleet.bins import MetricSum, compact
from agent.fleet.loss import SessionLoss
from agent.fleet.schema import (
    MAX_COUNT,
    MAX_METRICS,
    REASONS,
    Alarm,
    BirthInfo,
    Event,
    check_stats,
    convert,
    decode_json,
    decode_stats,
)
from agent.fleet.schema import Invalid as _Invalid
from agent.monitoring.metric_catalog import METRICS, MetricSpec
from agent.monitoring.windows import COUNTERS
from agent.telemetry.message import DEFAULT_PREFIX

FLEET_SCHEMA = 1
# mosquitto's count of messages it dropped (queue limits); subscribed to where the ACL allows
BROKER_DROPPED_TOPIC = "$SYS/broker/publish/messages/dropped"
JSON_CHUNK_BYTES = 1 << 20   # to_json_chunks joins devices into chunks of about this size
MAX_GAP_RANGES = 20        # gap ranges listed per boot in to_json (the total is always exact)
MAX_EVENTS = 20            # rollout events kept per device (agent.rollout: event topic)
ERROR_KINDS = ("invalid_json", "schema", "edges_mismatch", *(
    r for r in REASONS if r not in ("invalid_json", "schema")))  # refusal reasons, counted
# Budgets (issue 20): what one device, or the fleet, can make this process remember.
MAX_GROUPS = 64            # model groups (model, version, rollout, cohort) in the fleet ...
MAX_DEVICE_GROUPS = 4      # ... and new ones named by one device per GROUP_PERIOD_S (a rollout
GROUP_PERIOD_S = 86400.0   # takes days); beyond either: the OTHER group, counted
OTHER = ("other", "other", "other", "other")
MAX_DEVICE_BOOTS = 8       # boots remembered per device (seqs, births, alarms)
MAX_RULES = 64             # alarm rules per boot
MAX_SEQ_RANGES = 256       # seq ranges per boot; beyond, the lowest gaps are folded
MAX_GAP = 1_000_000        # a seq jump larger than this is counted as a jump, not as missing
CAPS = ("groups", "boots", "rules", "metrics")  # budgets hit, counted: eva_fleet_capped_total
_NO_EDGES: dict[str, np.ndarray] = {}
_NUMBER_TYPES = {int, float}
MAX_EDGES = 64        # edges per metric in a birth (the catalogue's have <= 23)
MAX_EDGE_SETS = 1000  # distinct edge lists remembered as checked (agent.fleet.state._birth_edges)
_EdgeRef = tuple[np.ndarray, int | None]  # (edges, bound on a hist's first + len)
_LEVEL = re.compile(r"[A-Za-z0-9._-]{1,64}")  # always .fullmatch: `$` passes a trailing \n
_ROLLUP_REASON = re.compile(r"^(\w+) roll-up: ")


class SeqSet:
    """Distinct non-negative integers as sorted disjoint ranges: O(ranges) memory, not O(seqs).

    A device that is never lost anything stays one range however long it runs.

    A hostile or broken device cannot make it large: beyond MAX_SEQ_RANGES ranges the lowest
    gap is folded (its seqs count as missing, and a late arrival there is no longer told from
    a duplicate); a gap wider than MAX_GAP is a jump, not messages missing.
    """

    __slots__ = ("_lo", "_hi", "folded", "jumps", "_inside")

    def __init__(self) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []
        self.folded = 0  # missing seqs inside folded gaps
        self.jumps = 0   # gaps wider than MAX_GAP (not counted as missing)
        self._inside = 0  # every seq inside folded gaps (not received)

    def add(self, s: int) -> bool:
        """Insert `s`; False if it was already present (a duplicate)."""
        lo, hi = self._lo, self._hi
        i = bisect_right(lo, s) - 1  # last range starting at or before s
        if i >= 0 and hi[i] >= s:
            return False
        left = i >= 0 and hi[i] == s - 1
        right = i + 1 < len(lo) and lo[i + 1] == s + 1
        if left and right:
            hi[i] = hi[i + 1]
            del lo[i + 1], hi[i + 1]
        elif left:
            hi[i] = s
        elif right:
            lo[i + 1] = s
        else:
            lo.insert(i + 1, s)
            hi.insert(i + 1, s)
            if len(lo) > MAX_SEQ_RANGES:
                self._fold()
        return True

    def _fold(self) -> None:
        """Merge the two lowest ranges (the gap between them stays counted, as `folded`)."""
        lo, hi = self._lo, self._hi
        gap = lo[1] - hi[0] - 1
        self._inside += gap
        if gap > MAX_GAP:
            self.jumps += 1
        else:
            self.folded += gap
        hi[0] = hi[1]
        del lo[1], hi[1]

    def __contains__(self, s: object) -> bool:
        if not isinstance(s, int):
            return False
        i = bisect_right(self._lo, s) - 1
        return i >= 0 and self._hi[i] >= s

    def __len__(self) -> int:
        return sum(h - lo + 1 for lo, h in zip(self._lo, self._hi, strict=True)) - self._inside

    @property
    def runs(self) -> int:
        """Runs of consecutive seqs held (more than one: something is missing or folded)."""
        return len(self._lo)

    @property
    def min(self) -> int | None:
        return self._lo[0] if self._lo else None

    @property
    def max(self) -> int | None:
        return self._hi[-1] if self._hi else None

    def gaps(self) -> list[tuple[int, int]]:
        """Missing ranges [first, last] between the lowest and the highest present."""
        return [(self._hi[k] + 1, self._lo[k + 1] - 1) for k in range(len(self._lo) - 1)]

    def missing(self) -> int:
        """Seqs missing between the lowest and the highest, jumps (> MAX_GAP) left out."""
        return sum(n for a, b in self.gaps() if (n := b - a + 1) <= MAX_GAP) + self.folded

    def jumped(self) -> int:
        return self.jumps + sum(1 for a, b in self.gaps() if b - a + 1 > MAX_GAP)


# --- validation of the rarer payloads (stats are typed: agent.fleet.schema) -------------------
def _is_int(x: Any) -> bool:
    return type(x) is int  # not bool (a subclass)


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise _Invalid(what)


def _check_ids(p: Any, device: str) -> None:
    _need(isinstance(p, dict), "payload is not a JSON object")
    _need(p.get("schema") == 1 and _is_int(p.get("schema")), "schema is not 1")
    _need(p.get("device_id") == device, "device_id does not match the topic")
    _need(isinstance(p.get("boot_id"), str) and bool(_LEVEL.fullmatch(p["boot_id"])), "boot_id")
    _need(_is_int(p.get("seq")) and 0 <= p["seq"] <= MAX_COUNT, "seq")
    od = p.get("outbox_dropped", 1)
    _need(_is_int(od) and 1 <= od <= MAX_COUNT, "outbox_dropped")


def _check_alarm(p: Any, device: str) -> None:
    _check_ids(p, device)
    convert(p, Alarm)  # bounded strings, finite numbers (raises Invalid)


def _birth_edges(p: Any, known: dict[tuple, np.ndarray]) -> dict[str, np.ndarray]:
    """The metric edges a birth payload declares ({} if none); raises _Invalid if malformed.
    `known`: (metric, *edges) already checked -> the shared array (a fleet declares a handful of
    edge sets; checking and converting ~20 lists per birth cost ~200 us, and a replica that
    restarts receives every device's retained birth at once)."""
    _need(isinstance(p, dict), "birth is not a JSON object")
    if "boot_id" in p:
        _need(isinstance(p["boot_id"], str) and bool(_LEVEL.fullmatch(p["boot_id"])), "boot_id")
    metrics = p.get("metrics", {})
    _need(isinstance(metrics, dict) and len(metrics) <= MAX_METRICS, "birth metrics")
    out = {}
    for name, m in metrics.items():
        _need(isinstance(m, dict) and bool(_LEVEL.fullmatch(name)), "birth metrics (a name)")
        if "edges" not in m:
            continue
        e = m["edges"]
        _need(type(e) is list and 0 < len(e) <= MAX_EDGES and
              set(map(type, e)) <= _NUMBER_TYPES, f"birth metrics.{name}.edges")
        key = (name, *e)
        arr = known.get(key)
        if arr is None:
            _need(all(map(math.isfinite, e)) and all(b > a for a, b in zip(e, e[1:], strict=False)),
                  f"birth metrics.{name}.edges")
            arr = np.asarray(e, dtype=np.float64)
            if len(known) < MAX_EDGE_SETS:  # a hostile fleet cannot grow it without bound
                known[key] = arr
        out[name] = arr
    return out


# --- merged state ---------------------------------------------------------------------------
def _metric_json(m: MetricSum, unit: str | None = None,
                 stage: str | None = None) -> dict[str, Any]:
    n = m.binned
    p50, p95 = m.quantiles((0.5, 0.95))
    out: dict[str, Any] = {}
    if stage is not None:
        out["stage"] = stage
    if unit is not None:
        out["unit"] = unit
    out.update({
        "count": m.count, "binned": n, "mean": _round(m.mean),
        "min": _round(m.min) if n else None, "max": _round(m.max) if n else None,
        "p50": _round(p50), "p95": _round(p95), "hist": compact(m.counts)})
    return out


@dataclass
class Totals:
    """What sums over windows: counters, metrics, the accuracy estimate's weights."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    metrics: dict[str, MetricSum] = field(default_factory=dict)
    windows: int = 0
    acc_sum: float = 0.0
    acc_n: int = 0

    def metric(self, name: str, edges: np.ndarray) -> MetricSum:
        m = self.metrics.get(name)
        if m is None:
            m = self.metrics[name] = MetricSum(edges)
        return m

    def merge_in(self, other: Totals) -> None:
        self.windows += other.windows
        self.acc_sum += other.acc_sum
        self.acc_n += other.acc_n
        for k, v in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        for name, m in other.metrics.items():
            self.metric(name, m.edges).merge_in(m)

    def abstain_rate(self) -> float | None:
        d = self.counts["accepted"] + self.counts["abstained"]
        return self.counts["abstained"] / d if d else None

    def accuracy(self) -> float | None:
        return self.acc_sum / self.acc_n if self.acc_n else None


@dataclass
class _Device:
    device_id: str
    online: bool | None = None
    status_retained: bool = False
    boot_id: str | None = None          # current boot (birth, or newest live message)
    birth: dict[str, Any] | None = None
    births: dict[str | None, dict[str, np.ndarray]] = field(default_factory=dict)
    model: dict[str, Any] | None = None
    seqs: dict[str, SeqSet] = field(default_factory=dict)
    last: dict[str, Any] | None = None   # the stats payload with the latest window end
    totals: Totals = field(default_factory=Totals)
    alarms: dict[str, dict[tuple, dict[str, Any]]] = field(default_factory=dict)  # boot -> key
    alarm_events: int = 0
    duplicates: int = 0
    outbox_dropped: int = 0
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_KINDS, 0))
    last_error: str | None = None
    last_seen: float | None = None
    events: list[dict[str, Any]] = field(default_factory=list)  # the last MAX_EVENTS
    groups: dict[tuple[str, str, str, str], float] = field(default_factory=dict)  # first seen

    def birth_fields(self) -> dict[str, Any]:
        b = self.birth or {}
        return {k: b.get(k) for k in ("agent_version", "config_digest", "window_s")}


def _round(x: float | None, digits: int = 6) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _utc(epoch_s: float | None) -> str | None:
    if epoch_s is None:
        return None
    return datetime.fromtimestamp(epoch_s, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _alarm_key(p: Mapping[str, Any]) -> tuple[str, float, str]:
    """Which rule an alarm event belongs to. The payload has no rule id, so a rule is told
    apart by metric, threshold and scope (per window, or an hourly/daily roll-up)."""
    m = _ROLLUP_REASON.match(p["reason"])
    return p["metric"], float(p["threshold"]), m.group(1) if m else "window"


class FleetState:
    """Everything learnt from a fleet's messages so far; feed it with `ingest`."""

    def __init__(self, prefix: str = DEFAULT_PREFIX, catalog: Sequence[MetricSpec] = METRICS,
                 clock: Callable[[], float] = time.time,
                 device_metrics: frozenset[str] | None = None) -> None:
        self.prefix = prefix or DEFAULT_PREFIX
        # Which metrics are summed per device (None: all, as `fleet watch --json` shows them).
        # `fleet serve` keeps only the input level: per-device histograms of every metric cost
        # ~19 merges a message and ~66 MiB at 10,000 devices (docs/fleet.md "Performance").
        self.device_metrics = device_metrics
        self._specs = {m.name: m for m in catalog}
        # Reference edges: the catalogue's, plus (first seen) a birth's for metrics it lacks.
        self._edges: dict[str, np.ndarray] = {
            m.name: np.asarray(m.edges, dtype=np.float64) for m in catalog}
        self._clock = clock
        self._edge_sets: dict[tuple, dict[str, np.ndarray]] = {}
        self._tables: dict[int, tuple[dict, dict[str, _EdgeRef]]] = {}  # cleared when large
        # checked edge lists -> their shared array, the catalogue's to begin with
        self._known_edges: dict[tuple, np.ndarray] = {(name, *e.tolist()): e
                                                      for name, e in self._edges.items()}
        self.devices: dict[str, _Device] = {}
        # Sums per (model, version, rollout, cohort) -- the per-model view operators compare --
        # and, merged, the fleet's totals. Keyed by what each window says it ran.
        self.groups: dict[tuple[str, str, str, str], Totals] = {}
        self.messages = 0
        self.group_key: tuple[str, str, str, str] = ("", "", "", "")  # of the last stats merged
        self.unknown_topics = 0
        self.session_loss = SessionLoss()
        self.broker_dropped: tuple[float, float] | None = None  # (first seen, latest) from $SYS
        self.unexpected = 0  # inputs the checks let through but merging choked on (a bug)
        # Rollout commands seen (retained): topic level ("fleet" or a device id) -> raw payload
        self.rollouts: dict[str, bytes] = {}
        self.capped = dict.fromkeys(CAPS, 0)  # budgets hit (MAX_GROUPS ...): how often
        self.group_keys: set[tuple[str, str, str, str]] = {OTHER}  # admitted, <= MAX_GROUPS

    @property
    def fleet(self) -> Totals:
        """Every group's sums merged (exact: counts and histograms add)."""
        out = Totals()
        for g in self.groups.values():
            out.merge_in(g)
        return out

    # --- input -----------------------------------------------------------------------------
    def ingest(self, topic: str, payload: bytes | str | Mapping[str, Any],
               retained: bool = False, decoded: Any = None) -> str:
        """Apply one message; returns what happened: stats | alarm | status | birth |
        duplicate | invalid_json | schema | edges_mismatch | unknown_topic. Never raises.

        `decoded`: the payload as `decode_stats` (stats) or `decode_json` (others) returned it,
        or the `Invalid` they raised, when the caller parsed it already (outside its lock);
        else `payload` is parsed here."""
        if topic == BROKER_DROPPED_TOPIC:  # the broker's, not the fleet's: not in `messages`
            return self._broker_dropped(payload)
        self.messages += 1
        parsed = self._parse_topic(topic)
        if parsed is None:
            self.unknown_topics += 1
            return "unknown_topic"
        device_id, kind = parsed
        if kind == "rollout":  # the operator's own command (agent.rollout.command), not a device
            raw = payload if isinstance(payload, bytes | bytearray) else \
                json.dumps(payload).encode() if isinstance(payload, Mapping) else \
                str(payload).encode()
            self.rollouts[device_id] = bytes(raw)
            return "rollout"
        dev = self.devices.get(device_id)
        if dev is None:
            dev = self.devices[device_id] = _Device(device_id)
        if not retained:
            dev.last_seen = self._clock()
        try:
            if isinstance(decoded, _Invalid):  # the caller's parse refused it already
                raise decoded
            if kind == "status":
                return self._status(dev, payload, retained)
            if kind == "stats":
                p = decode_stats(payload) if decoded is None else decoded
                check_stats(p, device_id, self._clock())
                return self._stats(dev, p)
            p = decode_json(payload) if decoded is None else decoded
            if kind == "birth":
                return self._birth(dev, p)
            if kind == "event":  # rollout steps (docs/event.schema.json): kept, not merged
                _need(isinstance(p, dict) and isinstance(p.get("event"), str), "event")
                dev.events = (dev.events + [convert(p, Event)])[-MAX_EVENTS:]
                return "event"
            _check_alarm(p, device_id)  # kind == "alarm"
            return self._alarm(dev, p)
        except _Invalid as e:
            kind_err = e.args[1] if len(e.args) > 1 else "schema"
            dev.errors[kind_err] += 1
            dev.last_error = f"{kind}: {e.args[0]}"[:200]
            return kind_err
        except Exception as e:  # noqa: BLE001 - a check missed a shape; still never crash
            dev.errors["schema"] += 1
            self.unexpected += 1
            dev.last_error = f"{kind}: unexpected {type(e).__name__}: {e}"[:200]
            return "schema"

    def _broker_dropped(self, payload: Any) -> str:
        try:
            n = float(bytes(payload)[:32] if not isinstance(payload, str) else payload[:32])
        except (TypeError, ValueError):
            return "sys"
        if not (math.isfinite(n) and 0 <= n <= 2**53):  # nan, inf, absurd: not a count
            return "sys"
        first = self.broker_dropped[0] if self.broker_dropped else n
        self.broker_dropped = (first, n)
        return "sys"

    def loss_json(self, devices: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """Missing seq numbers split by where they were lost (agent.fleet.loss)."""
        missing = sum(v["missing"] for v in devices.values())
        device = sum(min(v["missing"], v["outbox_dropped"]) for v in devices.values())
        bursts, session = self.session_loss.totals()
        session = min(session, missing - device)
        out: dict[str, Any] = {"missing": missing, "device_reported": device,
                               "session": session, "unattributed": missing - device - session,
                               "session_bursts": bursts, "broker_dropped": None}
        if self.broker_dropped is not None:
            out["broker_dropped"] = int(self.broker_dropped[1] - self.broker_dropped[0])
        return out

    def _parse_topic(self, topic: str) -> tuple[str, str] | None:
        head = self.prefix + "/"
        if not isinstance(topic, str) or not topic.startswith(head):
            return None
        parts = topic[len(head):].split("/")
        if len(parts) != 2 or not _LEVEL.fullmatch(parts[0]) or parts[1] not in (
                "stats", "alarm", "status", "birth", "event", "rollout"):
            return None
        return parts[0], parts[1]

    def _status(self, dev: _Device, payload: Any, retained: bool) -> str:
        raw = payload.encode() if isinstance(payload, str) else payload
        if isinstance(raw, bytes | bytearray):
            text = bytes(raw).strip()
            if text in (b"online", b"offline"):
                dev.online = text == b"online"
                dev.status_retained = retained
                return "status"
        raise _Invalid("status is not 'online' or 'offline'")

    def _birth(self, dev: _Device, p: Any) -> str:
        edges = _birth_edges(p, self._known_edges)
        info = convert({k: p[k] for k in ("agent_version", "config_digest", "window_s",
                                          "drift_method", "model") if k in p}, BirthInfo)
        for name, e in list(edges.items()):
            if name not in self._edges:
                if len(self._edges) >= MAX_METRICS:  # a fleet-wide budget of metric names
                    del edges[name]
                    self.capped["metrics"] += 1
                    continue
                self._tables.clear()  # a metric the fleet did not know: tables are stale
            ref = self._edges.setdefault(name, e)
            if ref is not e and np.array_equal(ref, e):
                edges[name] = ref  # one shared array: memory per device, `is` check per message
        boot = p.get("boot_id")
        self._remember_boot(dev, dev.births, boot)
        # devices of one agent version declare the same edges: share one dict (memory per device)
        key = tuple((name, id(e)) for name, e in edges.items())
        shared = self._edge_sets.get(key)
        if shared is None and len(self._edge_sets) < MAX_EDGE_SETS:
            shared = self._edge_sets[key] = edges
        dev.births[boot] = shared if shared is not None else edges
        dev.birth = {k: v for k, v in info.items() if k != "model"}
        if "model" in info:
            dev.model = info["model"]
        if boot is not None:
            dev.boot_id = boot
        return "birth"

    def _remember_boot(self, dev: _Device, per_boot: dict, boot: Any) -> None:
        """Make room for one more boot in `per_boot` (a device's seqs, births or alarms):
        beyond MAX_DEVICE_BOOTS the boot seen longest ago that is not the current one goes."""
        if boot in per_boot or len(per_boot) < MAX_DEVICE_BOOTS:
            return
        old = next((b for b in per_boot if b != dev.boot_id), None)
        if old is not None or per_boot:
            del per_boot[old if old is not None else next(iter(per_boot))]
            self.capped["boots"] += 1

    def _first_time(self, dev: _Device, p: Mapping[str, Any]) -> bool:
        """Record (boot, seq); False for a duplicate."""
        seqs = dev.seqs.get(p["boot_id"])
        if seqs is None:
            self._remember_boot(dev, dev.seqs, p["boot_id"])
            seqs = dev.seqs[p["boot_id"]] = SeqSet()
        top = seqs.max
        if not seqs.add(p["seq"]):
            dev.duplicates += 1
            return False
        jump = p["seq"] - top - 1 if top is not None else 0
        self.session_loss.seen(self._clock(), dev.device_id, jump if jump <= MAX_GAP else 0)
        dev.outbox_dropped += int(p.get("outbox_dropped", 0))
        if dev.boot_id is None or not p.get("historical", False):
            dev.boot_id = p["boot_id"]
        return True

    def _alarm(self, dev: _Device, p: dict[str, Any]) -> str:
        if not self._first_time(dev, p):
            return "duplicate"
        dev.alarm_events += 1
        rules = dev.alarms.get(p["boot_id"])
        if rules is None:
            self._remember_boot(dev, dev.alarms, p["boot_id"])
            rules = dev.alarms[p["boot_id"]] = {}
        key = _alarm_key(p)
        prev = rules.get(key)
        if prev is None and len(rules) >= MAX_RULES:
            self.capped["rules"] += 1
            return "alarm"
        if prev is None or prev["seq"] < p["seq"]:  # a late replay must not undo a newer event
            rules[key] = {"metric": p["metric"], "stage": p["stage"], "state": p["state"],
                          "scope": key[2], "value": p["value"], "threshold": p["threshold"],
                          "window_end_s": p["window_end_s"], "reason": p["reason"],
                          "seq": p["seq"]}
        return "alarm"

    def _group_totals(self, key: tuple[str, str, str, str], p: Mapping[str, Any]) -> Totals:
        """Where a window's group sums go (`fleet serve` first sums them per time bucket)."""
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = Totals()
        return group

    def _capped_group(self, dev: _Device, key: tuple[str, str, str, str]
                      ) -> tuple[str, str, str, str]:
        """`key`, or OTHER once the device named MAX_DEVICE_GROUPS groups or the fleet
        MAX_GROUPS: a device naming a new model in every window cannot grow the series."""
        if key in dev.groups:
            return key
        now = self._clock()
        recent = [k for k, t in dev.groups.items() if now - t < GROUP_PERIOD_S]
        if len(recent) >= MAX_DEVICE_GROUPS or (
                key not in self.group_keys and len(self.group_keys) >= MAX_GROUPS):
            self.capped["groups"] += 1
            return OTHER
        if len(dev.groups) >= MAX_DEVICE_GROUPS:  # remember the device's recent groups only
            for k in [k for k in dev.groups if k not in recent][:len(dev.groups)]:
                del dev.groups[k]
        dev.groups[key] = now
        self.group_keys.add(key)
        return key

    def _edge_table(self, declared: dict[str, np.ndarray]) -> dict[str, _EdgeRef]:
        """name -> (reference edges, bound on a hist's first + len), or None for the bound
        when the device declared other edges (its windows cannot merge). One table per
        declared edge set (births share them), rebuilt when a birth adds a metric."""
        hit = self._tables.get(id(declared))
        if hit is not None and hit[0] is declared:
            return hit[1]
        table: dict[str, _EdgeRef] = {}
        for name in {**self._edges, **declared}:
            ref = self._edges.get(name)
            if ref is None:
                ref = declared[name]
            mine = declared.get(name)
            same = mine is None or mine is ref or np.array_equal(mine, ref)
            table[name] = (ref, len(ref) + 2 if same else None)
        if len(self._tables) >= MAX_EDGE_SETS:
            self._tables.clear()
        self._tables[id(declared)] = (declared, table)
        return table

    def _stats(self, dev: _Device, p: dict[str, Any]) -> str:
        if not self._first_time(dev, p):
            return "duplicate"
        table = self._edge_table(dev.births.get(p["boot_id"], dev.births.get(None, _NO_EDGES)))
        for name, entry in p["metrics"].items():
            t = table.get(name)
            if t is None:
                raise _Invalid(f"metric {name} has no known edges", "schema")
            if t[1] is None:
                raise _Invalid(f"metric {name}: the birth's edges differ from the fleet's",
                               "edges_mismatch")
            h = entry["hist"]
            if h and h[0] + len(h) > t[1]:  # [first, c...] reaches past the overflow bin
                raise _Invalid(f"metric {name}: hist does not fit the edges", "edges_mismatch")
        metrics = p["metrics"]
        only = self.device_metrics
        self.group_key = key = self._capped_group(dev, group_key(p))
        _add_window(self._group_totals(key, p), p, metrics.items(), table)
        _add_window(dev.totals, p, metrics.items() if only is None else
                    [(n, metrics[n]) for n in only if n in metrics], table)
        if dev.model is None or not dev.births:
            dev.model = p["model"]
        if _supersedes(p, dev.last, dev.boot_id):
            dev.last = {"boot_id": p["boot_id"], "seq": p["seq"], "historical": p["historical"],
                        "window": dict(p["window"]), "counts": dict(p["counts"]),
                        # model rollout on the device (agent.rollout), shown by fleet rollout
                        "model": p.get("model"), "rollout": p.get("rollout")}
        return "stats"

    # --- output ----------------------------------------------------------------------------
    def device_json(self, d: _Device) -> dict[str, Any]:
        boots = {}
        missing = 0
        for boot, s in d.seqs.items():
            g = s.gaps()
            n_missing = s.missing()
            missing += n_missing
            boots[boot] = {"first_seq": s.min, "last_seq": s.max, "received": len(s),
                           "missing": n_missing,
                           "gaps": [list(r) for r in g[:MAX_GAP_RANGES]]}
        active = [a for a in d.alarms.get(d.boot_id or "", {}).values()
                  if a["state"] == "raised"] if d.boot_id else []
        active.sort(key=lambda a: (a["metric"], a["scope"], a["threshold"]))
        t = d.totals
        return {
            "online": d.online, "status_retained": d.status_retained,
            "boot_id": d.boot_id, "model": d.model, **d.birth_fields(),
            "last_seen_utc": _utc(d.last_seen),
            "windows": t.windows, "alarm_events": d.alarm_events, "duplicates": d.duplicates,
            "outbox_dropped": d.outbox_dropped, "missing": missing,
            "counts": dict(t.counts),
            "utterances_per_min": _round(_rate(d.last)),
            "abstain_rate": _round(t.abstain_rate()),
            "estimated_accuracy": {"value": _round(t.accuracy()), "n": t.acc_n},
            "input_rms_dbfs": _round(t.metrics["input_rms_dbfs"].mean)
            if "input_rms_dbfs" in t.metrics else None,
            "active_alarms": [{k: v for k, v in a.items() if k != "state"} for a in active],
            "last_window": d.last,
            "boots": boots,
            "errors": dict(d.errors), "last_error": d.last_error,
            "metrics": {n: _metric_json(m) for n, m in sorted(t.metrics.items())},
            "events": d.events,
        }

    def to_json(self) -> dict[str, Any]:
        """The merged state as a JSON-serialisable dict (the `fleet watch --json` output)."""
        devices = {dev_id: self.device_json(d) for dev_id, d in sorted(self.devices.items())}
        return self._document({k: _summary(v) for k, v in devices.items()}, devices)

    def to_json_chunks(self, encode: Callable[[Any], bytes], **extra: Any) -> list[bytes]:
        """`to_json()` as JSON, encoded device by device, with `extra` keys after "devices":
        at 10,000 devices the whole document held as dicts cost ~35 MiB of peak memory; this
        holds one device's dict at a time, and the bytes (joined per ~1 MB)."""
        chunks: list[bytes] = []
        batch: list[bytes] = []
        size = 0
        summaries = {}
        for dev_id, d in sorted(self.devices.items()):
            v = self.device_json(d)
            summaries[dev_id] = _summary(v)
            batch.append(encode(dev_id) + b":" + encode(v))
            size += len(batch[-1])
            if size > JSON_CHUNK_BYTES:
                chunks.append(b",".join(batch) + b",")
                batch, size = [], 0
        if batch:
            chunks.append(b",".join(batch))
        elif chunks:
            chunks[-1] = chunks[-1][:-1]  # no trailing comma
        head = encode(self._document(summaries, {}))
        tail = b"".join(b"," + encode(k) + b":" + encode(v) for k, v in extra.items())
        assert head.endswith(b'"devices":{}}')  # the document's last key
        return [head[:-2], *chunks, b"}" + tail + b"}"]  # head[:-2] ends with "devices":{

    def _document(self, summaries: Mapping[str, Mapping[str, Any]],
                  devices: dict[str, Any]) -> dict[str, Any]:
        """The document around the devices; `summaries`: `_summary` of every device."""
        f = self.fleet
        rows = summaries.values()
        rates = [v["utterances_per_min"] for v in rows if v["utterances_per_min"] is not None]
        errors = {k: sum(d.errors[k] for d in self.devices.values()) for k in ERROR_KINDS}
        errors["unknown_topic"] = self.unknown_topics
        metrics = {}
        for name, m in f.metrics.items():
            s = self._specs.get(name)
            metrics[name] = _metric_json(m, unit=s.unit if s else None,
                                         stage=s.stage if s else None)
        order = [m for m in self._specs if m in metrics] + sorted(set(metrics) - set(self._specs))
        fleet = {
            "devices": len(summaries),
            "online": sum(1 for v in rows if v["online"] is True),
            "offline": sum(1 for v in rows if v["online"] is False),
            "windows": f.windows,
            "alarm_events": sum(d.alarm_events for d in self.devices.values()),
            "active_alarms": sum(v["active_alarms"] for v in rows),
            "duplicates": sum(d.duplicates for d in self.devices.values()),
            "missing": sum(v["missing"] for v in rows),
            "outbox_dropped": sum(d.outbox_dropped for d in self.devices.values()),
            "counts": dict(f.counts),
            "utterances_per_min": _round(sum(rates)) if rates else None,
            "abstain_rate": _round(f.abstain_rate()),
            "estimated_accuracy": {"value": _round(f.accuracy()), "n": f.acc_n},
            "input_rms_dbfs": _round(f.metrics["input_rms_dbfs"].mean)
            if "input_rms_dbfs" in f.metrics else None,
            "errors": errors,
            "loss": self.loss_json(summaries),
            "metrics": {name: metrics[name] for name in order},
        }
        return {"schema": FLEET_SCHEMA, "prefix": self.prefix, "generated_utc": _utc(self._clock()),
                "messages": self.messages, "fleet": fleet, "devices": devices}


def _summary(device: Mapping[str, Any]) -> dict[str, Any]:
    """What the fleet totals need of a device's JSON."""
    return {"online": device["online"], "utterances_per_min": device["utterances_per_min"],
            "active_alarms": len(device["active_alarms"]), "missing": device["missing"],
            "outbox_dropped": device["outbox_dropped"]}


def _add_window(totals: Totals, p: Mapping[str, Any],
                entries: Iterable[tuple[str, Mapping[str, Any]]],
                table: Mapping[str, tuple[np.ndarray, int | None]]) -> None:
    """Sum one checked stats window (its counters and these metric entries) into `totals`."""
    totals.windows += 1
    tc = totals.counts
    counts = p["counts"]
    for k in COUNTERS:
        tc[k] += counts.get(k, 0)
    sums = totals.metrics
    for name, entry in entries:
        acc_m = sums.get(name)
        if acc_m is None:
            acc_m = sums[name] = MetricSum(table[name][0])
        if entry["count"]:
            acc_m.add(entry)
    acc = p["estimated_accuracy"]
    v = acc.get("value")
    if v is not None and acc["n"] > 0:
        totals.acc_sum += v * acc["n"]
        totals.acc_n += acc["n"]


def _supersedes(p: Mapping[str, Any], last: Mapping[str, Any] | None,
                current_boot: str | None) -> bool:
    """Whether window `p` replaces `last` as the device's latest. Within a boot by seq (the
    device's own order, immune to clock steps); a window of the current boot beats one of any
    other boot whatever their clocks say (a new boot whose clock is behind the old one -- a
    stale RTC before NTP -- is still the newest); between two other boots by wall clock."""
    if last is None:
        return True
    if p["boot_id"] == last["boot_id"]:
        return p["seq"] >= last["seq"]
    if p["boot_id"] == current_boot:
        return True
    if last["boot_id"] == current_boot:
        return False
    return (p["window"]["end_utc"], p["seq"]) >= (last["window"]["end_utc"], last["seq"])


GROUP_LABELS = ("model", "model_version", "rollout", "cohort")


def group_key(p: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """(model name, model version, rollout id, rollout cohort) of a stats payload, "" where
    absent (agents before rollouts; see /docs/fleet.md for the labels)."""
    m = p.get("model")
    m = m if isinstance(m, dict) else {}
    r = p.get("rollout")
    r = r if isinstance(r, dict) else {}
    return (str(m.get("name") or ""), str(m.get("version") or ""), str(r.get("id") or ""),
            str(r.get("cohort") or ""))


def _rate(last: Mapping[str, Any] | None) -> float | None:
    """Utterances per minute over one window (None for an empty or zero-length one)."""
    if last is None:
        return None
    dur = last["window"]["end_s"] - last["window"]["start_s"]
    return last["counts"]["utterances"] * 60.0 / dur if dur > 0 else None
