"""One device cannot take the fleet down (issue 20): a test per row of the issue's table.

Each attack is scaled down to what proves the point in seconds (the full-scale figures, 10,000
honest devices next to a hostile one, are `benchmarks/bench_fleet.py --hostile`). What every test
holds: the hostile messages are refused whole and counted against their device (or, where they
are valid, bounded by a budget with a counter), every view still renders (/metrics valid,
/api/fleet.json valid JSON, the page, `fleet watch`, `fleet rollout status`), and the honest
devices' totals are exact.
"""

from __future__ import annotations

import copy
import io
import json
import random
import socket
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from agent.fleet.history import History
from agent.fleet.ingest import FleetModel
from agent.fleet.schema import MAX_COUNT, Stats
from agent.fleet.state import (
    MAX_DEVICE_BOOTS,
    MAX_DEVICE_GROUPS,
    MAX_RULES,
    MAX_SEQ_RANGES,
    OTHER,
)
from agent.monitoring.payloads import payload_bytes
from tests.fleet_sim import SimFleet
from tests.mqtt_fixtures import BrokerFactory, mosquitto  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
DEVICES = 5
WINDOWS = 4


# --- the served model and its views ------------------------------------------------------------
def served(history: History | None = None) -> tuple[FleetModel, Any, SimFleet]:
    """A FleetModel fed an honest fleet, and the App that serves its views."""
    from agent.fleet.serve import App

    sim = SimFleet(devices=DEVICES, windows=WINDOWS)
    model = FleetModel(history=history)
    for t, b in sim.messages():
        assert model.ingest(t, b, t.endswith("/birth")) in ("stats", "birth")
    return model, App(model, history, per_device=True, replica="t"), sim


def views(model: FleetModel, app: Any) -> dict[str, bytes]:
    """Every view, checked: /metrics parses, /api/fleet.json is JSON, the page and a device
    page render in every range, `fleet watch` and `fleet rollout status` render."""
    from prometheus_client.parser import text_string_to_metric_families
    from rich.console import Console

    from agent.fleet import rollout, watch
    from agent.fleet import views as views_mod

    body, _ = app.metrics()
    metrics = b"".join(body)
    list(text_string_to_metric_families(metrics.decode()))
    fleet_json = b"".join(app.fleet_json())
    doc = json.loads(fleet_json)
    pages = [app.page({"range": [r]}) for r in views_mod.RANGES]
    for dev in list(doc["devices"])[-2:]:
        app.device(dev)
    with model.reading():
        snap = model.state.to_json()
        rollouts = dict(model.state.rollouts)
    out = io.StringIO()
    Console(file=out, width=200, force_terminal=True).print(watch.render(snap))
    status = rollout.render_text(rollout.summarize(snap, rollouts, "eva"))
    return {"metrics": metrics, "json": fleet_json, "page": max(pages, key=len),
            "watch": out.getvalue().encode(), "status": status.encode()}


_TEMPLATE: dict[float, dict[str, Any]] = {}


def honest_window(sim: SimFleet, dev: str = "evil", seq: int = 0) -> dict[str, Any]:
    """A valid window for `dev` (from a fleet of its own: `sim`'s totals stay the honest)."""
    if sim.end_epoch not in _TEMPLATE:
        _TEMPLATE[sim.end_epoch] = next(SimFleet(devices=1, windows=1, end_epoch=sim.end_epoch)
                                        .stats_payloads(0))
    p = copy.deepcopy(_TEMPLATE[sim.end_epoch])
    p.update(device_id=dev, boot_id="hb", seq=seq)
    return p


def send(model: FleetModel, dev: str, p: Any, kind: str = "stats") -> str:
    raw = p if isinstance(p, bytes) else payload_bytes(p)
    return model.ingest(f"eva/{dev}/{kind}", raw)


def refused(model: FleetModel, dev: str) -> dict[str, int]:
    with model.reading():
        return {k: v for k, v in model.state.devices[dev].errors.items() if v}


def honest_totals_exact(model: FleetModel, sim: SimFleet) -> None:
    with model.reading():
        f = model.state.fleet
        honest = {dev_id: d for dev_id, d in model.state.devices.items()
                  if dev_id.startswith("sim-")}
        windows = sum(d.totals.windows for d in honest.values())
        counts = {k: sum(d.totals.counts[k] for d in honest.values()) for k in sim.totals
                  if k != "windows"}
    assert windows == sim.totals["windows"]
    assert counts == {k: v for k, v in sim.totals.items() if k != "windows"}
    assert f.windows >= windows


# --- the contract ----------------------------------------------------------------------------
FLOAT_MAX = 1.7976931348623157e308
BOUNDS = ("pattern", "maxLength", "minLength", "maximum", "minimum", "maxItems",
          "maxProperties", "enum")


def _alts(s: Any, root: dict[str, Any]) -> list[dict[str, Any]]:
    """A schema's alternatives (anyOf/oneOf), each with the keys around them merged in."""
    while isinstance(s, dict) and "$ref" in s:
        s = root["$defs"][s["$ref"].rsplit("/", 1)[-1]]
    for k in ("anyOf", "oneOf"):
        if k in s:
            rest = {a: b for a, b in s.items() if a not in ("anyOf", "oneOf")}
            return [{**rest, **a} for x in s[k] for a in _alts(x, root)]
    return [s]


def _compare(gen: Any, doc: list[Any], groot: dict, droot: dict, path: str,
             out: list[str]) -> None:
    """Every bound the server's types declare, the documented schema declares too (or a
    stricter enum, every value of which the server's pattern accepts)."""
    import re

    docs = [a for d in doc for a in _alts(d, droot)]
    for alt in _alts(gen, groot):
        if alt.get("type") == "null":
            continue
        for k in BOUNDS:
            if k not in alt or (k in ("maximum", "minimum") and abs(alt[k]) == FLOAT_MAX):
                continue  # +-FLOAT_MAX: finite, which JSON numbers always are
            v = alt[k]
            found = [x[k] for x in docs if k in x]
            if k == "pattern":
                v = v.replace("\\Z", "$")
            if k == "enum":
                found += [[x["const"]] for x in docs if "const" in x]
                ok = any(set(v) == set(f) - {None} for f in found)
            elif k == "pattern" and not found:
                enums = [x["enum"] for x in docs if "enum" in x]
                ok = bool(enums) and all(re.search(alt[k], e) for e in enums[0] if e)
            else:
                ok = v in found
            if not ok:
                out.append(f"{path}: {k} {v!r}, documented {found!r}")
        for name, sub in alt.get("properties", {}).items():
            d = [x["properties"][name] for x in docs if name in x.get("properties", {})]
            if not d:
                out.append(f"{path}.{name}: not documented")
            else:
                _compare(sub, d, groot, droot, f"{path}.{name}", out)
        if isinstance(alt.get("additionalProperties"), dict):
            d = [x["additionalProperties"] for x in docs
                 if isinstance(x.get("additionalProperties"), dict)]
            _compare(alt["additionalProperties"], d, groot, droot, f"{path}.*", out)
        if "propertyNames" in alt:  # the same bounds on the names (alphabets: below)
            _compare(alt["propertyNames"], [x.get("propertyNames", {}) for x in docs], groot,
                     droot, f"{path}.<names>", out)
        if "items" in alt:
            d = [x["items"] for x in docs if "items" in x]
            _compare(alt["items"], d, groot, droot, f"{path}[]", out)


def test_the_documented_schema_states_every_bound_the_server_enforces() -> None:
    gen = msgspec.json.schema(Stats)
    doc = json.loads((ROOT / "docs" / "stats.schema.json").read_text())
    out: list[str] = []
    _compare(gen, [doc], gen, doc, "$", out)
    assert not out, "\n".join(out)
    # the alphabets checked after decoding (agent.fleet.schema.check_stats), documented too
    import re

    from agent.fleet import schema

    def doc_pattern(*path: str | int) -> Any:
        x: Any = doc
        for k in path:
            x = x[k]  # type: ignore[index]
        return x

    assert doc_pattern("$defs", "drift", "properties", "baseline", "pattern") == \
        schema.WORD.replace("\\Z", "$")
    classes = doc_pattern("properties", "outputs", "oneOf", 1, "properties", "classes")
    assert classes["propertyNames"]["pattern"] == schema.LABEL.replace("\\Z", "$")
    for k in ("metrics", "drift"):
        names = doc_pattern("properties", k, "propertyNames", "enum")
        assert names and all(re.search(schema.LEVEL, n) for n in names)


def test_fuzzed_and_random_payloads_are_only_refused_and_counted() -> None:
    """Random bytes, random JSON and mutations of a real window: each is merged (valid) or
    refused with a reason and counted against its device; nothing raises, no view fails."""
    from tests.test_fleet import mangler

    model, app, sim = served()
    rnd = random.Random(20)
    junk = [None, True, -1, 2**53, 2**64, 10**400, 1e308, -0.0, "x", "1.0.0\n", "a" * 70, [],
            {}, [[[[1]]]], {"a": {"b": {"c": {}}}}, "\x1b]0;pwned\x07", "[red]x[/]", 0.5]
    mangle = mangler(rnd, junk, p_delete=0.2, p_deeper=0.6)
    base = honest_window(sim, "fz")
    outcomes: dict[str, int] = {}
    for i in range(1500):
        r = rnd.random()
        if r < 0.1:
            raw = rnd.randbytes(rnd.randrange(1, 400))
        elif r < 0.2:
            raw = json.dumps(_random_json(rnd, 6)).encode()
        elif r < 0.25:
            raw = b"[" * rnd.randrange(500, 5000) + b"]" * rnd.randrange(0, 5000)
        else:
            p = mangle(json.loads(json.dumps({**base, "seq": i})))
            for _ in range(rnd.randrange(3)):
                p = mangle(p) if isinstance(p, dict) else p
            raw = json.dumps(p).encode().replace(b"10000000000000000000000000", b"1e999")
        o = model.ingest("eva/fz/stats", raw)
        outcomes[o] = outcomes.get(o, 0) + 1
    assert set(outcomes) <= {"stats", "duplicate", "invalid_json", "schema", "too_deep",
                             "too_large", "edges_mismatch", "implausible_time"}, outcomes
    assert outcomes.get("stats", 0) > 20 and sum(outcomes.values()) - outcomes.get(
        "stats", 0) - outcomes.get("duplicate", 0) > 500
    errors = refused(model, "fz")
    assert sum(errors.values()) == sum(v for k, v in outcomes.items()
                                       if k not in ("stats", "duplicate"))
    assert model.state.unexpected == 0, model.state.devices["fz"].last_error
    v = views(model, app)
    assert b'eva_ingest_refused_total{device="fz",reason="schema"}' in v["metrics"]
    honest_totals_exact(model, sim)


def _random_json(rnd: random.Random, depth: int) -> Any:
    k = rnd.randrange(6 if depth else 4)
    if k == 0:
        return rnd.choice([None, True, False])
    if k == 1:
        return rnd.choice([rnd.randrange(-10**20, 10**20), rnd.uniform(-1e300, 1e300)])
    if k in (2, 3):
        return "".join(rnd.choice("ab\n[]/\x1b") for _ in range(rnd.randrange(8)))
    if k == 4:
        return [_random_json(rnd, depth - 1) for _ in range(rnd.randrange(4))]
    return {rnd.choice(["schema", "seq", "model", "counts", "x"]): _random_json(rnd, depth - 1)
            for _ in range(rnd.randrange(4))}


# --- row 1: huge names -------------------------------------------------------------------------
def test_row1_windows_with_50kb_model_names_are_refused_and_counted() -> None:
    model, app, sim = served()
    before = views(model, app)
    for seq in range(40):
        p = honest_window(sim, seq=seq)
        p["model"] = {**p["model"], "name": "m" * 50_000}
        assert send(model, "evil", p) == "schema"
    assert refused(model, "evil") == {"schema": 40}
    after = views(model, app)
    assert b'eva_ingest_refused_total{device="evil",reason="schema"} 40.0' in after["metrics"]
    for k in ("metrics", "json", "page"):
        assert len(after[k]) < len(before[k]) + 20_000, k  # one more device, not 2 MB
    honest_totals_exact(model, sim)


# --- row 2: a new model or rollout id in every window ------------------------------------------
def test_row2_a_new_model_or_rollout_in_every_window_stays_within_the_group_budget() -> None:
    model, app, sim = served()
    with model.reading():
        groups0 = len(model.state.groups)

    def flood(first: int, n: int) -> dict[str, bytes]:
        for seq in range(first, first + n):
            p = honest_window(sim, seq=seq)
            p["model"] = {**p["model"], "name": f"m{seq}"}
            p["rollout"] = {**(sim.rollout(0) or {}), "id": f"r{seq}"}
            assert send(model, "evil", p) == "stats"
        return views(model, app)

    few = flood(0, 20)
    many = flood(20, 300)
    for k in ("metrics", "json", "page"):
        assert len(many[k]) < len(few[k]) + 2_000, k  # 300 more names: no more series
    with model.reading():
        assert len(model.state.groups) == groups0 + MAX_DEVICE_GROUPS + 1  # and OTHER
        assert model.state.capped["groups"] == 320 - MAX_DEVICE_GROUPS
        assert OTHER in model.state.groups
        assert model.state.groups[OTHER].windows == 320 - MAX_DEVICE_GROUPS
    assert b'eva_fleet_capped_total{budget="groups"} 316.0' in many["metrics"]
    honest_totals_exact(model, sim)


# --- row 3: a counter of 10^400 -----------------------------------------------------------------
def test_row3_counters_beyond_2_to_53_are_refused_and_every_view_survives() -> None:
    model, app, sim = served()
    for seq, (where, key) in enumerate([("counts", "utterances"), ("since_boot", "frames"),
                                        ("counts", "frames"), (None, "seq")]):
        for value in (10**400, 2**53, -1):
            p = honest_window(sim, seq=seq)
            if where is None:
                p[key] = value
            else:
                p[where] = {**p[where], key: value}
            raw = json.dumps(p).encode()
            assert send(model, "evil", raw) == "schema", (where, key, value)
    p = honest_window(sim, seq=10)
    p["counts"] = {**p["counts"], "utterances": MAX_COUNT}  # the largest allowed: merged
    assert send(model, "evil", p) == "stats"
    from tests.test_fleet import alarm

    for key in ("seq", "outbox_dropped"):  # an alarm's numbers too
        a = json.dumps({**alarm("evil", "hb", 50, "raised"), key: 10**400}).encode()
        assert model.ingest("eva/evil/alarm", a) == "schema"
    assert refused(model, "evil") == {"schema": 14}
    views(model, app)
    honest_totals_exact(model, sim)


# --- row 4: 2^62 utterances and the history's sums ---------------------------------------------
def test_row4_the_history_never_overflows_and_no_flush_is_lost(tmp_path: Path) -> None:
    from agent.fleet.state import Totals

    h = History(tmp_path / "h.sqlite")
    model, app, sim = served(h)
    for seq in range(2):
        p = honest_window(sim, seq=seq)
        p["counts"] = {**p["counts"], "utterances": 2**62}
        assert send(model, "evil", p) == "schema"  # beyond 2^53: refused
    model.settle()
    h.flush()
    # the most a window may carry, from many windows in one flush and over several flushes:
    # the sums pass 2^63 (SQLite's integers) and every other group's rows still land
    now = time.time()
    bucket = int(now // h.bucket_s * h.bucket_s)
    for _ in range(3):
        big = Totals()
        big.windows = 2**62
        big.counts = {k: 2**62 + 5 for k in big.counts}
        big.acc_n = 2**63
        h.add_totals(bucket, ("evil", "1", "", ""), big, [[], []])
        h.add_totals(bucket, ("m", "1", "", ""), Totals(windows=1), [[], []])
        h.flush()
    series = h.series(now - 3600, now + 3600, 10, by_group=True)
    pts = [pt for key, pts in series.items() if key[0] == "m" for pt in pts]
    assert sum(pt.counts["windows"] for pt in pts) == 3
    assert h.clamped > 0  # and flagged
    v = views(model, app)
    assert b"<svg" in v["page"]
    honest_totals_exact(model, sim)


# --- row 6: deep nesting -------------------------------------------------------------------------
def test_row6_deep_nesting_is_refused_and_counted_never_dropped_silently() -> None:
    model, app, sim = served()
    for depth in (990, 5000, 30_000):
        nest = "[" * depth + "]" * depth
        event = ('{"schema":1,"device_id":"evil","boot_id":"hb","seq":1,"event":"x",'
                 f'"extra":{nest}}}').encode()
        p = honest_window(sim, seq=depth)
        stats = payload_bytes(p).replace(b'"model":{', b'"model":{"x":' + nest.encode() + b",")
        for kind, raw in (("event", event), ("stats", stats)):
            if len(raw) > 65536:
                raw = raw[:65536]
            o = model.ingest(f"eva/evil/{kind}", raw)
            assert o in ("event", "stats", "too_deep", "invalid_json"), (depth, kind, o)
    errors = refused(model, "evil")
    assert errors.get("too_deep", 0) >= 2, errors
    with model.reading():
        assert model.state.unexpected == 0
        outcomes = dict(model.outcomes)
    assert sum(outcomes.values()) == DEVICES * (WINDOWS + 1) + 6  # every message accounted for
    v = views(model, app)
    assert json.loads(v["json"])["devices"]["evil"]["errors"]["too_deep"] >= 2
    honest_totals_exact(model, sim)


# --- row 7: HTTP ----------------------------------------------------------------------------------
def _get(addr: tuple[str, int], path: str, method: str = "GET", timeout_s: float = 10.0,
         source: str = "") -> tuple[int, dict[str, str], bytes]:
    import http.client

    c = http.client.HTTPConnection(*addr, timeout=timeout_s,
                                   source_address=(source, 0) if source else None)
    try:
        c.request(method, path)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def test_row7_idle_connections_time_out_are_capped_and_views_answer(
        mosquitto: BrokerFactory, tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.fleet import serve

    monkeypatch.setattr(serve, "HTTP_TIMEOUT_S", 1.0, raising=False)
    monkeypatch.setattr(serve, "MAX_CONNECTIONS", 12, raising=False)
    monkeypatch.setattr(serve, "MAX_PER_CLIENT", 4, raising=False)
    broker = mosquitto()
    s = serve.Server(broker_url=broker.url, listen=("127.0.0.1", 0), history_path=None)
    s.start()
    idle: list[socket.socket] = []
    try:
        for _ in range(20):  # more idle connections than the server takes
            idle.append(socket.create_connection(s.address, timeout=5))
        t0 = time.monotonic()
        status, headers, body = _get(s.address, "/healthz", timeout_s=5)
        assert status in (200, 503)  # answered at once either way: the accept loop is free
        # another client is served at once: one address cannot take every slot
        status, headers, body = _get(s.address, "/healthz", timeout_s=2, source="127.0.0.2")
        assert status == 200 and body == b"ok\n"
        # every idle connection is closed by the server within its timeout (recv sees EOF)
        for c in idle:
            c.settimeout(5)
            try:
                assert c.recv(1024) is not None  # b"" (closed) or the 503
            except ConnectionResetError:
                pass
        assert time.monotonic() - t0 < 4.5
        status, headers, body = _get(s.address, "/healthz")
        assert status == 200 and body == b"ok\n"
        assert "default-src 'none'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
        status, headers, body = _get(s.address, "/", method="HEAD")
        assert status == 200 and body == b"" and int(headers["content-length"]) > 0
        status, headers, _ = _get(s.address, "/nope")
        assert status == 404 and headers["x-content-type-options"] == "nosniff"
    finally:
        for c in idle:
            c.close()
        s.stop()


# --- row 8: the MQTT link ----------------------------------------------------------------------
def _vm(field: str) -> int:
    """This process's /proc/self/status field, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def test_row8_a_huge_packet_never_reaches_the_link_and_costs_it_no_memory(
        mosquitto: BrokerFactory, tmp_path: Path) -> None:  # noqa: F811
    """A 24 MB publish (the row's 260 MB cost 800 MiB when the reader grew a buffer to hold
    it) to a broker without a max_packet_size of its own: the link's MQTT 5 Maximum Packet
    Size (the same limit as our broker configuration's) keeps the broker from sending it, so
    the next message arrives on the same connection and the peak RSS does not move."""
    import shutil
    import subprocess
    import threading

    from agent.fleet.subscriber import MAX_PACKET, Subscriber

    pytest.importorskip("gmqtt", reason="the fleet extra (gmqtt)")
    pub = shutil.which("mosquitto_pub")
    if pub is None:
        pytest.skip("mosquitto_pub not found (apt-get install -y mosquitto-clients)")
    conf = (ROOT / "docs" / "mosquitto" / "mosquitto.conf").read_text()
    assert f"max_packet_size {MAX_PACKET}" in conf  # the same limit as the broker's
    broker = mosquitto()
    got: list[bytes] = []
    arrived = threading.Event()

    def ingest(topic: str, payload: bytes, retained: bool) -> None:
        got.append(payload)
        if payload == b"end":
            arrived.set()

    link = Subscriber(ingest, host=broker.host, port=broker.port, tls=False,
                      topic_filter="eva/+/stats", client_id="eva-serve-row8")
    link.start()
    try:
        huge = tmp_path / "huge"
        huge.write_bytes(b"x" * (24 << 20))
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to now
        rss0 = _vm("VmRSS")
        for args in (["-f", str(huge)], ["-m", "end"]):
            subprocess.run([pub, "-h", broker.host, "-p", str(broker.port), "-q", "1",
                            "-t", "eva/d1/stats", *args], check=True, timeout=60)
        assert arrived.wait(10)
        assert got == [b"end"] and link.connections == 1 and link.connected
        assert _vm("VmHWM") - rss0 < 16 * 1024  # KiB: no 24 MB buffer ever
    finally:
        link.stop()


# --- row 9: terminal output ----------------------------------------------------------------------
def test_row9_device_strings_reach_the_terminal_as_inert_text() -> None:
    from rich.console import Console

    from agent.fleet import rollout, watch

    model, app, sim = served()
    snap = model.state.to_json()
    hostile = "fsdd[/] [bold red]x\x1b[2J\x1b]0;title\x07\x1b]52;c;cHduZWQ=\x07\u202e"
    d = snap["devices"]["sim-00000"]
    d["model"] = {"name": hostile, "version": hostile, "slot": hostile}
    d["last_window"] = {**(d["last_window"] or {}), "model": d["model"],
                        "rollout": {"state": hostile, "id": hostile}}
    d["active_alarms"] = [{"metric": hostile, "scope": hostile}]
    d["events"] = [{"event": hostile}]
    snap["fleet"]["metrics"] = {hostile: {"count": 1, "stage": hostile, "unit": hostile,
                                          "mean": 1.0, "p50": 1.0, "p95": 1.0}}
    out = io.StringIO()
    Console(file=out, width=400, force_terminal=False, color_system=None).print(
        watch.render(snap))
    text = out.getvalue()
    assert "fsdd[/]" in text and "[bold red]" in text  # shown, not interpreted
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    status = rollout.render_text(rollout.summarize(snap, {}, "eva"))
    assert "\x1b" not in status and "\x07" not in status and "fsdd[/]" in status
    # and such strings do not even get in: not a name, refused at the door
    p = honest_window(sim, seq=0)
    p["model"] = {**p["model"], "name": "fsdd[/]"}
    assert send(model, "evil", p) == "schema"


# --- row 10: far-future windows and the prune -----------------------------------------------------
def test_row10_far_future_windows_are_refused_and_never_reach_the_history(
        tmp_path: Path) -> None:
    h = History(tmp_path / "h.sqlite")
    model, app, sim = served(h)
    future = SimFleet(devices=1, windows=3, end_epoch=time.time() + 400 * 86400)
    for p in future.stats_payloads(0):
        p["device_id"] = "evil"
        assert send(model, "evil", p) == "implausible_time"
    past = SimFleet(devices=1, windows=3, end_epoch=time.time() - 400 * 86400)
    for p in past.stats_payloads(0):  # synchronised and a year old: refused too
        p["device_id"] = "evil"
        assert send(model, "evil", p) == "implausible_time"
    for p in SimFleet(devices=1, windows=2, end_epoch=100_000.0).stats_payloads(0):
        p["device_id"] = "rtc"  # a board without RTC, honest about it: counted, not plotted
        p["window"]["utc_synced"] = False
        assert send(model, "rtc", p) == "stats"
    model.settle()
    h.flush()
    with h._dblock:
        buckets = [r[0] for r in h._db.execute("SELECT DISTINCT bucket FROM windows")]
    assert buckets and all(abs(b - time.time()) < 2 * 86400 for b in buckets)
    assert refused(model, "evil") == {"implausible_time": 6}
    views(model, app)
    honest_totals_exact(model, sim)


def test_row10_history_is_pruned_by_the_servers_receive_time(tmp_path: Path) -> None:
    """A device whose clock runs ahead (here 20 h: inside the plausibility window) writes
    buckets in the future; they go when they are `days` old by the server's clock, like every
    other window received then, not when the server's clock reaches the device's."""
    t0 = 1_800_000_000.0
    now = [t0]
    h = History(tmp_path / "h.sqlite", days=1.0)
    model = FleetModel(history=h, clock=lambda: now[0])
    for dev, end in (("skewed", t0 + 20 * 3600), ("honest", t0)):
        for p in SimFleet(devices=1, windows=3, end_epoch=end).stats_payloads(0):
            p["device_id"] = dev
            assert send(model, dev, p) == "stats"
    model.settle()
    h.flush()
    now[0] = t0 + 86400 + 3600  # a day and an hour later by the server's clock
    for p in SimFleet(devices=1, windows=2, end_epoch=now[0]).stats_payloads(0):
        p.update(device_id="honest", boot_id="b1")
        assert send(model, "honest", p) == "stats"
    model.settle()
    h.flush()
    assert h.prune(now[0]) > 0
    (pts,) = h.series(t0 - 86400, t0 + 3 * 86400, 1).values()
    assert sum(pt.counts["windows"] for pt in pts) == 2  # only what arrived within the day


@pytest.mark.parametrize("by", ["size", "age"])
def test_row10_a_prune_never_vacuums_and_holds_the_lock_a_slice_at_a_time(
        tmp_path: Path, by: str) -> None:
    from agent.fleet import history
    from agent.fleet.state import Totals

    h = History(tmp_path / "h.sqlite", max_mb=0.05 if by == "size" else 512.0)
    now = time.time()
    rows = 600 if by == "size" else 3 * history.SLICE_ROWS + 10
    for i in range(rows):  # by age: all received 20 days ago, buckets from then until now
        h.add_totals(int(now - i * 300) // 300 * 300, (f"m{i % 7}", "1", "", ""),
                     Totals(windows=1), [[], []],
                     received=now if by == "size" else now - 20 * 86400)
    h.flush()
    assert by == "age" or h.size_bytes() > h.max_bytes
    statements: list[str] = []
    h._db.set_trace_callback(statements.append)
    held: list[float] = []
    real = h._dblock

    class Timed:
        def __enter__(self) -> None:
            real.acquire()
            self.t = time.perf_counter()

        def __exit__(self, *a: Any) -> None:
            held.append(time.perf_counter() - self.t)
            real.release()

    h._dblock = Timed()  # type: ignore[assignment]
    removed = h.prune(now)
    h._dblock = real
    assert h.size_bytes() <= h.max_bytes
    assert not [s for s in statements if "VACUUM" in s.upper()]
    assert len(held) > 2  # released between slices
    if by == "age":
        assert removed == rows and not h.series(now - 30 * 86400, now + 1, 1)
        assert len(held) >= rows // history.SLICE_ROWS + 1  # a slice per hold
    else:
        assert 0 < removed < rows


# --- row 11: unbounded per-device state -------------------------------------------------------
def test_row11_boots_rules_seq_jumps_and_sys_values_are_bounded() -> None:
    from tests.test_fleet import alarm, birth, enc

    model, app, sim = served()
    for b in range(100):  # a new boot in every message
        assert model.ingest("eva/evil/birth", enc(birth("evil", f"b{b}"))) == "birth"
        p = honest_window(sim, seq=0)
        p["boot_id"] = f"b{b}"
        assert send(model, "evil", p) == "stats"
        assert model.ingest("eva/evil/alarm", enc(alarm("evil", f"b{b}", 1, "raised"))) \
            == "alarm"
    for i in range(200):  # a new alarm rule in every message
        a = alarm("evil", "b99", 2 + i, "raised", threshold=0.001 * i + 0.5)
        assert model.ingest("eva/evil/alarm", enc(a)) == "alarm"
    for seq in range(1000, 1000 + 2 * 600, 2):  # every other seq: a range each
        p = honest_window(sim, seq=seq)
        p["boot_id"] = "b99"
        send(model, "evil", p)
    p = honest_window(sim, seq=10**15)  # one jump
    p["boot_id"] = "b99"
    assert send(model, "evil", p) == "stats"
    for v in (b"nan", b"inf", b"-inf", b"1e400", b"x" * 100):
        assert model.ingest("$SYS/broker/publish/messages/dropped", v) == "sys"
    with model.reading():
        d = model.state.devices["evil"]
        assert len(d.seqs) <= MAX_DEVICE_BOOTS and len(d.births) <= MAX_DEVICE_BOOTS
        assert len(d.alarms) <= MAX_DEVICE_BOOTS
        assert len(d.alarms["b99"]) <= MAX_RULES
        s = d.seqs["b99"]
        assert len(s._lo) <= MAX_SEQ_RANGES + 1
        # seqs 0..201 (a window, 201 alarms), then every other one of 1000..2198, then 10^15:
        # 202..999 and the 599 single gaps missing (exact, folded or not), the jump apart
        assert s.missing() == (1000 - 202) + 599
        assert s.jumped() == 1
        assert model.state.capped["boots"] > 0 and model.state.capped["rules"] > 0
        assert model.state.broker_dropped is None
    v = views(model, app)
    doc = json.loads(v["json"])
    assert doc["fleet"]["missing"] < 10_000  # not 10^15
    honest_totals_exact(model, sim)


# --- row 12: full matches ------------------------------------------------------------------------
def test_row12_a_trailing_newline_passes_no_pattern() -> None:
    from tests.test_fleet import alarm, enc

    model, app, sim = served()
    p = honest_window(sim, seq=0)
    for where, key in (("model", "version"), ("model", "name"), (None, "boot_id"),
                       ("window", "end_utc")):
        q = copy.deepcopy(p)
        tgt = q if where is None else q[where]
        tgt[key] = tgt[key] + "\n"
        assert send(model, "evil", q) == "schema", key
    for where in ("metrics", "drift"):  # names checked after decoding, as strictly
        q = copy.deepcopy(p)
        q[where]["input_rms_dbfs\n"] = q[where].pop("input_rms_dbfs")
        assert send(model, "evil", q) == "schema", where
    q = copy.deepcopy(p)
    q["drift"]["input_rms_dbfs"]["baseline"] = "training\n"
    assert send(model, "evil", q) == "schema"
    q = copy.deepcopy(p)
    q["outputs"] = {"classes": {"0\n": 1}, "suppressed": False}
    assert send(model, "evil", q) == "schema"
    a = alarm("evil", "b\n", 1, "raised")
    assert model.ingest("eva/evil/alarm", enc(a)) == "schema"
    assert model.ingest("eva/evil\n/stats", payload_bytes(p)) == "unknown_topic"
    assert refused(model, "evil") == {"schema": 9}
    views(model, app)
    from agent.telemetry.message import check_level, topic  # and on the device's side

    for bad in ("dev\n", "eva\n"):
        with pytest.raises(ValueError):
            check_level(bad)
        with pytest.raises(ValueError):
            topic(bad, "d", "stats")


def test_honest_messages_are_kept_exactly_as_they_came() -> None:
    """The bounded types drop nothing an honest agent sends: its event, its birth's fields and
    its window's model and rollout reach /api/fleet.json as they were published."""
    model, app, sim = served()
    e = {"schema": 1, "device_id": "sim-00000", "boot_id": "b0", "seq": 99,
         "event": "rollout_received", "rollout_id": "r-2.0.0", "model": "fsdd-digits@2.0.0",
         "previous": None, "state": "shadow", "reason": "shadow r-2.0.0", "window_end_s": 1.5,
         "historical": True, "outbox_dropped": 2}
    assert send(model, "sim-00000", e, "event") == "event"
    doc = json.loads(views(model, app)["json"])
    d = doc["devices"]["sim-00000"]
    assert d["events"] == [e]
    last = next(p for p in SimFleet(devices=1, windows=WINDOWS, end_epoch=sim.end_epoch)
                .stats_payloads(0) if p["seq"] == WINDOWS - 1)
    assert d["last_window"]["model"] == last["model"]
    assert d["last_window"]["rollout"] == last["rollout"]
    birth = json.loads(sim.birth(0)[1])
    assert d["model"] == birth["model"]
    assert {k: d[k] for k in ("agent_version", "config_digest", "window_s")} == \
        {k: birth[k] for k in ("agent_version", "config_digest", "window_s")}
