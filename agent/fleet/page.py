"""The operator's web page: HTML with server-rendered SVG plots (no script, no CDN).

Pure functions from data to markup: `fleet_page(view)` and `device_page(view)`. `serve.py`
collects the view (under the model's lock, from History for the plots). Built for 10,000
devices: the front page shows counts, the alarms now (first 50), top-N lists and a search box,
never one row per device. Every plotted point is an SVG element carrying its value in `data-*`
attributes (and a tooltip), so a test can read the rendered DOM.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any

W, H = 560, 180                 # plot size in px
PAD_L, PAD_R, PAD_T, PAD_B = 62, 12, 22, 26
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
           "#e377c2", "#7f7f7f", "#bcbd22")

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 8px} h2{font-size:16px;margin:18px 0 6px}
.kpis{display:flex;flex-wrap:wrap;gap:8px}
.kpi{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px 12px;min-width:90px}
.kpi b{display:block;font-size:20px} .bad b{color:#c62828} .ok b{color:#2e7d32}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.chart{background:#fff;border:1px solid #ddd;border-radius:6px}
.chart text{font-size:11px;fill:#444} .chart .t{font-size:12px;font-weight:600;fill:#222}
table{border-collapse:collapse;background:#fff} td,th{border:1px solid #ddd;padding:3px 8px;
text-align:right} td:first-child,th:first-child{text-align:left}
.muted{color:#777} form{margin:6px 0} a{color:#1565c0}
"""


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}g}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def short_utc(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).strftime("%m-%d %H:%M")


def _nice_range(lo: float, hi: float) -> tuple[float, float]:
    if lo == hi:
        lo, hi = lo - 1, hi + 1
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def line_chart(chart_id: str, title: str, xs: Sequence[float],
               series: Mapping[str, Sequence[float | None]], *, unit: str = "",
               y_range: tuple[float, float] | None = None, percent: bool = False,
               step_s: float | None = None) -> str:
    """Lines over time; each point a <circle class="pt" data-series data-x data-y>; `step_s`
    (the time each point covers) goes to the svg's data-step."""
    vals = [v for s in series.values() for v in s if v is not None]
    x0, x1 = (xs[0], xs[-1]) if xs else (0.0, 1.0)
    if x1 == x0:
        x1 = x0 + 1
    if y_range is None:
        y_range = _nice_range(min(vals), max(vals)) if vals else (0.0, 1.0)
    y0, y1 = y_range

    def px(x: float) -> float:
        return PAD_L + (x - x0) / (x1 - x0) * (W - PAD_L - PAD_R)

    def py(y: float) -> float:
        return H - PAD_B - (y - y0) / (y1 - y0) * (H - PAD_T - PAD_B)

    step = f' data-step="{step_s:g}"' if step_s else ""
    out = [f'<svg class="chart" id="{escape(chart_id)}" data-title="{escape(title)}"{step} '
           f'width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img">',
           f'<text class="t" x="{PAD_L}" y="14">{escape(title)}'
           f'{" (" + escape(unit) + ")" if unit else ""}</text>']
    for frac in (0.0, 0.5, 1.0):
        y = y0 + frac * (y1 - y0)
        label = _pct(y) if percent else _fmt(y)
        out.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{py(y):.1f}" y2="{py(y):.1f}" '
                   f'stroke="#eee"/><text x="{PAD_L - 4}" y="{py(y) + 4:.1f}" '
                   f'text-anchor="end">{label}</text>')
    if xs:
        out.append(f'<text x="{PAD_L}" y="{H - 8}">{short_utc(xs[0])}</text>'
                   f'<text x="{W - PAD_R}" y="{H - 8}" text-anchor="end">{short_utc(xs[-1])} UTC'
                   '</text>')
    for i, (name, ys) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        out.append(f'<g class="series" data-series="{escape(name)}" stroke="{colour}" '
                   f'fill="{colour}">')
        pts = [(px(x), py(y)) for x, y in zip(xs, ys, strict=True) if y is not None]
        if len(pts) > 1:
            out.append('<polyline fill="none" stroke-width="1.5" points="'
                       + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
        for x, y in zip(xs, ys, strict=True):
            if y is None:
                continue
            shown = _pct(y) if percent else _fmt(y, 4)
            out.append(f'<circle class="pt" r="2" cx="{px(x):.1f}" cy="{py(y):.1f}" '
                       f'data-series="{escape(name)}" data-x="{x:.0f}" data-y="{y:.6g}">'
                       f'<title>{escape(name)} {short_utc(x)}: {shown}</title></circle>')
        out.append(f'<text x="{W - PAD_R - 4}" y="{PAD_T + 12 * (i + 1)}" text-anchor="end" '
                   f'stroke="none">{escape(name)}</text></g>')
    if not vals:
        out.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no data yet</text>')
    out.append("</svg>")
    return "".join(out)


def band_chart(chart_id: str, title: str, xs: Sequence[float],
               bands: Sequence[tuple[float | None, float | None, float | None]], *,
               unit: str = "") -> str:
    """p10–p90 band and the p50 line from merged histograms; points carry data-p10/50/90."""
    vals = [v for b in bands for v in b if v is not None]
    x0, x1 = (xs[0], xs[-1]) if xs else (0.0, 1.0)
    if x1 == x0:
        x1 = x0 + 1
    y0, y1 = _nice_range(min(vals), max(vals)) if vals else (0.0, 1.0)

    def px(x: float) -> float:
        return PAD_L + (x - x0) / (x1 - x0) * (W - PAD_L - PAD_R)

    def py(y: float) -> float:
        return H - PAD_B - (y - y0) / (y1 - y0) * (H - PAD_T - PAD_B)

    out = [f'<svg class="chart band" id="{escape(chart_id)}" data-title="{escape(title)}" '
           f'width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img">',
           f'<text class="t" x="{PAD_L}" y="14">{escape(title)} ({escape(unit)}; p10–p90 '
           'band, p50 line)</text>']
    for frac in (0.0, 0.5, 1.0):
        y = y0 + frac * (y1 - y0)
        out.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{py(y):.1f}" y2="{py(y):.1f}" '
                   f'stroke="#eee"/><text x="{PAD_L - 4}" y="{py(y) + 4:.1f}" '
                   f'text-anchor="end">{_fmt(y)}</text>')
    if xs:
        out.append(f'<text x="{PAD_L}" y="{H - 8}">{short_utc(xs[0])}</text>'
                   f'<text x="{W - PAD_R}" y="{H - 8}" text-anchor="end">{short_utc(xs[-1])} UTC'
                   '</text>')
    full = [(x, b) for x, b in zip(xs, bands, strict=True) if None not in b]
    if len(full) > 1:
        top = " ".join(f"{px(x):.1f},{py(b[2]):.1f}" for x, b in full)  # type: ignore[arg-type]
        bottom = " ".join(f"{px(x):.1f},{py(b[0]):.1f}"  # type: ignore[arg-type]
                          for x, b in reversed(full))
        out.append(f'<polygon fill="#90caf9" fill-opacity="0.5" points="{top} {bottom}"/>')
        out.append('<polyline fill="none" stroke="#0d47a1" stroke-width="1.5" points="'
                   + " ".join(f"{px(x):.1f},{py(b[1]):.1f}"  # type: ignore[arg-type]
                              for x, b in full) + '"/>')
    for x, (lo, mid, hi) in full:
        out.append(f'<circle class="pt" r="2" fill="#0d47a1" cx="{px(x):.1f}" '
                   f'cy="{py(mid):.1f}" data-x="{x:.0f}" data-p10="{lo:.6g}" '  # type: ignore
                   f'data-p50="{mid:.6g}" data-p90="{hi:.6g}"><title>{short_utc(x)}: p10 '
                   f'{_fmt(lo)}, p50 {_fmt(mid)}, p90 {_fmt(hi)}</title></circle>')
    if not full:
        out.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no data yet</text>')
    out.append("</svg>")
    return "".join(out)


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}"
            f"</title><meta name=viewport content='width=device-width'><style>{CSS}</style>"
            f"</head><body>{body}</body></html>")


def _kpi(label: str, value: Any, cls: str = "") -> str:
    return f'<div class="kpi {cls}" data-kpi="{escape(label)}"><b>{escape(str(value))}</b>' \
           f"{escape(label)}</div>"


def _dev_link(dev: str) -> str:
    return f'<a href="/device/{escape(dev)}">{escape(dev)}</a>'


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], table_id: str) -> str:
    if not rows:
        return '<p class="muted">none</p>'
    h = "".join(f"<th>{escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table id="{table_id}"><tr>{h}</tr>{body}</table>'


def fleet_page(v: Mapping[str, Any]) -> str:
    """`v`: kpis, alarms (+ alarms_total), plots (xs, series...), top lists, search."""
    k = v["kpis"]
    parts = [f"<h1>eva fleet · {escape(v['prefix'])} · {escape(v['replica'])}</h1>",
             f'<p class="muted">generated {escape(v["generated"])} · range '
             + " ".join(f'<a href="/?range={r}">{r}</a>' for r in v["ranges"])
             + f" · shown: {escape(v['range'])} · <a href='/api/fleet.json'>fleet.json</a> · "
             "<a href='/metrics'>metrics</a></p>",
             '<div class="kpis">',
             _kpi("devices", k["devices"]), _kpi("online", k["online"], "ok"),
             _kpi("offline", k["offline"], "bad" if k["offline"] else ""),
             _kpi("unknown", k["unknown"]),
             _kpi("active alarms", k["active_alarms"], "bad" if k["active_alarms"] else ""),
             _kpi("missing msgs", k["missing"], "bad" if k["missing"] else ""),
             _kpi("duplicates", k["duplicates"]), _kpi("invalid", k["invalid"]),
             _kpi("messages", k["messages"]), "</div>"]
    if v.get("note"):
        parts.append(f'<p class="muted">{escape(v["note"])}</p>')
    parts.append(f"<h2>Alarms now ({v['alarms_total']})</h2>")
    parts.append(_table(("device", "metric", "stage", "scope", "value", "threshold", "reason"),
                        [(_dev_link(a["device"]), escape(a["metric"]), escape(a["stage"]),
                          escape(a["scope"]), _fmt(a["value"]), _fmt(a["threshold"]),
                          escape(a.get("reason") or ""))
                         for a in v["alarms"]], "alarms"))
    parts.append("<h2>Over time</h2><div class=grid>")
    parts.extend(v["charts"])
    parts.append("</div>")
    parts.append("<h2>Devices</h2>"
                 "<form action='/' method=get><input name=q placeholder='device id contains…' "
                 f"value='{escape(v.get('q') or '')}'> <button>search</button></form>")
    if v.get("q") is not None:
        parts.append(f"<p>{v['search_total']} match(es); first {len(v['search'])}:</p>")
        parts.append(_device_rows(v["search"], "search"))
    for title, rows, table_id in v["tops"]:
        parts.append(f"<h2>{escape(title)}</h2>")
        parts.append(_device_rows(rows, table_id))
    return _page("eva fleet", "".join(parts))


def _device_rows(rows: Sequence[Mapping[str, Any]], table_id: str) -> str:
    return _table(("device", "state", "model", "windows", "abstain", "est. acc", "missing",
                   "alarms", "rollout"),
                  [(_dev_link(r["device"]), {True: "online", False: "offline"}.get(
                      r["online"], "?"), escape(r["model"]), str(r["windows"]),
                    _pct(r["abstain_rate"]), _pct(r["accuracy"]), str(r["missing"]),
                    str(r["alarms"]), escape(r.get("rollout") or "–")) for r in rows], table_id)


def _rollout_section(ro: Any) -> str:
    """The device's rollout as its last window reported it (agent.rollout: state, reason,
    candidate, probation, builds remembered as failed)."""
    if not isinstance(ro, dict) or not ro.get("state"):
        return "<h2>Rollout</h2><p class='muted'>none reported</p>"
    prob = ro.get("probation") or {}
    rows = [("state", ro.get("state")), ("rollout", ro.get("id")),
            ("candidate", ro.get("candidate")), ("previous", ro.get("previous")),
            ("probation", f"{prob.get('windows_done')}/{prob.get('windows_total')} windows"
             if prob else None), ("reason", ro.get("reason")),
            ("failed builds (never re-activated)", ", ".join(ro.get("failed") or []) or None)]
    return "<h2>Rollout</h2>" + _table(("", ""), [(escape(k), escape(str(x))) for k, x in rows
                                                   if x is not None], "device-rollout")


def device_page(v: Mapping[str, Any]) -> str:
    d = v["device"]
    parts = [f"<h1>device {escape(v['id'])}</h1><p><a href='/'>← fleet</a></p>"]
    if d is None:
        parts.append("<p>unknown device (not seen by this replica)</p>")
        return _page(f"eva device {v['id']}", "".join(parts))
    model = d.get("model") or {}
    parts.append('<div class="kpis">'
                 + _kpi("state", {True: "online", False: "offline"}.get(d["online"], "?"),
                        "ok" if d["online"] else "bad")
                 + _kpi("model", f"{model.get('name', '?')} {model.get('version', '')}")
                 + _kpi("agent", d.get("agent_version") or "?")
                 + _kpi("boot", (d.get("boot_id") or "–")[:8])
                 + _kpi("windows", d["windows"])
                 + _kpi("abstain", _pct(d["abstain_rate"]))
                 + _kpi("est. accuracy", _pct(d["estimated_accuracy"]["value"]))
                 + _kpi("missing", d["missing"], "bad" if d["missing"] else "")
                 + _kpi("duplicates", d["duplicates"]) + "</div>")
    parts.append(_rollout_section((d.get("last_window") or {}).get("rollout")))
    parts.append("<h2>Active alarms</h2>")
    parts.append(_table(("metric", "stage", "scope", "value", "threshold", "reason"),
                        [(escape(a["metric"]), escape(a["stage"]), escape(a["scope"]),
                          _fmt(a["value"]), _fmt(a["threshold"]), escape(a["reason"]))
                         for a in d["active_alarms"]], "device-alarms"))
    parts.append("<h2>Recent windows</h2><div class=grid>")
    parts.extend(v["charts"])
    parts.append("</div><h2>Distributions (all windows received)</h2>")
    parts.append(_table(("metric", "n", "mean", "p50", "p95", "min", "max"),
                        [(escape(n), str(m["count"]), _fmt(m["mean"], 4), _fmt(m["p50"], 4),
                          _fmt(m["p95"], 4), _fmt(m["min"], 4), _fmt(m["max"], 4))
                         for n, m in d["metrics"].items() if m["count"]], "device-metrics"))
    parts.append("<h2>Boots</h2>")
    parts.append(_table(("boot", "first seq", "last seq", "received", "missing"),
                        [(escape(b), str(x["first_seq"]), str(x["last_seq"]),
                          str(x["received"]), str(x["missing"]))
                         for b, x in d["boots"].items()], "device-boots"))
    return _page(f"eva device {v['id']}", "".join(parts))
