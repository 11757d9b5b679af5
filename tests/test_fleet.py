"""Fleet side: FleetState merging (pure) and `fleet watch` against a real mosquitto."""

from __future__ import annotations

import json
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.fleet.state import FleetState, SeqSet
from agent.monitoring.drift import AlarmEvent
from agent.monitoring.metric_catalog import BY_NAME, DRIFT_ONLY, METRICS
from agent.monitoring.payloads import alarm_payload, stats_payload
from agent.monitoring.windows import COUNTERS, WindowAggregator, WindowSummary, merge_summaries
from agent.telemetry import Message, topic
from agent.telemetry.mqtt import MqttOptions, MqttSink
from tests.mqtt_fixtures import Broker, BrokerFactory, free_port, mosquitto

__all__ = ["mosquitto"]  # fixture

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"name": "fsdd-digits", "version": "0.1.0"}
PROCESS = {"cpu_percent": 3.5, "rss_mb": 80.0}
ANCHOR = 1_700_000_000.0
FAST = MqttOptions(reconnect_min_s=0.05, reconnect_max_s=0.5, keepalive_s=10)


# --- building realistic windows and payloads ------------------------------------------------
def make_windows(seed: int, n: int, window_s: float = 10.0, utterances: tuple[int, int] = (20, 40),
                 start_window: int = 0) -> list[WindowSummary]:
    """`n` windows of random but seeded utterances (>= k = 20 by default, so every metric's
    histogram is published) covering every counter and most metrics."""
    rng = np.random.default_rng(seed)
    agg = WindowAggregator(window_s, start_s=start_window * window_s)
    for w in range(start_window, start_window + n):
        k = int(rng.integers(*utterances))
        for t in np.sort(rng.uniform(w * window_s, (w + 1) * window_s - 1e-3, size=k)):
            agg.count("frames", int(rng.integers(20, 40)), t)
            agg.count("speech_frames", int(rng.integers(5, 20)), t)
            agg.count("utterances", 1, t)
            agg.count("dropped_frames", int(rng.random() < 0.1), t)
            agg.observe("input_rms_dbfs", rng.normal(-30 + 3 * seed, 6), t)
            agg.observe("input_peak_dbfs", rng.normal(-12, 4), t)
            agg.observe("snr_db", rng.normal(20, 6), t)
            agg.observe("noise_floor_dbfs", rng.normal(-60, 5, size=3), t)
            agg.observe("utterance_length_s", rng.lognormal(-0.5, 0.4), t)
            agg.observe("compute_latency_ms", rng.lognormal(1.0, 0.5), t)
            agg.observe("eou_latency_ms", rng.normal(350, 60), t)
            agg.observe("queue_depth", int(rng.integers(0, 5)), t)
            agg.record_decision(str(rng.integers(0, 10)), bool(rng.random() < 0.8), t,
                                confidence=float(rng.beta(8, 2)), margin=float(rng.beta(5, 2)))
    return agg.finish((start_window + n) * window_s)


def stats(w: WindowSummary, dev: str, boot: str, seq: int, **kw: Any) -> dict[str, Any]:
    return stats_payload(w, None, device_id=dev, boot_id=boot, seq=seq, model=MODEL,
                         process=PROCESS, utc_anchor=ANCHOR, **kw)


def alarm(dev: str, boot: str, seq: int, state: str, metric: str = "input_rms_dbfs",
          threshold: float = 0.4, reason: str = "drift >= 0.4") -> dict[str, Any]:
    e = AlarmEvent(metric, BY_NAME[metric].stage, state, 0.5, threshold, 10.0 * seq, reason)
    return alarm_payload(e, device_id=dev, boot_id=boot, seq=seq)


def birth(dev: str, boot: str, edges: dict[str, list[float]] | None = None) -> dict[str, Any]:
    metrics = {m.name: {"stage": m.stage, "unit": m.unit,
                        "edges": (edges or {}).get(m.name, list(m.edges))} for m in METRICS}
    return {"schema": 1, "device_id": dev, "boot_id": boot, "agent_version": "test",
            "model": MODEL, "config_digest": "c0ffee", "window_s": 10, "metrics": metrics}


def enc(p: Any) -> bytes:
    return json.dumps(p).encode()


def mangler(rnd: random.Random, junk: list[Any], *, p_delete: float,
            p_deeper: float) -> Callable[[Any], Any]:
    """A fuzzer: each call changes one field somewhere in a JSON value (deletes it, replaces it
    with junk, or descends into it)."""
    def mangle(x: Any) -> Any:
        if isinstance(x, dict) and x:
            k = rnd.choice(list(x))
            y = dict(x)
            if rnd.random() < p_delete:
                del y[k]
            else:
                y[k] = mangle(x[k]) if rnd.random() < p_deeper else rnd.choice(junk)
            return y
        if isinstance(x, list) and x:
            y = list(x)
            y[rnd.randrange(len(y))] = rnd.choice(junk)
            return y
        return rnd.choice(junk)
    return mangle


def dense(edges: Sequence[float], compact: Sequence[int]) -> np.ndarray:
    """Independent decoding of the run-trimmed `hist` encoding into len(edges)+1 counts."""
    out = np.zeros(len(edges) + 1, dtype=np.int64)
    if compact:
        out[compact[0]:compact[0] + len(compact) - 1] = compact[1:]
    return out


def summed_counts(windows: Sequence[WindowSummary]) -> dict[str, int]:
    return {k: sum(w.counts[k] for w in windows) for k in COUNTERS}


# --- SeqSet ---------------------------------------------------------------------------------
def test_seqset_matches_a_plain_set_in_any_order() -> None:
    rnd = random.Random(7)
    values = [rnd.randrange(200) for _ in range(400)]
    s, ref = SeqSet(), set()
    for v in values:
        assert s.add(v) is (v not in ref)
        ref.add(v)
    assert len(s) == len(ref) and (s.min, s.max) == (min(ref), max(ref))
    expected_missing = sorted(set(range(min(ref), max(ref) + 1)) - ref)
    assert [x for a, b in s.gaps() for x in range(a, b + 1)] == expected_missing
    assert s.missing() == len(expected_missing)
    assert all((v in s) == (v in ref) for v in range(-3, 205))


# --- FleetState: dedup, gaps, presence, alarms ----------------------------------------------
def test_duplicates_are_dropped_by_device_boot_and_seq() -> None:
    ws = make_windows(1, 3)
    st = FleetState()
    outcomes = [st.ingest("eva/d1/stats", enc(stats(w, "d1", "b1", i))) for i, w in enumerate(ws)]
    assert outcomes == ["stats"] * 3
    assert st.ingest("eva/d1/stats", enc(stats(ws[1], "d1", "b1", 1, historical=True))) \
        == "duplicate"
    # Same seq, another boot or another device: distinct messages, not duplicates.
    assert st.ingest("eva/d1/stats", enc(stats(ws[0], "d1", "b2", 1))) == "stats"
    assert st.ingest("eva/d2/stats", enc(stats(ws[0], "d2", "b1", 1))) == "stats"
    j = st.to_json()
    d1 = j["devices"]["d1"]
    assert d1["duplicates"] == 1 and d1["windows"] == 4
    want = summed_counts([*ws, ws[0]])
    assert d1["counts"] == want
    assert j["fleet"]["counts"] == {k: want[k] + ws[0].counts[k] for k in COUNTERS}
    assert j["fleet"]["duplicates"] == 1 and j["fleet"]["windows"] == 5


def test_gaps_per_boot_between_lowest_and_highest_seq() -> None:
    w = make_windows(2, 1, utterances=(1, 3))[0]
    st = FleetState()
    for seq in (0, 1, 4, 6):
        st.ingest("eva/d1/stats", enc(stats(w, "d1", "b1", seq)))
    st.ingest("eva/d1/alarm", enc(alarm("d1", "b1", 9, "raised")))  # alarms share the counter
    for seq in (3, 5):
        st.ingest("eva/d1/stats", enc(stats(w, "d1", "b2", seq)))
    d = st.to_json()["devices"]["d1"]
    assert d["boots"]["b1"] == {"first_seq": 0, "last_seq": 9, "received": 5, "missing": 5,
                                "gaps": [[2, 3], [5, 5], [7, 8]]}
    assert d["boots"]["b2"]["gaps"] == [[4, 4]]
    assert d["missing"] == 6
    for seq in (2, 3, 5, 7, 8):  # late replays fill the holes
        assert st.ingest("eva/d1/stats", enc(stats(w, "d1", "b1", seq, historical=True))) \
            == "stats"
    d = st.to_json()["devices"]["d1"]
    assert d["boots"]["b1"]["missing"] == 0 and d["boots"]["b1"]["gaps"] == []
    assert d["missing"] == 1 and d["boot_id"] == "b2"  # historical replays keep the boot


def test_online_offline_from_status() -> None:
    st = FleetState()
    assert st.ingest("eva/d1/status", b"online", retained=True) == "status"
    d = st.to_json()["devices"]["d1"]
    assert d["online"] is True and d["status_retained"] is True and d["last_seen_utc"] is None
    assert st.ingest("eva/d1/status", b"offline") == "status"  # the last will
    assert st.ingest("eva/d2/status", "online") == "status"
    j = st.to_json()
    assert j["devices"]["d1"]["online"] is False and j["devices"]["d1"]["status_retained"] is False
    assert (j["fleet"]["online"], j["fleet"]["offline"], j["fleet"]["devices"]) == (1, 1, 2)
    assert st.ingest("eva/d2/status", b"maybe") == "schema"
    d2 = st.to_json()["devices"]["d2"]
    assert d2["online"] is True and d2["errors"]["schema"] == 1


def test_alarms_raise_clear_by_rule_and_reset_on_new_boot() -> None:
    st = FleetState()
    st.ingest("eva/d1/birth", enc(birth("d1", "b1")), retained=True)
    st.ingest("eva/d1/alarm", enc(alarm("d1", "b1", 0, "raised")))
    st.ingest("eva/d1/alarm", enc(alarm("d1", "b1", 1, "raised",
                                        reason="hourly roll-up: drift >= 0.4")))
    st.ingest("eva/d1/alarm", enc(alarm("d1", "b1", 2, "raised", metric="snr_db",
                                        threshold=5.0)))

    def active() -> list[tuple[str, str]]:
        return [(a["metric"], a["scope"])
                for a in st.to_json()["devices"]["d1"]["active_alarms"]]

    assert active() == [("input_rms_dbfs", "hourly"), ("input_rms_dbfs", "window"),
                        ("snr_db", "window")]
    st.ingest("eva/d1/alarm", enc(alarm("d1", "b1", 4, "cleared")))  # the per-window rule
    assert active() == [("input_rms_dbfs", "hourly"), ("snr_db", "window")]
    # A late (replayed) older raise of the same rule must not resurrect it.
    st.ingest("eva/d1/alarm", enc(alarm("d1", "b1", 3, "raised")))
    assert active() == [("input_rms_dbfs", "hourly"), ("snr_db", "window")]
    assert st.to_json()["fleet"]["active_alarms"] == 2
    # A restarted agent starts with no raised rule and never clears the old boot's.
    st.ingest("eva/d1/birth", enc(birth("d1", "b2")), retained=True)
    assert active() == []
    st.ingest("eva/d1/alarm", enc(alarm("d1", "b2", 0, "raised", metric="snr_db",
                                        threshold=5.0)))
    assert active() == [("snr_db", "window")]
    assert st.to_json()["devices"]["d1"]["alarm_events"] == 6


# --- FleetState: exact merging --------------------------------------------------------------
def test_histograms_merge_exactly_across_windows_and_devices() -> None:
    a, b = make_windows(1, 4), make_windows(2, 3)
    st = FleetState()
    for dev, ws in (("a", a), ("b", b)):
        st.ingest(f"eva/{dev}/birth", enc(birth(dev, "boot")), retained=True)
        for i, w in enumerate(ws):
            assert st.ingest(f"eva/{dev}/stats", enc(stats(w, dev, "boot", i))) == "stats"
    j = st.to_json()
    union = merge_summaries([*a, *b])
    for m in METRICS:
        if m.stage == "wake":  # only a device in wake mode publishes them
            assert m.name not in j["fleet"]["metrics"]
            continue
        got = j["fleet"]["metrics"][m.name]
        u = union.hists[m.name]
        assert got["count"] == got["binned"] == u.count, m.name
        assert np.array_equal(dense(m.edges, got["hist"]), u.counts), m.name
        for dev, ws in (("a", a), ("b", b)):
            per = merge_summaries(ws).hists[m.name]
            assert np.array_equal(dense(m.edges, j["devices"][dev]["metrics"][m.name]["hist"]),
                                  per.counts), (dev, m.name)
        if u.count:
            # Same bins, so the same estimate up to the published (rounded) min/max.
            for q, key in ((0.5, "p50"), (0.95, "p95")):
                assert got[key] == pytest.approx(u.quantile(q), rel=1e-3,
                                                 abs=u.quantile_error_bound(q) * 0.01), m.name
            assert got["mean"] == pytest.approx(u.mean, rel=1e-4, abs=1e-9), m.name
    assert j["fleet"]["counts"] == summed_counts([*a, *b])
    assert j["fleet"]["input_rms_dbfs"] == pytest.approx(union.hists["input_rms_dbfs"].mean,
                                                         rel=1e-4)


def test_withheld_distributions_count_but_are_not_binned() -> None:
    few = make_windows(3, 2, utterances=(5, 8))  # < k: payload keeps count and mean only
    many = make_windows(3, 1, utterances=(25, 30), start_window=2)
    st = FleetState()
    for i, w in enumerate([*few, *many]):
        st.ingest("eva/d1/stats", enc(stats(w, "d1", "b", i)))
    m = st.to_json()["fleet"]["metrics"]["input_rms_dbfs"]
    n_few = sum(w.hists["input_rms_dbfs"].count for w in few)
    n_many = many[0].hists["input_rms_dbfs"].count
    assert (m["count"], m["binned"]) == (n_few + n_many, n_many)
    assert np.array_equal(dense(BY_NAME["input_rms_dbfs"].edges, m["hist"]),
                          many[0].hists["input_rms_dbfs"].counts)
    all_h = merge_summaries([*few, *many]).hists["input_rms_dbfs"]
    assert m["mean"] == pytest.approx(all_h.mean, rel=1e-4)  # means still cover every value


def test_rates_accuracy_and_last_window() -> None:
    ws = make_windows(4, 3)
    st = FleetState()
    ps = [stats(w, "d1", "b", i) for i, w in enumerate(ws)]
    for p in (ps[0], ps[2], ps[1]):  # the middle one arrives last (replay)
        st.ingest("eva/d1/stats", enc(p))
    d = st.to_json()["devices"]["d1"]
    last = ws[2]
    assert d["last_window"]["seq"] == 2
    assert d["utterances_per_min"] == pytest.approx(last.counts["utterances"] * 60 / 10.0)
    c = summed_counts(ws)
    assert d["abstain_rate"] == pytest.approx(c["abstained"] / (c["accepted"] + c["abstained"]))
    acc = [(p["estimated_accuracy"]["value"], p["estimated_accuracy"]["n"]) for p in ps]
    assert d["estimated_accuracy"]["n"] == sum(n for _, n in acc) > 0
    assert d["estimated_accuracy"]["value"] == pytest.approx(
        sum(v * n for v, n in acc) / sum(n for _, n in acc), rel=1e-5)


# --- FleetState: refusing bad input ---------------------------------------------------------
def test_edges_that_disagree_are_refused_and_counted() -> None:
    w = make_windows(5, 1)[0]
    st = FleetState()
    other = [round(0.1 + 0.04 * i, 6) for i in range(20)]
    st.ingest("eva/d1/birth", enc(birth("d1", "b1", {"confidence": other})), retained=True)
    assert st.ingest("eva/d1/stats", enc(stats(w, "d1", "b1", 0))) == "edges_mismatch"
    # A histogram reaching past the catalogue's bins cannot have been made with its edges.
    bad = stats(w, "d2", "b1", 0)
    bad["metrics"]["margin"].update(hist=[22, 1, 1, 1], count=3)
    assert st.ingest("eva/d2/stats", enc(bad)) == "edges_mismatch"
    assert st.ingest("eva/d3/stats", enc(stats(w, "d3", "b1", 0))) == "stats"
    j = st.to_json()
    assert j["devices"]["d1"]["errors"]["edges_mismatch"] == 1
    assert j["devices"]["d2"]["errors"]["edges_mismatch"] == 1
    assert j["fleet"]["errors"]["edges_mismatch"] == 2
    assert j["fleet"]["windows"] == 1 and j["fleet"]["counts"] == summed_counts([w])
    assert j["devices"]["d1"]["counts"]["frames"] == 0


def test_invalid_json_and_schema_mismatch_are_counted_never_raised() -> None:
    w = make_windows(6, 1, utterances=(1, 3))[0]
    good = stats(w, "d1", "b", 0)
    st = FleetState()
    assert st.ingest("eva/d1/stats", b"{not json") == "invalid_json"
    assert st.ingest("eva/d1/stats", b"\xff\xfe") == "invalid_json"
    assert st.ingest("eva/d1/stats", b'{"seq": NaN}') == "invalid_json"
    assert st.ingest("eva/d1/stats", b" " * 70000) == "too_large"
    assert st.ingest("eva/d1/stats", b"[1, 2]") == "schema"
    assert st.ingest("eva/d1/stats", enc({**good, "device_id": "d2"})) == "schema"  # spoofing
    assert st.ingest("eva/d1/stats", enc({**good, "seq": True})) == "schema"
    assert st.ingest("eva/d1/alarm", enc({**alarm("d1", "b", 1, "raised"), "state": "x"})) \
        == "schema"
    assert st.ingest("eva/d1/birth", b"null") == "schema"
    assert st.ingest("eva/d1/other", b"{}") == "unknown_topic"
    assert st.ingest("other/d1/stats", enc(good)) == "unknown_topic"
    assert st.ingest("eva/d1/x/stats", enc(good)) == "unknown_topic"
    # Fuzz: mangle one field of a valid payload at a time; never an exception.
    mangle = mangler(random.Random(3), [None, True, -1, 1e308, "x", [], {}, [1, "a"],
                                        {"a": None}], p_delete=0.3, p_deeper=0.5)

    allowed = {"stats", "duplicate", "schema", "edges_mismatch"}
    for i in range(400):
        p = mangle(json.loads(json.dumps({**good, "seq": i + 1})))
        assert st.ingest("eva/d1/stats", enc(p)) in allowed
    for i in range(100):
        assert st.ingest("eva/d1/alarm", enc(mangle(alarm("d1", "b", 1000 + i, "raised")))) \
            in {"alarm", "duplicate", "schema"}
        assert st.ingest("eva/d1/birth", enc(mangle(birth("d1", f"b{i}")))) in {"birth", "schema"}
    assert st.unexpected == 0, st.devices["d1"].last_error  # the checks caught every shape
    j = st.to_json()
    json.dumps(j, allow_nan=False)
    errs = j["devices"]["d1"]["errors"]
    assert errs["invalid_json"] == 3 and errs["too_large"] == 1 and errs["schema"] >= 5
    assert j["fleet"]["errors"]["unknown_topic"] == 3
    assert set(j["devices"]) == {"d1"}  # junk topics create no devices


def test_dashboard_renders_devices_alarms_and_quantiles() -> None:
    pytest.importorskip("rich")
    from rich.console import Console

    from agent.fleet.watch import render

    st = FleetState()
    st.ingest("eva/kitchen/status", b"online", retained=True)
    st.ingest("eva/hall/status", b"offline", retained=True)
    for i, w in enumerate(make_windows(1, 2)):
        st.ingest("eva/kitchen/stats", enc(stats(w, "kitchen", "b", i)))
    st.ingest("eva/kitchen/alarm", enc(alarm("kitchen", "b", 5, "raised", metric="snr_db")))
    console = Console(record=True, width=220, color_system=None)
    console.print(render({**st.to_json(), "broker": "mqtt://127.0.0.1:1883"}))
    text = console.export_text()
    assert "kitchen" in text and "hall" in text and "offline" in text and "online" in text
    assert "snr_db" in text and "fleet-wide quantiles" in text
    assert "confidence" in text and "gaps" in text


# --- the CLI against a real broker ----------------------------------------------------------
def eva_watch(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "agent", "fleet", "watch", *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class Watch:
    """A `fleet watch` subprocess whose output is read on threads (no pipe can fill up)."""

    def __init__(self, *args: str) -> None:
        self.proc = eva_watch(*args)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        self.stdout: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr, True),
                             daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout, False),
                             daemon=True)]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any, sink: list[str], notify: bool) -> None:
        for line in stream:
            sink.append(line)
            if notify:
                self.lines.put(line)

    def wait_subscribed(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                raise TimeoutError(f"fleet watch did not subscribe: {self.stderr}") from None
            if "subscribed to" in line:
                return

    def result(self, timeout_s: float = 30.0) -> tuple[int, dict[str, Any]]:
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        for t in self._threads:
            t.join(5)
        out = "".join(self.stdout)
        assert rc == 0, "".join(self.stderr)
        assert out.count("\n") == 1, out  # exactly one JSON object
        return rc, json.loads(out)


def sink(broker: Broker, dev: str, boot: str, state: Path) -> MqttSink:
    s = MqttSink(broker.host, broker.port, device_id=dev, outbox_path=state / "outbox.sqlite",
                 birth=birth(dev, boot), options=FAST)
    assert s.wait_connected(5), broker.log()
    return s


def test_fleet_watch_json_merges_two_devices(mosquitto: BrokerFactory, tmp_path: Path) -> None:
    """Issue 5: `fleet watch --json` over two simulated devices reports merged counts equal to
    the sum of their windows (per device and fleet-wide), drops duplicates, sees both online."""
    broker = mosquitto()
    windows = {"dev-a": make_windows(11, 6), "dev-b": make_windows(12, 5)}
    boots = {"dev-a": "boot-a", "dev-b": "boot-b"}
    msgs: dict[str, list[Message]] = {}
    for dev, ws in windows.items():
        msgs[dev] = [Message(topic("eva", dev, "stats"), stats(w, dev, boots[dev], i))
                     for i, w in enumerate(ws)]
    msgs["dev-a"].append(Message(topic("eva", "dev-a", "alarm"),
                                 alarm("dev-a", "boot-a", len(windows["dev-a"]), "raised")))
    sinks = {dev: sink(broker, dev, boots[dev], tmp_path / dev) for dev in windows}
    try:
        watch = Watch("--broker", broker.url, "--json", "--until-idle", "2")
        watch.wait_subscribed()
        t0 = time.monotonic()
        for dev, s in sinks.items():
            for m in msgs[dev]:
                s.publish(m)
            s.publish(msgs[dev][1])  # at-least-once: a resend of a delivered window
        for s in sinks.values():
            assert s.wait_drained(10)
        rc, j = watch.result()
        assert time.monotonic() - t0 < 10  # --until-idle ended it, not a fixed wait
    finally:
        for s in sinks.values():
            s.close(2)

    f = j["fleet"]
    assert set(j["devices"]) == {"dev-a", "dev-b"}
    all_windows = [*windows["dev-a"], *windows["dev-b"]]
    assert f["counts"] == summed_counts(all_windows)
    assert f["windows"] == len(all_windows) == 11
    assert f["duplicates"] == 2 and f["missing"] == 0
    assert (f["online"], f["devices"]) == (2, 2)
    for dev, ws in windows.items():
        d = j["devices"][dev]
        assert d["counts"] == summed_counts(ws), dev
        assert d["windows"] == len(ws) and d["duplicates"] == 1, dev
        assert d["online"] is True and d["boot_id"] == boots[dev], dev
        assert d["model"] == MODEL and d["agent_version"] == "test", dev
        assert d["boots"][boots[dev]]["received"] == len(msgs[dev]), dev
        assert d["missing"] == 0 and sum(d["errors"].values()) == 0, dev
    assert [a["metric"] for a in j["devices"]["dev-a"]["active_alarms"]] == ["input_rms_dbfs"]
    assert j["devices"]["dev-b"]["active_alarms"] == []
    # Merged histograms: the sum of every window's published bins, and the union's histogram.
    union = merge_summaries(all_windows)
    for m in METRICS:
        if m.stage == "wake":  # only a device in wake mode publishes them
            continue
        published = sum((dense(m.edges, msg.payload["metrics"][m.name]["hist"])
                         for dev in msgs for msg in msgs[dev] if msg.topic.endswith("/stats")),
                        np.zeros(len(m.edges) + 1, dtype=np.int64))
        got = dense(m.edges, f["metrics"][m.name]["hist"])
        assert np.array_equal(got, published), m.name
        assert np.array_equal(got, union.hists[m.name].counts), m.name
        assert f["metrics"][m.name]["binned"] == int(published.sum()), m.name
    assert f["metrics"]["confidence"]["count"] == union.hists["confidence"].count > 0
    assert f["estimated_accuracy"]["n"] == union.hists["confidence"].count


def test_fleet_watch_json_ends_on_sigterm_and_duration(mosquitto: BrokerFactory) -> None:
    broker = mosquitto()
    w = Watch("--broker", broker.url, "--json", "--prefix", "site1/eva")
    w.wait_subscribed()
    w.proc.send_signal(signal.SIGTERM)
    _, j = w.result(10)
    assert j["prefix"] == "site1/eva" and j["devices"] == {} and j["fleet"]["windows"] == 0
    t0 = time.monotonic()
    _, j = Watch("--broker", broker.url, "--json", "--duration", "0.5").result(10)
    assert 0.5 <= time.monotonic() - t0 < 8 and j["messages"] == 0


def test_unreachable_broker_is_one_line_and_exit_1() -> None:
    p = subprocess.run([sys.executable, "-m", "agent", "fleet", "watch", "--broker",
                        f"mqtt://127.0.0.1:{free_port()}", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot connect to broker" in lines[0], p.stderr


def test_dashboard_without_rich_names_the_extra() -> None:
    code = ("import sys; sys.modules['rich'] = None\n"
            "from agent.cli import main\n"
            f"sys.exit(main(['fleet', 'watch', '--broker', 'mqtt://127.0.0.1:{free_port()}']))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 1
    assert p.stderr.strip().count("\n") == 0
    assert "pip install 'edge-voice-agent[fleet]'" in p.stderr
    assert "cannot connect" not in p.stderr  # checked before touching the network


def test_credentials_refused_is_one_line_and_accepted_watches(mosquitto: BrokerFactory,
                                                               tmp_path: Path) -> None:
    broker = mosquitto(users={"operator": "right"})
    pw = tmp_path / "pw"
    pw.write_text("wrong\n")
    args = ["fleet", "watch", "--broker", broker.url, "--json", "--duration", "0.2",
            "--username", "operator", "--password-file", str(pw)]
    p = subprocess.run([sys.executable, "-m", "agent", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 1 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and "refused" in p.stderr, p.stderr
    pw.write_text("right\n")
    p = subprocess.run([sys.executable, "-m", "agent", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["fleet"]["devices"] == 0


def test_stats_contract_accepts_and_refuses_metric_entries_field_by_field() -> None:
    """The typed stats decoder (agent.fleet.schema) plus `check_stats` judge each variant of a
    metric entry as the contract says, naming the field; refused ones never reach the sums."""
    from agent.fleet.schema import Invalid, check_stats, decode_stats

    w = make_windows(6, 1, utterances=(1, 3))[0]
    base = stats(w, "d1", "b", 0)
    good = {"count": 3, "mean": 1.5, "min": 1.0, "max": 2.0, "hist": [4, 1, 2]}
    variants: list[tuple[Any, bool]] = [
        (good, True), ({**good, "mean": 2}, True), ({**good, "hist": [4, 1, True]}, False),
        ({**good, "hist": [4, -1, 4]}, False), ({**good, "hist": [-1, 1, 2]}, False),
        ({**good, "count": 4}, False), ({**good, "count": -3, "hist": [4, 1, -4]}, False),
        ({**good, "min": None}, False), ({**good, "hist": [4]}, False),
        ({**good, "hist": []}, True), ({**good, "max": 1e308, "min": 1e308}, True),
        ({**good, "mean": "1"}, False), ({**good, "count": 3.0}, False), ([good], False),
        ({k: v for k, v in good.items() if k != "max"}, False),
        ({"count": 0, "mean": None, "min": None, "max": None, "hist": []}, True)]
    verdicts = []
    for m, _ in variants:
        raw = enc({**base, "metrics": {**base["metrics"], "confidence": m}})
        try:
            check_stats(decode_stats(raw), "d1")
            verdicts.append(True)
        except Invalid as e:
            assert e.args[1] == "schema" and "metrics" in e.args[0], e.args
            verdicts.append(False)
    assert verdicts == [ok for _, ok in variants]
    big = enc({**base, "seq": 1}).replace(b'"seq": 1', b'"seq": 1e999')
    with pytest.raises(Invalid):
        decode_stats(big)
    # the counters the agent sends are the ones the contract names
    from agent.fleet.schema import Counts
    assert set(Counts.__annotations__) == set(COUNTERS)


def test_stats_contract_never_refuses_what_the_documented_schema_accepts() -> None:
    """agent.fleet.schema is the serving side's copy of docs/stats.schema.json: every variant
    of a real payload that the documented schema accepts is accepted (and merged) too. One
    deliberate difference: JSON Schema's "integer" also matches 2.0; counters written as
    floats are refused (the agent never writes them, and a float count cannot merge exactly)."""
    from jsonschema import Draft202012Validator

    from agent.fleet.schema import Invalid, check_stats, decode_stats
    from tests.fleet_sim import SimFleet

    doc = Draft202012Validator(json.loads((ROOT / "docs" / "stats.schema.json").read_text()))
    base = next(SimFleet(devices=1, windows=1).stats_payloads(0))
    assert doc.is_valid(base)
    mangle = mangler(random.Random(5), [None, True, -1, 0, 2, 0.5, -1e308, "x", [], {}, [0, 1]],
                     p_delete=0.2, p_deeper=0.6)

    valid = 0
    for _ in range(600):
        p = mangle(json.loads(json.dumps(base)))
        if not doc.is_valid(p):
            continue
        valid += 1
        try:
            check_stats(decode_stats(enc(p)), p["device_id"])
        except Invalid as e:
            pytest.fail(f"documented-valid payload refused: {e.args}")
    assert valid > 50  # the mangling left enough valid variants to mean something
    assert doc.is_valid({**base, "seq": 2.0})
    with pytest.raises(Invalid):
        decode_stats(enc({**base, "seq": 2.0}))


def test_birth_edges_are_checked_once_and_shared_and_the_memory_of_them_is_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica that restarts gets every device's retained birth at once: edge lists already
    checked are looked up, not checked again, and devices share one array per edge list. Bad
    lists are still refused, and a hostile fleet cannot grow the memory of them without bound."""
    from agent.fleet import state as state_mod

    st = FleetState()
    other = METRICS[1].name  # declared with other edges than the catalogue's
    edges = {other: [0.0, 1.0, 2.5]}
    assert st.ingest("eva/d1/birth", enc(birth("d1", "b", edges))) == "birth"
    assert st.ingest("eva/d2/birth", enc(birth("d2", "b", edges))) == "birth"
    a, b = st.devices["d1"].births["b"], st.devices["d2"].births["b"]
    assert a[other] is b[other] and a[other].tolist() == [0.0, 1.0, 2.5]
    name = METRICS[0].name
    assert st.ingest("eva/d3/birth", enc(birth("d3", "b", {name: list(METRICS[0].edges)}))) \
        == "birth"
    assert st.devices["d3"].births["b"][name] is st._edges[name]  # the catalogue's own array
    for bad in ([0.0, 2.0, 1.0], [0.0, True], [0.0, "1"], [], [[0.0]]):
        assert st.ingest("eva/d4/birth", enc(birth("d4", "b", {METRICS[2].name: bad}))) \
            == "schema", bad
    monkeypatch.setattr(state_mod, "MAX_EDGE_SETS", 50)
    for i in range(200):
        st.ingest(f"eva/h{i}/birth", enc(birth(f"h{i}", "b", {METRICS[3].name: [0.0, i + 1.0]})))
    assert len(st._known_edges) == 50


@pytest.mark.parametrize("chunk_bytes", [1, 1 << 20])
def test_json_chunks_are_the_json_document(chunk_bytes: int,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`/api/fleet.json` is encoded device by device (peak memory); joined, the chunks are
    exactly `fleet watch --json`'s document plus the extra keys, whatever the chunking."""
    import msgspec

    from agent.fleet import state as state_mod
    from tests.fleet_sim import SimFleet

    monkeypatch.setattr(state_mod, "JSON_CHUNK_BYTES", chunk_bytes)
    st = FleetState(clock=lambda: 1_800_000_000.0)
    assert json.loads(b"".join(st.to_json_chunks(msgspec.json.encode, broker="b"))) == \
        {**st.to_json(), "broker": "b"}  # no devices yet
    for t, b in SimFleet(devices=7, windows=2).messages():
        st.ingest(t, b, t.endswith("/birth"))
    st.ingest("eva/sim-00001/stats", b"{not json")
    st.ingest("eva/sim-00002/alarm", enc(alarm("sim-00002", "b0", 99, "raised")))
    chunks = st.to_json_chunks(msgspec.json.encode, broker="mqtt://b:1883", replica="r")
    assert len(chunks) == (9 if chunk_bytes == 1 else 3)
    doc = json.loads(b"".join(chunks))
    want = {**json.loads(json.dumps(st.to_json())), "broker": "mqtt://b:1883", "replica": "r"}
    assert doc == want and doc["fleet"]["devices"] == 7 and doc["fleet"]["active_alarms"] >= 1


def test_metrics_chunking_does_not_change_the_exposition(monkeypatch: pytest.MonkeyPatch) -> None:
    """/metrics is written per family and per DEVICES_PER_CHUNK devices (peak memory); the body
    is the same bytes however it is cut, and every family is one contiguous block."""
    from agent.fleet import exporter
    from agent.fleet.ingest import FleetModel
    from tests.fleet_sim import SimFleet

    model = FleetModel()
    for t, b in SimFleet(devices=11, windows=2).messages():
        model.ingest(t, b, t.endswith("/birth"))
    model.ingest("eva/sim-00003/stats", b"{bad")
    whole = exporter.exposition(model)
    monkeypatch.setattr(exporter, "DEVICES_PER_CHUNK", 3)
    chunks = exporter.FleetCollector(model).exposition_chunks()
    assert b"".join(chunks) == whole and len(chunks) > 2 * len(exporter._DEVICE_FAMILIES)
    names = [ln.split(b"{")[0].split(b" ")[0] for ln in whole.splitlines()
             if ln.startswith(b"eva_device_")]
    assert names == sorted(names, key=names.index) and len(set(names)) >= 10
    blocks = [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]
    assert len(blocks) == len(set(blocks))  # no family split in two
    assert b'eva_device_invalid_payloads_total{device="sim-00003",kind="invalid_json"} 1' in whole


def test_serve_state_sums_groups_exactly_and_only_the_input_level_per_device() -> None:
    """`fleet serve` (FleetModel) skips per-device histograms but its fleet sums are exactly
    those of `fleet watch`'s FleetState, and its per-device input level is the same."""
    from agent.fleet.ingest import DEVICE_METRICS, FleetModel
    from tests.fleet_sim import SimFleet

    full, served = FleetState(), FleetModel()
    for t, b in SimFleet(devices=6, windows=3).messages():
        assert full.ingest(t, b, t.endswith("/birth")) == served.ingest(t, b,
                                                                           t.endswith("/birth"))
    a = full.to_json()
    with served.reading():  # settles the pending (bucket, group) sums into the groups
        b = served.state.to_json()
    assert a["fleet"]["windows"] == 18 and a["fleet"]["metrics"] == b["fleet"]["metrics"]
    for dev, d in b["devices"].items():
        assert set(d["metrics"]) == set(DEVICE_METRICS)
        assert d["input_rms_dbfs"] == a["devices"][dev]["input_rms_dbfs"] is not None
        assert d["metrics"]["input_rms_dbfs"] == a["devices"][dev]["metrics"]["input_rms_dbfs"]


def test_metrics_per_device_bytes_fit_10000_devices_in_20_mb() -> None:
    """Issue 20's target: /metrics <= 20 MB (decimal) at 10,000 honest devices plus a hostile
    one. The per-device series are most of it: no zero-valued gauge or counter an absent series
    says as well (missing, duplicates, outbox drops), and the drift score's stage, which the
    metric name fixes, is given once per metric by `eva_metric_info` (join on `metric`)."""
    from prometheus_client.parser import text_string_to_metric_families

    from agent.fleet.exporter import exposition
    from agent.fleet.ingest import FleetModel
    from tests.fleet_sim import SimFleet

    n = 100
    model = FleetModel()
    msgs = SimFleet(devices=n, windows=3).messages()
    for t, b in msgs:
        model.ingest(t, b, t.endswith("/birth"))
    body = exposition(model)
    device_bytes = sum(len(ln) + 1 for ln in body.splitlines() if ln.startswith(b"eva_device_"))
    # 10,000 of these and the fleet families (~0.3 MB with the hostile device's groups)
    assert device_bytes / n * 10_000 <= 19_000_000, device_bytes / n
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    stage = {s.labels["metric"]: s.labels["stage"] for s in fams["eva_metric_info"].samples}
    assert stage == {m.name: m.stage for m in (*METRICS, *DRIFT_ONLY)}
    drift = fams["eva_device_drift_score"].samples
    assert drift and all(set(s.labels) == {"device", "metric"} for s in drift)
    for name in ("eva_device_missing_messages", "eva_device_duplicates",
                 "eva_device_outbox_dropped"):
        assert name not in fams or all(s.value for s in fams[name].samples), name
    # a device with something to report still shows it
    assert model.ingest(*next(m for m in msgs if m[0] == "eva/sim-00003/stats")) == "duplicate"
    assert b'eva_device_duplicates_total{device="sim-00003"} 1' in exposition(model)
