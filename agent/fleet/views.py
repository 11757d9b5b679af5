"""What the page shows, gathered from the model (under its lock) and the history store.

Costs are bounded for 10,000 devices: one pass over the devices for the counts, the alarms now
and the top-N lists (heaps), and the plots from SQL-side sums over at most ~200 steps.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from typing import Any

from agent.fleet import page
from agent.fleet.history import History, Point
from agent.fleet.ingest import FleetModel

RANGES = {"1h": 3600, "6h": 6 * 3600, "24h": 86400, "7d": 7 * 86400, "14d": 14 * 86400}
DEFAULT_RANGE = "24h"
POINTS = 144
TOP_N = 10
SEARCH_N = 50
ALARMS_N = 50
BAND_METRICS = (("input_rms_dbfs", "input level", "dBFS"), ("snr_db", "SNR", "dB"))
DRIFT_LINES = 6


def _group_name(key: tuple[str, ...]) -> str:
    model, version, rollout, cohort = key
    name = f"{model}@{version}" if model or version else "unknown model"
    return name + (f" {rollout}:{cohort}" if rollout or cohort else "")


def _device_row(dev_id: str, d: Any) -> dict[str, Any]:
    """A displayed row (built only for the few devices a table shows)."""
    t = d.totals
    model = d.model or {}
    boot = d.boot_id or ""
    raised = sum(1 for a in d.alarms.get(boot, {}).values() if a["state"] == "raised")
    return {"device": dev_id, "online": d.online,
            "model": f"{model.get('name', '?')} {model.get('version', '')}".strip(),
            "windows": t.windows, "abstain_rate": t.abstain_rate(), "accuracy": t.accuracy(),
            "missing": sum(s.missing() for s in d.seqs.values()), "alarms": raised,
            "rollout": rollout_text((d.last or {}).get("rollout"))}


def rollout_text(ro: Any) -> str:
    """A device's rollout state as the page shows it: "state: reason" (or "–")."""
    if not isinstance(ro, dict) or not ro.get("state"):
        return "–"
    reason = ro.get("reason")
    return f"{ro['state']}: {reason}" if reason else str(ro["state"])


def _keys(dev_id: str, d: Any) -> tuple[str, bool | None, float | None, float | None, int]:
    """What the counts and the top-N lists rank by, cheaply, for every device."""
    c = d.totals.counts
    decided = c["accepted"] + c["abstained"]
    t = d.totals
    return (dev_id, d.online, c["abstained"] / decided if decided else None,
            t.acc_sum / t.acc_n if t.acc_n else None,
            sum(s.missing() for s in d.seqs.values()) if len(d.seqs) > 1 or any(
                s.runs > 1 for s in d.seqs.values()) else 0)


def fleet_view(model: FleetModel, history: History | None, *, range_name: str = DEFAULT_RANGE,
               q: str | None = None, replica: str = "", share: str = "",
               now: Callable[[], float] = time.time) -> dict[str, Any]:
    rng = range_name if range_name in RANGES else DEFAULT_RANGE
    with model.reading():
        st = model.state
        devs = st.devices
        keys = [_keys(dev_id, d) for dev_id, d in devs.items()]
        alarms = []
        for dev_id, d in devs.items():
            for a in d.alarms.get(d.boot_id or "", {}).values() if d.boot_id else ():
                if a["state"] == "raised":
                    alarms.append({"device": dev_id, **a})
        errors = sum(sum(d.errors.values()) for d in devs.values()) + st.unknown_topics
        messages, duplicates = st.messages, sum(d.duplicates for d in devs.values())

        def rows(picked: list[tuple]) -> list[dict[str, Any]]:
            return [_device_row(k[0], devs[k[0]]) for k in picked]

        tops = [
            ("Highest abstain rate", rows(heapq.nlargest(
                TOP_N, (k for k in keys if k[2] is not None), key=lambda k: k[2])),
             "top-abstain"),
            ("Lowest estimated accuracy", rows(heapq.nsmallest(
                TOP_N, (k for k in keys if k[3] is not None), key=lambda k: k[3])),
             "top-accuracy"),
            ("Most missing messages", rows(heapq.nlargest(
                TOP_N, (k for k in keys if k[4]), key=lambda k: k[4])), "top-missing"),
            ("Offline", rows(sorted((k for k in keys if k[1] is False),
                                    key=lambda k: k[0])[:TOP_N]), "top-offline"),
        ]
        search: list[dict[str, Any]] = []
        total = 0
        if q is not None:
            needle = q.strip().lower()
            hits = sorted((k for k in keys if needle in k[0].lower()), key=lambda k: k[0])
            total, search = len(hits), rows(hits[:SEARCH_N])
    on = sum(1 for k in keys if k[1] is True)
    off = sum(1 for k in keys if k[1] is False)
    kpis = {"devices": len(keys), "online": on, "offline": off, "unknown": len(keys) - on - off,
            "active_alarms": len(alarms), "missing": sum(k[4] for k in keys),
            "duplicates": duplicates, "invalid": errors, "messages": messages}
    alarms.sort(key=lambda a: (a["device"], a["metric"], a["scope"]))
    t_now = now()
    charts = fleet_charts(history, t_now - RANGES[rng], t_now) if history is not None else []
    return {"prefix": model.prefix, "replica": replica, "generated": page.short_utc(t_now),
            "ranges": list(RANGES), "range": rng, "kpis": kpis, "alarms": alarms[:ALARMS_N],
            "alarms_total": len(alarms), "tops": tops, "q": q, "search": search,
            "search_total": total, "charts": charts,
            "note": " ".join(n for n in (
                f"This replica takes a share of the stats (--share {share}): its plots, windows "
                "and missing messages cover that share (missing includes what went to the other "
                "replicas); presence and alarms are complete. Fleet totals: Prometheus."
                if share else "",
                "History disabled (--history none)." if history is None else "") if n) or None}


def fleet_charts(history: History, start: float, end: float) -> list[str]:
    groups = history.series(start, end, POINTS, by_group=True)
    overall = history.series(start, end, POINTS, metrics=[m for m, _, _ in BAND_METRICS],
                             drift=True)
    first, step, n = history.grid(start, end, POINTS)
    xs = [first + (i + 0.5) * step for i in range(n)]
    per_min = step / 60.0
    names = {key: _group_name(key) for key in sorted(groups)}

    def lines(f: Callable[[Point], float | None]) -> dict[str, list[float | None]]:
        return {names[k]: [f(p) for p in groups[k]] for k in names}

    charts = [
        page.line_chart("utterance-rate", "utterances per minute", xs,
                        lines(lambda p: p.counts["utterances"] / per_min if p.counts["windows"]
                              else None), unit="fleet sum, per model", step_s=step),
        page.line_chart("abstain-rate", "abstain rate", xs, lines(lambda p: p.abstain_rate),
                        y_range=(0.0, 1.0), percent=True),
        page.line_chart("estimated-accuracy", "estimated accuracy", xs,
                        lines(lambda p: p.accuracy), y_range=(0.0, 1.0), percent=True),
    ]
    pts = overall.get((), [])
    drift_names = sorted({m for p in pts for m in p.drift},
                         key=lambda m: -max((p.drift_mean(m) or 0.0) for p in pts))
    charts.append(page.line_chart(
        "drift", "drift score (fleet mean, top metrics)", xs,
        {m: [p.drift_mean(m) for p in pts] for m in drift_names[:DRIFT_LINES]}))
    for metric, title, unit in BAND_METRICS:
        bands = [tuple(p.quantiles(metric, (0.1, 0.5, 0.9))) if p.metrics.get(metric)
                 else (None, None, None) for p in pts] if pts else [(None, None, None)] * n
        charts.append(page.band_chart(f"band-{metric}", title, xs, bands,  # type: ignore
                                      unit=unit))
    return charts


def device_view(model: FleetModel, dev_id: str) -> dict[str, Any]:
    with model.reading():
        d = model.state.devices.get(dev_id)
        dj = model.state.device_json(d) if d is not None else None
        recent = model.recent_windows(dev_id)
    charts: list[str] = []
    if recent:
        xs = [r["end"] for r in recent]

        def col(f: Callable[[dict[str, float]], float | None]) -> list[float | None]:
            out = []
            for r in recent:
                v = f(r)
                out.append(None if v is None or math.isnan(v) else v)
            return out

        charts = [
            page.line_chart("dev-utterances", "utterances per window", xs,
                            {"utterances": col(lambda r: r["utterances"])}),
            page.line_chart("dev-abstain", "abstain rate", xs, {"abstain": col(
                lambda r: r["abstained"] / (r["accepted"] + r["abstained"])
                if r["accepted"] + r["abstained"] else None)}, y_range=(0.0, 1.0),
                percent=True),
            page.line_chart("dev-accuracy", "estimated accuracy", xs,
                            {"accuracy": col(lambda r: r["accuracy"])}, y_range=(0.0, 1.0),
                            percent=True),
            page.line_chart("dev-level", "mean input level", xs,
                            {"input_rms_dbfs": col(lambda r: r["rms_dbfs"])}, unit="dBFS"),
        ]
    return {"id": dev_id, "device": dj, "charts": charts}
