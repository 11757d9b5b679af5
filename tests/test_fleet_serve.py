"""`fleet serve` with real components: mosquitto, two replicas on a shared subscription with
duplicates and reordering injected, a real Prometheus server scraping both, headless Chromium
reading the page, and the Grafana dashboard's metric names checked against a live scrape.

One module-scoped setup serves every test here (the fleet is published once): a simulated fleet
of 40 devices replaying real agent payloads (tests/fleet_sim.py), one window an hour for a day.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.fleet_sim import COUNTED, SimFleet
from tests.mqtt_fixtures import MOSQUITTO, Broker, free_port

pytest.importorskip("prometheus_client", reason="the fleet extra (prometheus-client) is needed")

from agent.fleet.serve import Server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = shutil.which("prometheus")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DEVICES, WINDOWS = 40, 24
DUPLICATE_SHARE = 0.25


def _get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only
        return r.read()


def _until(pred: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll `pred` until truthy (an HTTP API has no event to wait on); bounded."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s} s")
        time.sleep(0.1)


@dataclass
class Served:
    broker: Broker
    replicas: list[Server]
    sim: SimFleet
    published_stats: int
    duplicates_sent: int

    def url(self, i: int, path: str = "/") -> str:
        host, port = self.replicas[i].address
        return f"http://{host}:{port}{path}"


def _start_broker(d: Path) -> Broker:
    port = free_port()
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "log_dest stderr",
             "log_type error", "log_type warning", "max_queued_messages 100000",
             "sys_interval 1"]
    if os.geteuid() == 0:
        lines.append("user root")
    conf = d / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    return Broker(port=port, conf=conf, log_path=d / "broker.log").start()


def _publish(broker: Broker, msgs: list[tuple[str, bytes, bool]]) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-{free_port()}",
                    protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(100)
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        infos = [c.publish(t, b, qos=1, retain=r) for t, b, r in msgs]
        for info in infos:
            info.wait_for_publish(timeout=30)
    finally:
        c.disconnect()
        c.loop_stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    if MOSQUITTO is None:
        pytest.skip("mosquitto binary not found (apt-get install -y mosquitto)")
    d = tmp_path_factory.mktemp("served")
    broker = _start_broker(d)
    replicas: list[Server] = []
    try:
        for i in range(2):
            replicas.append(Server(broker_url=broker.url, listen=("127.0.0.1", 0),
                                   share="eva-serve", replica=f"r{i}",
                                   history_path=str(d / f"history{i}.sqlite")).start())
        sim = SimFleet(devices=DEVICES, windows=WINDOWS, window_s=3600.0)
        msgs = sim.messages()
        births = [(t, b, True) for t, b in msgs if t.endswith("/birth")]
        stats = [(t, b, False) for t, b in msgs if t.endswith("/stats")]
        rnd = random.Random(12)
        rnd.shuffle(stats)  # reordering: windows arrive in any order, across devices and seq
        dups = rnd.sample(stats, int(DUPLICATE_SHARE * len(stats)))  # at-least-once resends
        status = [(f"eva/{sim.device_id(i)}/status", b"online" if i % 8 else b"offline", True)
                  for i in range(DEVICES)]
        alarms = [(*sim.alarm(i, WINDOWS), False) for i in (3, 7)]
        _publish(broker, births + status + stats + dups + alarms)
        n_stats = len(stats) + len(dups)

        def ingested() -> bool:
            done = sum(r.model.outcomes.get("stats", 0) + r.model.outcomes.get("duplicate", 0)
                       for r in replicas)
            alarms_in = sum(r.model.outcomes.get("alarm", 0) for r in replicas)
            return done == n_stats and alarms_in == 2 * len(alarms)  # alarms: every replica

        _until(ingested, 30, "every published stats message ingested")
        for r in replicas:
            r.maintain()  # flush the history now rather than on the next tick
        yield Served(broker, replicas, sim, n_stats, len(dups))
    finally:
        for r in replicas:
            r.stop()
        broker.kill()


# --- exactness across replicas, through a real Prometheus --------------------------------------
@pytest.fixture(scope="module")
def prometheus(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if PROMETHEUS is None:
        pytest.skip("prometheus binary not found (apt-get install -y prometheus)")
    d = tmp_path_factory.mktemp("prometheus")
    targets = [f"{h}:{p}" for h, p in (r.address for r in served.replicas)]
    (d / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n- job_name: eva-fleet\n  static_configs:\n"
        f"  - targets: {json.dumps(targets)}\n")
    port = free_port()
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={d / 'prometheus.yml'}",
                             f"--storage.tsdb.path={d / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(d / "log", "wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            try:
                return _get(url + "/-/ready", 1) is not None
            except OSError:
                return proc.poll() is not None  # exited: fail below with its log
        _until(ready, 30, "prometheus ready")
        assert proc.poll() is None, (d / "log").read_text()[-2000:]
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _query(url: str, promql: str) -> list[dict[str, Any]]:
    body = _get(f"{url}/api/v1/query?query={urllib.parse.quote(promql)}")
    j = json.loads(body)
    assert j["status"] == "success", j
    return j["data"]["result"]


def test_prometheus_sums_two_replicas_exactly_despite_duplicates_and_reordering(
        served: Served, prometheus: str) -> None:
    """Issue 12: PromQL over two replicas of a shared subscription returns exactly what the
    simulated fleet sent, with 25 % of the stats messages published twice and all reordered."""
    reps = served.replicas
    shares = [r.model.outcomes.get("stats", 0) for r in reps]
    assert all(n > 0 for n in shares), f"the broker did not share the load: {shares}"
    assert sum(r.model.outcomes.get("duplicate", 0) for r in reps) > 0
    want = {**{k: served.sim.totals[k] for k in COUNTED}, "windows": DEVICES * WINDOWS}

    def exact(name: str) -> float | None:
        res = _query(prometheus, f"sum(max by (device, boot) (eva_device_{name}_total))")
        return float(res[0]["value"][1]) if res else None

    # wait for a scrape of both replicas after the ingest finished
    _until(lambda: exact("windows") == want["windows"], 30, "prometheus scraped both")
    for name, total in want.items():
        assert exact(name) == total, name
    # per model version: the device's model from the info metric, joined on device
    for version, per in served.sim.per_model.items():
        res = _query(prometheus, "sum(max by (device, boot) (eva_device_utterances_total) * on "
                     f"(device) group_left() max by (device) (eva_device_info{{model_version="
                     f'"{version}"}}))')
        assert float(res[0]["value"][1]) == per["utterances"], version
    # every device is seen by both replicas (presence is not shared), and the windows' own
    # counts, deduplicated per replica, can only over-count across replicas, never lose any
    res = _query(prometheus, 'count(count by (device) (eva_device_info))')
    assert float(res[0]["value"][1]) == DEVICES
    res = _query(prometheus, "sum(eva_fleet_windows_total)")
    assert want["windows"] <= float(res[0]["value"][1]) <= served.published_stats
    res = _query(prometheus, 'sum(eva_fleet_input_rms_dbfs_count)')
    assert float(res[0]["value"][1]) > 0


# --- the Grafana dashboard uses only exported names ------------------------------------------
def test_grafana_dashboard_queries_only_exported_metric_names(served: Served) -> None:
    scrape = _get(served.url(0, "/metrics")).decode()
    exported = {line.split("{")[0].split(" ")[0] for line in scrape.splitlines()
                if line and not line.startswith("#")}
    dash = json.loads((ROOT / "docs" / "grafana-fleet.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    used = {n for e in exprs for n in re.findall(r"\beva_[a-z0-9_]+", e)}
    assert used and used <= exported, f"not exported: {sorted(used - exported)}"


# --- the page, in a real browser ---------------------------------------------------------------
class _Dom(HTMLParser):
    """Collects elements with their attributes (the page has no script: what Chromium dumps is
    the rendered DOM)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self._svg: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "svg":
            self._svg = a.get("id")
        a["_svg"] = self._svg or ""
        self.elements.append((tag, a))

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._svg = None


def _chromium(*args: str, timeout_s: float = 60) -> str:
    r = subprocess.run([CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", *args], capture_output=True, text=True,
                       timeout=timeout_s)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_page_in_headless_chromium_plots_the_fleet(served: Served, tmp_path: Path) -> None:
    """The rendered DOM has the plots with the right values; a screenshot is saved
    (EVA_SCREENSHOT=PATH also writes it there, e.g. docs/fleet-page.png for the README)."""
    if CHROMIUM is None:
        pytest.skip("chromium not found (apt-get install -y chromium)")
    url = served.url(0, "/?range=24h")
    html = _chromium("--dump-dom", url)
    dom = _Dom()
    dom.feed(html)
    kpi = {a["data-kpi"]: a for t, a in dom.elements if "data-kpi" in a}
    assert {"devices", "online", "offline", "active alarms"} <= set(kpi)
    assert re.search(r'data-kpi="devices"><b>40<', html)
    assert re.search(r'data-kpi="offline"><b>5<', html)  # every 8th device said offline
    pts = [a for t, a in dom.elements if t == "circle" and "pt" in a.get("class", "")]
    charts = {a["_svg"] for a in pts}
    assert {"utterance-rate", "abstain-rate", "estimated-accuracy", "drift",
            "band-input_rms_dbfs", "band-snr_db"} <= charts
    # utterances per minute, summed back over the plotted steps, is what replica 0 received
    r0 = served.replicas[0].model
    with r0.lock:
        per_version = {k[1]: g.counts["utterances"] for k, g in r0.state.groups.items()}
    step_s = float(next(a["data-step"] for t, a in dom.elements if t == "svg"
                        and a.get("id") == "utterance-rate"))
    for version, total in per_version.items():
        series = f"fsdd-digits@{version}" + (" r-2.0.0:in" if version == "2.0.0" else "")
        ys = [float(a["data-y"]) for a in pts if a["_svg"] == "utterance-rate"
              and a["data-series"] == series]
        assert ys and round(sum(ys) * step_s / 60) == total, series
    for a in (a for a in pts if a["_svg"] == "abstain-rate"):
        assert 0.0 <= float(a["data-y"]) <= 1.0
    for a in (a for a in pts if a["_svg"].startswith("band-")):
        assert float(a["data-p10"]) <= float(a["data-p50"]) <= float(a["data-p90"])
    # alarms now and a drill-down link for the devices that raised one
    assert 'href="/device/sim-00003"' in html and 'href="/device/sim-00007"' in html
    dev = _chromium("--dump-dom", served.url(0, "/device/sim-00003"))
    assert "device sim-00003" in dev and 'id="dev-utterances"' in dev
    shot = tmp_path / "fleet-page.png"
    _chromium(f"--screenshot={shot}", "--window-size=1220,1500", url)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    if os.environ.get("EVA_SCREENSHOT"):
        shutil.copy(shot, os.environ["EVA_SCREENSHOT"])


def test_fleet_json_is_the_watch_output(served: Served) -> None:
    j = json.loads(_get(served.url(1, "/api/fleet.json")))
    assert j["schema"] == 1 and j["fleet"]["devices"] == DEVICES
    assert set(j["devices"]) == {served.sim.device_id(i) for i in range(DEVICES)}
    r1 = served.replicas[1].model
    assert j["fleet"]["windows"] == r1.outcomes["stats"]
    assert j["fleet"]["duplicates"] == r1.outcomes.get("duplicate", 0)
    assert _get(served.url(1, "/healthz")) == b"ok\n"
    with pytest.raises(urllib.error.HTTPError):
        _get(served.url(1, "/nope"))


def test_fleet_only_switch_drops_device_series(served: Served) -> None:
    from agent.fleet.exporter import exposition

    model = served.replicas[0].model
    full = exposition(model).decode()
    lean = exposition(model, per_device=False).decode()
    assert "eva_device_" in full and "eva_device_" not in lean
    assert "eva_fleet_utterances_total" in lean
    assert threading.active_count() >= 1
