"""Rollout commands over a real mosquitto: malformed, unknown and hash-mismatching commands are
refused and reported as events; a valid one starts the shadow; the operator CLI publishes and
withdraws; the documented ACL lets only the operator publish rollouts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.recognition.model import MANIFEST, Manifest
from agent.rollout.bundle import bundle_digest
from tests.conftest import ROOT
from tests.mqtt_fixtures import BrokerFactory, Subscriber, free_port, mosquitto  # noqa: F401
from tests.rollout_models import derive

ACL = (ROOT / "docs" / "mosquitto" / "eva.acl").read_text()
DEV = "dev-1"


def publish(broker, topic: str, payload: bytes, *, user: str | None = None,
            password: str | None = None) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{free_port()}",
                    protocol=mqtt.MQTTv311)
    if user:
        c.username_pw_set(user, password)
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
    finally:
        c.disconnect()
        c.loop_stop()


def fleet(broker, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", "fleet", "rollout", *args,
                           "--broker", broker.url], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def next_event(sub: Subscriber, timeout_s: float = 20.0) -> dict:
    return sub.next_new(lambda m: m.topic.endswith("/event"), timeout_s).json()


def test_malformed_unknown_and_mismatching_commands_refused_and_reported(
        mosquitto: BrokerFactory, tmp_path: Path, make_stream):  # noqa: F811
    broker = mosquitto()
    wav = make_stream(seconds=120, seed=41).with_suffix(".wav")
    state = tmp_path / "state"
    cand = derive(state / "inbox" / "candidate", version="9.0.0-mqtt")
    m = Manifest.read(cand / MANIFEST)
    sha = bundle_digest(cand)
    fleet_topic, dev_topic = "eva/fleet/rollout", f"eva/{DEV}/rollout"
    # a malformed fleet-wide command is waiting (retained) before the device starts
    publish(broker, fleet_topic, json.dumps(
        {"schema": 1, "id": "bad id!", "model": {"name": m.name, "version": m.version,
                                                "sha256": sha},
         "percent": 100, "mode": "shadow"}).encode())
    sub = Subscriber(broker, f"eva/{DEV}/#")
    proc = subprocess.Popen(
        # paced so that it still runs while the test goes through every step, even on a
        # loaded machine (the test stops it at the end)
        [sys.executable, "-m", "agent", "run", "--source", str(wav), "--speed", "1.5",
         "--telemetry", broker.url, "--device-id", DEV, "--state-dir", str(state),
         "--decisions", str(tmp_path / "d.jsonl"), "--window", "5", "--log-level", "WARNING"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        e = next_event(sub)
        assert (e["event"], e["state"]) == ("rollout_refused", "refused")
        assert "rollout.id" in e["reason"] and fleet_topic in e["reason"]
        for payload, expect in (
                (b"{not json", "not JSON"),
                (json.dumps({"schema": 1, "id": "r-1", "model": {"name": m.name,
                                                                 "version": m.version,
                                                                 "sha256": sha},
                             "percent": 100, "mode": "yolo"}).encode(), "rollout.mode"),
                (json.dumps({"schema": 2, "id": "r-1", "model": {}, "percent": 1,
                             "mode": "shadow"}).encode(), "schema"),
                (json.dumps({"schema": 1, "id": "r-1", "model": {"name": m.name,
                                                                 "version": m.version,
                                                                 "sha256": "0" * 64},
                             "percent": 100, "mode": "shadow"}).encode(), "does not match")):
            publish(broker, dev_topic, payload)
            e = next_event(sub)
            if e["event"] == "rollout_received":  # a well-formed command is acknowledged first
                e = next_event(sub)
            assert e["event"] == "rollout_refused" and expect in e["reason"], (expect, e)
        # an unknown model (nothing delivered) waits for its files, it is never downloaded
        publish(broker, dev_topic, json.dumps(
            {"schema": 1, "id": "r-2", "model": {"name": m.name, "version": "7.7.7",
                                                 "sha256": sha},
             "percent": 100, "mode": "shadow"}).encode())
        assert next_event(sub)["event"] == "rollout_received"
        e = next_event(sub)
        assert e["event"] == "waiting_for_files" and "inbox" in e["reason"]
        # the operator CLI: validated, published retained, then withdrawn
        bad = fleet(broker, "start", "--id", "r 3", "--model-dir", str(cand), "--percent", "100",
                    "--mode", "shadow")
        assert bad.returncode == 2 and "rollout not sent" in bad.stderr
        publish(broker, dev_topic, b"")  # the device message withdrawn: the fleet one applies
        r = fleet(broker, "start", "--id", "r-3", "--model-dir", str(cand), "--percent", "100",
                  "--mode", "shadow")
        assert r.returncode == 0, r.stderr
        assert f"published (retained) on {fleet_topic}" in r.stdout
        names = []
        while "shadow_started" not in names:
            names.append(next_event(sub)["event"])
        assert "rollout_refused" not in names[names.index("rollout_received"):]
        stats = sub.wait_for(lambda x: x.topic.endswith("/stats")
                             and x.json()["rollout"]["state"] == "shadow", 30).json()
        assert stats["rollout"]["candidate"] == m.ref and stats["rollout"]["id"] == "r-3"
        st = fleet(broker, "status", "--duration", "3", "--json")
        assert st.returncode == 0, st.stderr
        report = json.loads(st.stdout)
        assert report["fleet_rollout"]["id"] == "r-3"
        (row,) = report["cohorts"]["in"]
        assert row["device"] == DEV and row["slot"] == "bundled"
        a = fleet(broker, "abort")
        assert a.returncode == 0, a.stderr
        e = next_event(sub)
        assert e["event"] == "rollout_aborted"
    finally:
        sub.close()
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "rollout refused: " in err and all(
        len(line) < 400 for line in err.splitlines())


def test_documented_acl_lets_only_the_operator_publish_rollouts(
        mosquitto: BrokerFactory):  # noqa: F811
    users = {"devA": "pa", "operator": "po"}
    broker = mosquitto(users=users, acl=ACL)
    device = Subscriber(broker, "eva/+/rollout", username="devA", password="pa")
    watcher = Subscriber(broker, "eva/#", username="operator", password="po")
    try:
        publish(broker, "eva/fleet/rollout", b'{"from":"operator"}', user="operator",
                password="po")
        got = device.wait_for(lambda m: m.topic == "eva/fleet/rollout")
        assert got.payload == b'{"from":"operator"}'
        for t in ("eva/fleet/rollout", "eva/devA/rollout"):
            publish(broker, t, b'{"from":"device"}', user="devA", password="pa")
        # in-order delivery per client: once devA's legitimate stats arrive, its rollout
        # attempts would have arrived before them
        publish(broker, "eva/devA/stats", b"{}", user="devA", password="pa")
        seen = []
        while True:
            m = watcher.get(10)
            seen.append((m.topic, m.payload))
            if m.topic == "eva/devA/stats":
                break
        assert (("eva/fleet/rollout", b'{"from":"device"}') not in seen
                and all(p != b'{"from":"device"}' for _, p in seen)), seen
    finally:
        device.close()
        watcher.close()


@pytest.mark.parametrize("payload", [b"", b"   "])
def test_empty_message_is_a_withdrawal_not_an_error(payload):
    from agent.rollout.command import parse

    assert parse(payload) is None
