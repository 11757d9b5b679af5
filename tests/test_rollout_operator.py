"""Issue 19, the operator's story: rollout events open no false gaps, the page shows each active
alarm's reason and each device's rollout state, `fleet serve`'s lean control connection keeps
alive over TLS while idle, and `fleet rollout finish` ends a rollout without rolling back."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.config import Config, VadConfig
from agent.recognition.decision import Policy
from agent.recognition.model import ModelRunner
from agent.recognition.pipeline import Pipeline
from agent.resources import default_model_dir
from agent.rollout.command import RolloutCommand
from agent.rollout.store import ModelStore
from tests.conftest import ROOT
from tests.mqtt_fixtures import Broker, BrokerFactory, Pki, Subscriber, mosquitto, pki
from tests.rollout_models import derive
from tests.test_rollout_device import of, run
from tests.test_rollout_safety import FAST, _Host, deliver

__all__ = ["mosquitto", "pki"]  # the fixtures


def test_rollout_events_open_no_gaps_and_the_page_tells_the_story(tmp_path, make_stream):
    from agent.fleet import page, views
    from agent.fleet.ingest import FleetModel

    wav = make_stream(seconds=100, seed=31).with_suffix(".wav")
    state = tmp_path / "state"
    bad = deliver(state, derive(tmp_path / "bad", behaviour="abstain", version="9.0.0-bad"),
                  "activate")
    (tmp_path / "boot").mkdir()
    msgs, _ = run(tmp_path / "boot", wav, state, *FAST)
    events = of(msgs, "event")
    assert len(events) >= 3 and [e["seq"] for e in events] == list(range(len(events)))
    counted = sorted(m["payload"]["seq"] for m in msgs
                     if m["topic"].rsplit("/", 1)[1] in ("stats", "alarm"))
    assert counted == list(range(len(counted)))  # one contiguous sequence, events apart
    model = FleetModel()
    for m in msgs:
        kind = m["topic"].rsplit("/", 1)[1]
        model.ingest(m["topic"], json.dumps(m["payload"]).encode(), kind == "birth")
    with model.reading():
        snap = model.state.to_json()
    assert snap["devices"]["dev-1"]["missing"] == 0 and snap["fleet"]["missing"] == 0
    v = views.fleet_view(model, None)
    html = page.fleet_page(v)
    (alarm,) = [a for a in v["alarms"] if a["metric"] == "model_probation"]
    assert alarm["reason"] and page.escape(alarm["reason"]) in html  # the reason, on the page
    assert f"{bad.ref} rolled back" in alarm["reason"]
    dev = page.device_page(views.device_view(model, "dev-1"))
    assert "<td>rolled_back</td>" in dev and f"{bad.ref} rolled back" in dev
    assert f"failed builds (never re-activated)</td><td>{bad.ref}<" in dev
    rows = [r for _, rs, _ in v["tops"] for r in rs] + v.get("search", [])
    assert rows and all(r["rollout"].startswith("rolled_back") for r in rows)
    assert ">rolled_back" in html


def test_the_control_connection_keeps_alive_over_tls_while_idle(
        mosquitto: BrokerFactory, pki: Pki) -> None:
    """An idle TLS link must ping (the hand-written reader once did not, and mosquitto dropped
    the control connection every 1.5 keepalives)."""
    pytest.importorskip("gmqtt", reason="the fleet extra (gmqtt)")
    from agent.fleet.subscriber import Subscriber as Lean

    broker: Broker = mosquitto(tls=pki)
    got: list[tuple[str, bytes]] = []
    lean = Lean(lambda t, p, r: got.append((t, p)), host=broker.host, port=broker.port,
                tls=True, ca_file=pki.ca, topic_filter="eva/+/alarm", client_id="eva-ctl-ka",
                keepalive_s=1, backoff_s=(0.05, 0.2))
    lean.start()
    try:
        # idle for 6 keepalives (mosquitto drops a client silent for 1.5 of them, checking
        # about once a second)
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline and lean.connections == 1 and lean.connected:
            time.sleep(0.1)  # nothing to await: the test IS an idle period
        assert lean.connections == 1 and lean.connected, broker.log()[-400:]
        assert "exceeded timeout" not in broker.log()
        pub = Subscriber(broker, "x/none", ca=pki.ca)
        try:
            pub.client.publish("eva/dev-1/alarm", b"{}", qos=1).wait_for_publish(5)
        finally:
            pub.close()
        end = time.monotonic() + 5.0
        while not got and time.monotonic() < end:
            time.sleep(0.02)
        assert got == [("eva/dev-1/alarm", b"{}")] and lean.connections == 1
    finally:
        lean.stop()


def test_finish_keeps_the_committed_model_and_an_abort_after_it_rolls_nothing_back(tmp_path):
    from agent.rollout.device import RolloutController

    cfg = Config()
    cfg.agent.state_dir = str(tmp_path / "state")
    bundled = ModelRunner(default_model_dir())
    store = ModelStore(cfg.state_path())
    ref = store.install(derive(tmp_path / "m", version="9.0.0-fin"), bundled.manifest)
    store.activate(ref, bundled.manifest)  # committed: no probation
    model = store.verify(ref)
    host = _Host(Pipeline(VadConfig(), model, Policy("partial", 0.5, model.manifest.unknown_label)))
    ctl = RolloutController(cfg, host, pinned=False)
    c = RolloutCommand("r-9", *ref.split("@"), store.digest(ref), 100.0, "activate")
    ctl.submit(ctl.topics[0], json.dumps(c.to_payload()).encode())
    ctl.poll()
    assert ctl.state == "committed"
    done = RolloutCommand("r-9", *ref.split("@"), store.digest(ref), 100.0, "finish")
    ctl.submit(ctl.topics[0], json.dumps(done.to_payload()).encode())
    ctl.poll()
    assert ctl.state == "finished" and host.monitor.events[-1]["event"] == "rollout_finished"
    assert store.pointers().active == ref and host.switches == 0
    # a restart stays finished; a withdrawal afterwards rolls nothing back
    ctl = RolloutController(cfg, host, pinned=False)
    assert ctl.state == "finished"
    ctl.submit(ctl.topics[0], b"")
    ctl.poll()
    assert store.pointers().active == ref and host.switches == 0


def test_fleet_rollout_finish_republishes_the_command_as_finished(
        mosquitto: BrokerFactory, tmp_path: Path) -> None:
    broker = mosquitto()

    def fleet(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "agent", "fleet", "rollout", *args,
                               "--broker", broker.url], capture_output=True, text=True,
                              timeout=60, cwd=ROOT)

    r = fleet("finish")
    assert r.returncode == 2 and "no rollout is published" in r.stderr
    m = derive(tmp_path / "m", version="9.0.0-fin")
    assert fleet("start", "--id", "r-9", "--model-dir", str(m), "--percent", "25",
                 "--mode", "activate").returncode == 0
    r = fleet("finish")
    assert r.returncode == 0 and "nothing rolls back" in r.stdout, r.stderr
    sub = Subscriber(broker, "eva/fleet/rollout")
    try:
        got = json.loads(sub.wait_for(lambda x: x.topic == "eva/fleet/rollout", 5).payload)
    finally:
        sub.close()
    assert got["mode"] == "finish" and got["id"] == "r-9" and got["percent"] == 25


@pytest.mark.parametrize("mode", ["finish"])
def test_the_schema_and_the_parser_agree_on_finish(mode):
    from agent.rollout.command import parse

    schema = json.loads((ROOT / "docs" / "rollout.schema.json").read_text())
    assert mode in schema["properties"]["mode"]["enum"]
    assert parse(json.dumps({"schema": 1, "id": "r", "model": {"name": "a", "version": "1",
                                                               "sha256": "0" * 64},
                             "percent": 5, "mode": mode})).mode == mode


def test_a_restart_with_the_retained_command_over_mqtt_keeps_the_failed_build_out(
        mosquitto: BrokerFactory, tmp_path: Path, make_stream) -> None:
    """The issue's trial: the retained `activate` is still on the broker when the device
    restarts; the failed build must not run again."""
    from agent.recognition.model import MANIFEST, Manifest
    from agent.rollout.bundle import bundle_digest

    broker = mosquitto()
    wav = make_stream(seconds=100, seed=31).with_suffix(".wav")
    state = tmp_path / "state"
    bad = derive(state / "inbox" / "delivered", behaviour="abstain", version="9.0.0-mqtt")
    m = Manifest.read(bad / MANIFEST)
    c = RolloutCommand("r-mq", m.name, m.version, bundle_digest(bad), 100.0, "activate")
    pub = Subscriber(broker, "x/none")
    try:
        pub.client.publish("eva/fleet/rollout", json.dumps(c.to_payload()), qos=1,
                           retain=True).wait_for_publish(5)
    finally:
        pub.close()
    sub = Subscriber(broker, "eva/dev-1/event")
    boots: list[tuple[list[str], set[str]]] = []
    try:
        for n in range(2):
            dec = tmp_path / f"d{n}.jsonl"
            r = subprocess.run(
                [sys.executable, "-m", "agent", "run", "--source", str(wav), "--speed", "20",
                 "--telemetry", broker.url, "--device-id", "dev-1", "--state-dir", str(state),
                 "--decisions", str(dec), "--window", "10", "--log-level", "WARNING", *FAST],
                cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            names = []
            while True:  # the agent drained its outbox before it exited: all events are here
                try:
                    names.append(sub.next_new(lambda m: True, 2.0).json()["event"])
                except TimeoutError:
                    break
            boots.append((names, {json.loads(x)["model"] for x in
                                  dec.read_text().splitlines()}))
    finally:
        sub.close()
    (first, _), (second, models) = boots
    assert "activated" in first and "rolled_back" in first, first
    assert "activated" not in second, second
    assert models == {Manifest.read(default_model_dir() / MANIFEST).ref}
