"""`/metrics`: the fleet as Prometheus series, made with prometheus-client.

A custom collector builds the series at scrape time from `FleetModel` (no per-series objects
live between scrapes, so memory does not grow with label cardinality). The data is copied
under the model's lock and formatted outside it, so a scrape stalls ingest only briefly.

Series (docs/fleet.md has the table and what a 100,000-device fleet costs):
* `eva_fleet_*`: per (model, model_version, rollout, cohort) group or fleet-wide, always;
* `eva_device_*`: one set per device, unless `per_device=False` (`--fleet-only`).
Every histogram has the catalogue's fixed edges as buckets: bucket `le=e` counts the values
below `e` (the device bins left-closed: [e_i-1, e_i)); exact integer counts, mergeable.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample

from agent import __version__
from agent.fleet.ingest import CUMULATIVE, METRIC_NAMES, FleetModel
from agent.fleet.state import ERROR_KINDS, GROUP_LABELS
from agent.monitoring.metric_catalog import DRIFT_ONLY, METRICS
from agent.monitoring.windows import COUNTERS

GROUP_COUNTERS = ("utterances", "accepted", "abstained", "dropped_frames")
OUTCOMES = ("stats", "alarm", "status", "birth", "duplicate", *ERROR_KINDS, "unknown_topic")


def _le(x: float) -> str:
    return f"{x:g}" if math.isfinite(x) else "+Inf"


class FleetCollector(Collector):
    def __init__(self, model: FleetModel, *, per_device: bool = True,
                 replica: str = "", link: Any = None) -> None:
        self.model = model
        self.link = link  # the stats connection (agent.fleet.subscriber.Subscriber), if any
        self.per_device = per_device
        self.replica = replica
        self._snap: dict[str, Any] | None = None
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self)

    def describe(self) -> list[Metric]:
        return []  # series are dynamic; registering never scrapes

    def collect(self) -> Iterator[Metric]:
        snap = self._snap if self._snap is not None else self.snapshot()
        yield from self._fleet(snap)

    def exposition(self) -> bytes:
        """The whole /metrics body as one bytes object (tests; the server sends the chunks)."""
        return b"".join(self.exposition_chunks())

    def exposition_chunks(self) -> list[bytes]:
        """The whole /metrics body: the fleet families through prometheus-client's
        generate_latest, then (unless fleet-only) the per-device families written directly in
        the same text format -- at 10,000 devices they are ~250,000 samples, and the client's
        generic per-sample formatting would take seconds of the ingest core per scrape."""
        from prometheus_client import generate_latest

        snap = self.snapshot()
        self._snap = snap
        try:
            body = generate_latest(self._registry)
        finally:
            self._snap = None
        if not self.per_device:
            return [body]
        return [body, *device_chunks(snap["devices"])]

    # --- copy what is needed under the lock ---------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        m = self.model
        with m.reading():
            st = m.state
            groups = {}
            for key, t in st.groups.items():
                groups[key] = {
                    "windows": t.windows, "counts": dict(t.counts), "acc_sum": t.acc_sum,
                    "acc_n": t.acc_n,
                    "hists": {name: (list(ms.counts) if ms.counts else None, ms.sum)
                              for name, ms in t.metrics.items()}}
            devices = []
            for dev_id, d in st.devices.items():
                x = m.extras.get(dev_id)
                boot = d.boot_id or ""
                rules = d.alarms.get(boot, {}) if boot else {}
                devices.append((
                    dev_id, d.online, d.birth_fields().get("agent_version"),
                    x.group if x else _model_group(d.model),
                    {b: tuple(r) for b, r in x.boots.items()} if x else {},
                    array("f", x.drift) if x else (), x.accuracy if x else None,
                    x.last_end if x else math.nan,
                    [(a["metric"], a["stage"], a["scope"], a["state"] == "raised")
                     for a in rules.values()],
                    sum(s.missing() for s in d.seqs.values()), d.duplicates,
                    d.outbox_dropped, tuple(d.errors[k] for k in ERROR_KINDS)))
            return {"groups": groups, "devices": devices, "outcomes": dict(m.outcomes),
                    "capped": {**st.capped, "history_sums": m.history.clamped
                               if m.history is not None else 0},
                    "unknown_topics": st.unknown_topics,
                    "broker_dropped": st.broker_dropped[1] if st.broker_dropped else None,
                    "loss": st.loss_json({d[0]: {"missing": d[9], "outbox_dropped": d[11]}
                                           for d in devices})}

    # --- fleet level -----------------------------------------------------------------------
    def _fleet(self, snap: dict[str, Any]) -> Iterator[Metric]:
        info = InfoMetricFamily("eva_serve", "this fleet serve replica",
                                labels=("version", "replica"))
        info.add_metric((__version__, self.replica), {})
        yield info
        r = self.link
        if r is not None:  # the stats connection's health: a reconnecting replica shows here
            yield GaugeMetricFamily("eva_serve_stats_connected", "1 while the stats "
                                    "subscription is up", value=int(r.connected))
            for name, value, help_ in (
                    ("connections", r.connections, "stats subscriptions made (1 + reconnects)"),
                    ("messages", r.messages, "stats messages handed to the model"),
                    ("ingest_errors", r.ingest_errors, "messages the model raised on (a bug; "
                     "acknowledged and logged)")):
                yield CounterMetricFamily(f"eva_serve_stats_{name}", help_, value=value)
        info = InfoMetricFamily("eva_metric", "each catalogue metric's pipeline stage and "
                                "unit (join: * on (metric) group_left (stage) eva_metric_info)",
                                labels=("metric", "stage", "unit"))
        for spec in (*METRICS, *DRIFT_ONLY):  # drift-only metrics: drift score, alarms
            info.add_metric((spec.name, spec.stage, spec.unit), {})
        yield info
        gl = list(GROUP_LABELS)
        groups = snap["groups"]
        fam = CounterMetricFamily("eva_fleet_windows", "stats windows received (deduplicated "
                                  "by device, boot, seq in this replica)", labels=gl)
        for key, g in groups.items():
            fam.add_metric(key, g["windows"])
        yield fam
        for c in COUNTERS:
            fam = CounterMetricFamily(f"eva_fleet_{c}", f"sum of the windows' {c} (this "
                                      "replica's deduplicated windows)", labels=gl)
            for key, g in groups.items():
                fam.add_metric(key, g["counts"].get(c, 0))
            yield fam
        fam = CounterMetricFamily("eva_fleet_accuracy_weighted", "sum of estimated_accuracy x "
                                  "its n over windows (divide by eva_fleet_accuracy_decisions)",
                                  labels=gl)
        fam_n = CounterMetricFamily("eva_fleet_accuracy_decisions", "decisions behind the "
                                    "accuracy estimate (n)", labels=gl)
        acc = GaugeMetricFamily("eva_fleet_estimated_accuracy", "estimated accuracy over all "
                                "windows received (valid while calibration holds)", labels=gl)
        for key, g in groups.items():
            fam.add_metric(key, g["acc_sum"])
            fam_n.add_metric(key, g["acc_n"])
            if g["acc_n"]:
                acc.add_metric(key, g["acc_sum"] / g["acc_n"])
        yield from (fam, fam_n, acc)
        for spec in METRICS:
            h = HistogramMetricFamily(f"eva_fleet_{spec.name}", f"{spec.help} ({spec.unit}; "
                                      "merged window histograms, catalogue edges)", labels=gl)
            edges = None
            for key, g in groups.items():
                hist = g["hists"].get(spec.name)
                if hist is None or hist[0] is None:
                    continue
                counts, total = hist
                if edges is None:
                    edges = [*spec.edges, math.inf]
                buckets, cum = [], 0
                for e, c in zip(edges, counts, strict=True):
                    cum += c
                    buckets.append((_le(e), cum))
                h.add_metric(key, buckets, total)
                if spec.edges[0] < 0:  # the client leaves out _sum (it can fall) and _count
                    h.samples.append(Sample(f"eva_fleet_{spec.name}_count",
                                            dict(zip(gl, key, strict=True)), cum))
            yield h
        # latest per device, aggregated: what an operator looks at first
        devs = snap["devices"]
        state = GaugeMetricFamily("eva_fleet_devices", "devices by presence (retained status "
                                  "and last will)", labels=("state",))
        on = sum(1 for d in devs if d[1] is True)
        off = sum(1 for d in devs if d[1] is False)
        state.add_metric(("online",), on)
        state.add_metric(("offline",), off)
        state.add_metric(("unknown",), len(devs) - on - off)
        yield state
        versions: dict[tuple[str, ...], int] = {}
        drift: dict[tuple[str, ...], list[float]] = {}
        alarms: dict[tuple[str, str, str], int] = {}
        for d in devs:
            key = (d[2] or "", *d[3])
            versions[key] = versions.get(key, 0) + 1
            for name, score in zip(METRIC_NAMES, d[5], strict=False):
                if score == score:  # NaN: no score
                    s = drift.setdefault((name, *d[3]), [0.0, 0])
                    s[0] += round(score, 4)  # float32 in memory; payload scores have 4 decimals
                    s[1] += 1
            for metric, stage, scope, raised in d[8]:
                k = (metric, stage, scope)
                alarms[k] = alarms.get(k, 0) + int(raised)
        fam = GaugeMetricFamily("eva_fleet_versions", "devices per agent and model version "
                                "(info-style: the value is a device count)",
                                labels=("agent_version", *gl))
        for key, n in versions.items():
            fam.add_metric(key, n)
        yield fam
        fam = GaugeMetricFamily("eva_fleet_drift_score", "mean over devices of the latest "
                                "window's drift score", labels=("metric", *gl))
        for key, (s, n) in drift.items():
            fam.add_metric(key, s / n)
        yield fam
        fam = GaugeMetricFamily("eva_fleet_active_alarms", "devices with the rule raised now",
                                labels=("metric", "stage", "scope"))
        for key, n in alarms.items():
            fam.add_metric(key, n)
        yield fam
        yield GaugeMetricFamily("eva_fleet_missing_messages", "seq numbers missing between the "
                                "lowest and highest seen per boot (not yet arrived, or lost)",
                                value=sum(d[9] for d in devs))
        yield CounterMetricFamily("eva_fleet_duplicates", "messages dropped as duplicates "
                                  "(device, boot, seq)", value=sum(d[10] for d in devs))
        yield CounterMetricFamily("eva_fleet_outbox_dropped", "messages the devices' outboxes "
                                  "reported dropping", value=sum(d[11] for d in devs))
        fam = CounterMetricFamily("eva_fleet_invalid_payloads", "messages refused, by reason",
                                  labels=("kind",))
        for i, kind in enumerate(ERROR_KINDS):  # d[12]: the counts in ERROR_KINDS order
            fam.add_metric((kind,), sum(d[12][i] for d in devs))
        fam.add_metric(("unknown_topic",), snap["unknown_topics"])
        yield fam
        fam = CounterMetricFamily("eva_ingest_refused", "messages refused whole, by device and "
                                  "reason (only devices with refusals)",
                                  labels=("device", "reason"))
        for d in devs:
            for kind, n in zip(ERROR_KINDS, d[12], strict=True):
                if n:
                    fam.add_metric((d[0], kind), n)
        yield fam
        fam = CounterMetricFamily("eva_fleet_capped", "times a budget was hit (groups: windows "
                                  "counted in the model group 'other'; boots, rules, metrics: "
                                  "the oldest or the new one not kept; history_sums: a stored "
                                  "sum clamped at 2^62)", labels=("budget",))
        for what, n in snap["capped"].items():
            fam.add_metric((what,), n)
        yield fam
        fam = CounterMetricFamily("eva_fleet_messages", "messages ingested by outcome",
                                  labels=("outcome",))
        for o in OUTCOMES:
            fam.add_metric((o,), snap["outcomes"].get(o, 0))
        yield fam
        loss = GaugeMetricFamily("eva_fleet_lost_messages", "missing seq numbers by where they "
                                 "were lost (device_reported: outbox drops; session: gaps that "
                                 "opened on many devices at once; unattributed)",
                                 labels=("where",))
        for where in ("device_reported", "session", "unattributed"):
            loss.add_metric((where,), snap["loss"][where])
        yield loss
        if snap["broker_dropped"] is not None:
            yield GaugeMetricFamily("eva_broker_dropped_messages", "the broker's own count of "
                                    "messages it dropped (queue limits), from $SYS",
                                    value=snap["broker_dropped"])



# --- per device: the text format written directly ------------------------------------------------
DEVICES_PER_CHUNK = 1000
_DEVICE_FAMILIES = (
    *((f"eva_device_{k}_total", "counter", f"{k} since the boot started (the payloads' "
       "since_boot: max by (device, boot) over replicas, then sum, is exact)")
      for k in CUMULATIVE),
    ("eva_device_info", "gauge", "agent and model of each device (value 1)"),
    ("eva_device_online", "gauge", "1 online, 0 offline (retained status and last will)"),
    ("eva_device_last_window_end_timestamp_seconds", "gauge",
     "wall-clock end of the latest window"),
    ("eva_device_estimated_accuracy", "gauge", "latest window's estimated accuracy"),
    ("eva_device_drift_score", "gauge", "latest window's drift score per metric (its stage: "
     "eva_metric_info)"),
    ("eva_device_alarm", "gauge", "1 raised, 0 cleared, per rule of the current boot"),
    ("eva_device_missing_messages", "gauge", "seq numbers missing between the lowest and "
     "highest seen per boot (with --share: includes those routed to other replicas; devices "
     "with none are left out)"),
    ("eva_device_duplicates_total", "counter", "duplicates dropped (only devices with some)"),
    ("eva_device_outbox_dropped_total", "counter", "messages the outbox reported dropping "
     "(only devices with some)"),
    ("eva_device_invalid_payloads_total", "counter", "messages refused (kinds seen)"),
)
# Zero-valued per-device gauges and counters of rare events are left out (an absent series
# reads as 0; the eva_fleet_* totals hold every device), and the drift score's stage, fixed by
# its metric, is in eva_metric_info: at 10,000 devices ~3.5 MB of /metrics (issue 20's 20 MB).
_SPARSE = frozenset({"eva_device_missing_messages", "eva_device_duplicates_total",
                     "eva_device_outbox_dropped_total"})


def _esc(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float | int) -> str:
    return str(v) if type(v) is int else repr(float(v))


def device_chunks(devs: list[tuple]) -> Iterator[bytes]:
    """The eva_device_* families in the Prometheus text format (0.0.4), one encoded chunk per
    family and DEVICES_PER_CHUNK devices: at 10,000 devices a scrape is ~270,000 lines (~17 MB),
    and holding them all as strings at once cost ~65 MiB of peak memory."""
    labels = [f'device="{_esc(dev[0])}"' for dev in devs]
    for i, (name, kind, help_) in enumerate(_DEVICE_FAMILIES):
        # the 0.0.4 text format types the sample name itself (with _total)
        out = [f"# HELP {name} {help_}\n# TYPE {name} {kind}\n"]
        add = out.append
        for n, (d, (_, on, agent_v, group, boots, scores, accuracy, end, rules, miss, dup, odrop,
                errors)) in enumerate(zip(labels, devs, strict=True), 1):
            if n % DEVICES_PER_CHUNK == 0:  # bytes now: the lines' strings cost ~3x more
                yield "".join(out).encode()
                out.clear()
            if i < len(CUMULATIVE):
                for boot, row in boots.items():
                    add(f'{name}{{{d},boot="{_esc(boot)}"}} {row[1 + i]}\n')
            elif name == "eva_device_info":
                g = ",".join(f'{k}="{_esc(v)}"' for k, v in zip(GROUP_LABELS, group, strict=True))
                add(f'{name}{{{d},agent_version="{_esc(agent_v or "")}",{g}}} 1\n')
            elif name == "eva_device_online":
                if on is not None:
                    add(f"{name}{{{d}}} {1 if on else 0}\n")
            elif name == "eva_device_last_window_end_timestamp_seconds":
                if not math.isnan(end):
                    add(f"{name}{{{d}}} {_num(end)}\n")
            elif name == "eva_device_estimated_accuracy":
                if accuracy is not None:
                    add(f"{name}{{{d}}} {_num(accuracy)}\n")
            elif name == "eva_device_drift_score":
                for metric, score in zip(METRIC_NAMES, scores, strict=False):
                    if score == score:  # NaN: no score
                        add(f'{name}{{{d},metric="{metric}"}} {_num(round(score, 4))}\n')
            elif name == "eva_device_alarm":
                for metric, st, scope, raised in rules:
                    add(f'{name}{{{d},metric="{_esc(metric)}",stage="{_esc(st)}",'
                        f'scope="{_esc(scope)}"}} {1 if raised else 0}\n')
            elif name in _SPARSE:
                v = (miss if name == "eva_device_missing_messages" else
                     dup if name == "eva_device_duplicates_total" else odrop)
                if v:
                    add(f"{name}{{{d}}} {v}\n")
            elif name == "eva_device_invalid_payloads_total":
                for err, k in zip(ERROR_KINDS, errors, strict=True):
                    if k:
                        add(f'{name}{{{d},kind="{err}"}} {k}\n')
        yield "".join(out).encode()
        del out


def _model_group(model: Any) -> tuple[str, str, str, str]:
    m = model if isinstance(model, dict) else {}
    return (str(m.get("name") or ""), str(m.get("version") or ""), "", "")


def exposition(model: FleetModel, *, per_device: bool = True, replica: str = "") -> bytes:
    """One /metrics body (tests; the server keeps one collector)."""
    return FleetCollector(model, per_device=per_device, replica=replica).exposition()
