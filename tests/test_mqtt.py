"""MQTT sink against a real mosquitto: delivery, presence, outages, crashes, TLS + ACL."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.telemetry import Message, Outbox, OutboxLimits, Sink, make_sink, topic
from agent.telemetry.mqtt import MqttOptions, MqttSink
from tests.mqtt_fixtures import (
    MOSQUITTO,
    MOSQUITTO_PASSWD,
    Broker,
    BrokerFactory,
    Pki,
    Subscriber,
    free_port,
    mosquitto,
    pki,
)

__all__ = ["mosquitto", "pki"]  # fixtures; conftest.py may import them instead

ROOT = Path(__file__).resolve().parents[1]
FAST = MqttOptions(reconnect_min_s=0.05, reconnect_max_s=0.5, keepalive_s=10)
BIRTH = {"schema": 1, "agent_version": "test", "window_s": 10}


def stats_msg(dev: str, seq: int) -> Message:
    return Message(topic("eva", dev, "stats"), {"schema": 1, "device_id": dev, "seq": seq,
                                                "historical": False})


def sink_for(broker: Broker, dev: str, state: Path, **kw: object) -> MqttSink:
    s = make_sink(broker.url, device_id=dev, state_dir=state, birth=BIRTH,
                  mqtt=kw.pop("mqtt", FAST), **kw)  # type: ignore[arg-type]
    assert isinstance(s, MqttSink) and isinstance(s, Sink)
    return s


def collect_seqs(sub: Subscriber, want: set[int], timeout_s: float) -> list[int]:
    """Every stats seq received (duplicates included) until all of `want` were seen."""
    got: list[int] = []
    deadline = time.monotonic() + timeout_s
    while not want <= set(got):
        m = sub.get(max(0.0, deadline - time.monotonic()))
        if m.topic.endswith("/stats"):
            got.append(m.json()["seq"])
    return got


def first_occurrences(seqs: list[int]) -> list[int]:
    seen: set[int] = set()
    return [s for s in seqs if not (s in seen or seen.add(s))]  # type: ignore[func-returns-value]


def test_publish_receive_presence_and_clean_close(mosquitto: BrokerFactory,
                                                  tmp_path: Path) -> None:
    broker = mosquitto()
    sink = sink_for(broker, "dev1", tmp_path)
    assert sink.wait_connected(5)
    for i in range(5):
        sink.publish(stats_msg("dev1", i))
    assert sink.wait_drained(5)
    # A subscriber arriving later still learns presence and schema (retained).
    sub = Subscriber(broker, "eva/dev1/#")
    status = sub.wait_for(lambda m: m.topic == "eva/dev1/status")
    birth = sub.wait_for(lambda m: m.topic == "eva/dev1/birth")
    assert (status.payload, status.retain) == (b"online", True)
    assert birth.retain and birth.json() == BIRTH
    for i in range(5, 8):
        sink.publish(stats_msg("dev1", i))
    assert collect_seqs(sub, {5, 6, 7}, 5) == [5, 6, 7]  # not retained, in order, once
    assert sink.wait_drained(5)
    st = sink.stats()
    assert st["delivered"] == 8 and st["queued"] == 0 and st["connected"] and st["protocol"] == "5"
    assert sink.close(5) is True
    off = sub.wait_for(lambda m: m.topic == "eva/dev1/status")
    assert off.payload == b"offline"
    sub.close()
    later = Subscriber(broker, "eva/dev1/status")
    assert later.get().payload == b"offline"  # retained for consumers that join later
    later.close()


CHILD = r"""
import sys, time
from agent.telemetry import Message, make_sink, topic
from agent.telemetry.mqtt import MqttOptions
url, state, dev, n, wait = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
sink = make_sink(url, device_id=dev, state_dir=state, birth={"schema": 1},
                 mqtt=MqttOptions(reconnect_min_s=0.05, reconnect_max_s=0.5, keepalive_s=10))
if wait == "connected":
    assert sink.wait_connected(10)
for i in range(n):
    sink.publish(Message(topic("eva", dev, "stats"), {"seq": i, "historical": False}))
if wait == "connected":
    assert sink.wait_drained(10)
print("ready", flush=True)
sys.stdin.read()  # block until killed
"""


def run_child(broker: Broker, state: Path, dev: str, n: int, wait: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", CHILD, broker.url, str(state), dev, str(n), wait],
                         cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()  # bounded by the child's own 10 s waits
    assert line.strip() == "ready", f"child failed: {line!r}"
    return p


def test_last_will_sets_offline_when_killed(mosquitto: BrokerFactory, tmp_path: Path) -> None:
    broker = mosquitto()
    sub = Subscriber(broker, "eva/devk/status")
    child = run_child(broker, tmp_path, "devk", 1, "connected")
    try:
        assert sub.wait_for(lambda m: True).payload == b"online"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(5)
        assert sub.get(5).payload == b"offline"  # the broker fired the will at once
    finally:
        child.kill()
        child.wait(5)
        sub.close()


def test_killed_while_broker_down_replays_historical(mosquitto: BrokerFactory,
                                                     tmp_path: Path) -> None:
    broker = mosquitto(start=False)
    child = run_child(broker, tmp_path, "devh", 6, "none")  # publish() returned: on disk
    os.kill(child.pid, signal.SIGKILL)
    child.wait(5)
    broker.start()
    sub = Subscriber(broker, "eva/devh/stats")
    sink = sink_for(broker, "devh", tmp_path)
    sink.publish(stats_msg("devh", 100))
    try:
        msgs = []
        while len({m["seq"] for m in msgs}) < 7:
            msgs.append(sub.get(5).json())
        assert first_occurrences([m["seq"] for m in msgs]) == [0, 1, 2, 3, 4, 5, 100]
        assert all(m["historical"] is True for m in msgs if m["seq"] < 100)
        assert [m["historical"] for m in msgs if m["seq"] == 100] == [False]
        assert sink.close(5) is True
    finally:
        sink.close(0)
        sub.close()


def test_broker_outage_every_seq_arrives_in_order(mosquitto: BrokerFactory,
                                                  tmp_path: Path) -> None:
    broker = mosquitto(persistence=True)
    sub = Subscriber(broker, "eva/devo/stats", client_id="operator-sub", persistent=True)
    sink = sink_for(broker, "devo", tmp_path)
    assert sink.wait_connected(5)
    seq = 0
    for _ in range(10):
        sink.publish(stats_msg("devo", seq))
        seq += 1
    broker.stop()
    costs = []
    t_end = time.monotonic() + 2.0  # the outage: keep producing windows while it lasts
    while time.monotonic() < t_end:
        t0 = time.perf_counter()
        sink.publish(stats_msg("devo", seq))
        costs.append(time.perf_counter() - t0)
        seq += 1
        time.sleep(0.1)  # the producer's own cadence, not a wait for an event
    assert not sink.stats()["connected"]
    broker.start()
    for _ in range(10):
        sink.publish(stats_msg("devo", seq))
        seq += 1
    got = collect_seqs(sub, set(range(seq)), 15)
    assert first_occurrences(got) == list(range(seq))  # after dedup by seq: all, in order
    assert sink.wait_drained(5) and sink.stats()["queued"] == 0
    assert max(costs) < 0.05
    assert sink.close(5) is True
    sub.close()


def test_broker_never_up_publish_stays_fast_and_bounded(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here
    sink = make_sink(f"mqtt://127.0.0.1:{port}", device_id="devn", state_dir=tmp_path,
                     mqtt=FAST, outbox=OutboxLimits(max_messages=50))
    costs = []
    for i in range(500):
        t0 = time.perf_counter()
        sink.publish(stats_msg("devn", i))
        costs.append(time.perf_counter() - t0)
    st = sink.stats()
    assert (st["queued"], st["dropped"], st["connected"]) == (50, 450, False)
    assert statistics.median(costs) < 0.001  # the pipeline's budget per window is 1 ms
    t0 = time.monotonic()
    assert sink.close(0.2) is False
    assert time.monotonic() - t0 < 3
    with Outbox(tmp_path / "telemetry-outbox.sqlite3") as ob:
        ps = [json.loads(r.payload) for r in ob.peek(0, 1000)]
    assert [p["seq"] for p in ps] == list(range(450, 500))
    assert sum(p.get("outbox_dropped", 0) for p in ps) == 450


DOCS = ROOT / "docs" / "mosquitto"
ACL = (DOCS / "eva.acl").read_text()  # the documented ACL is the one under test


def test_tls_password_acl_device_cannot_publish_as_another(mosquitto: BrokerFactory, pki: Pki,
                                                           tmp_path: Path) -> None:
    users = {"devA": "pwA", "devB": "pwB", "operator": "pwO"}
    broker = mosquitto(tls=pki, users=users, acl=ACL)
    sub = Subscriber(broker, "eva/#", username="operator", password="pwO", ca=pki.ca)
    pwfile = tmp_path / "devA.pw"
    pwfile.write_text("pwA\n")
    opts = MqttOptions(password_file=str(pwfile), ca_file=str(pki.ca), reconnect_min_s=0.05,
                       reconnect_max_s=0.5)
    sink = make_sink(f"mqtts://127.0.0.1:{broker.port}", device_id="devA",
                     state_dir=tmp_path / "a", birth=BIRTH, mqtt=opts)
    try:
        assert sink.wait_connected(5), broker.log()
        sink.publish(stats_msg("devA", 0))
        sink.publish(stats_msg("devB", 1))  # devA impersonating devB: denied by the ACL
        sink.publish(stats_msg("devA", 2))
        got = []
        while 2 not in [m["seq"] for t, m in got]:
            m = sub.get(5)
            if m.topic.endswith("/stats"):
                got.append((m.topic, m.json()))
        # seq 1 was sent before seq 2 on the same connection; had it passed, it came first
        assert [(t, m["seq"]) for t, m in got] == [("eva/devA/stats", 0), ("eva/devA/stats", 2)]
        assert sink.wait_drained(5)
        st = sink.stats()
        assert st["rejected"] == 1 and st["delivered"] == 2  # MQTT 5 PUBACK "not authorized"
        assert sink.close(5)
    finally:
        sink.close(0)
        sub.close()
    with pytest.raises(TimeoutError):  # and a wrong password never gets in
        Subscriber(broker, "eva/#", username="operator", password="wrong", ca=pki.ca,
                   timeout_s=1)


def test_client_certificate_identity_as_username(mosquitto: BrokerFactory, pki: Pki,
                                                 tmp_path: Path) -> None:
    broker = mosquitto(tls=pki, acl=ACL, require_certificate=True,
                       use_identity_as_username=True)
    sub = Subscriber(broker, "eva/#", ca=pki.ca, cert=pki.client("operator"))
    cert, key = pki.client("devC")
    opts = MqttOptions(ca_file=str(pki.ca), cert_file=str(cert), key_file=str(key),
                       reconnect_min_s=0.05, reconnect_max_s=0.5)
    sink = make_sink(f"mqtts://127.0.0.1:{broker.port}", device_id="devC",
                     state_dir=tmp_path, mqtt=opts)
    try:
        sink.publish(stats_msg("devD", 0))  # the certificate says devC: denied
        sink.publish(stats_msg("devC", 1))
        m = sub.wait_for(lambda m: m.topic.endswith("/stats"))
        assert (m.topic, m.json()["seq"]) == ("eva/devC/stats", 1)
        assert sink.wait_drained(5) and sink.stats()["rejected"] == 1
    finally:
        sink.close(2)
        sub.close()


class V311OnlyProxy:
    """Pretends to be a broker without MQTT 5: refuses protocol level 5 the way a 3.1.1 broker
    does (CONNACK return code 1) and pipes level-4 connections to the real broker."""

    def __init__(self, upstream: Broker) -> None:
        self.upstream = upstream
        self.levels: list[int] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    @staticmethod
    def _read_packet(conn: socket.socket) -> bytes:
        head = conn.recv(1, socket.MSG_WAITALL)
        length, shift, raw = 0, 0, b""
        while True:
            b = conn.recv(1, socket.MSG_WAITALL)
            raw += b
            length |= (b[0] & 0x7F) << shift
            shift += 7
            if not b[0] & 0x80:
                break
        return head + raw + conn.recv(length, socket.MSG_WAITALL)

    def _handle(self, conn: socket.socket) -> None:
        try:
            packet = self._read_packet(conn)
            body = packet[packet.index(b"MQTT"):]
            level = body[4]
            self.levels.append(level)
            if level == 5:
                conn.sendall(b"\x20\x02\x00\x01")  # CONNACK: unacceptable protocol version
                conn.close()
                return
            up = socket.create_connection((self.upstream.host, self.upstream.port))
            self.conns.append(up)
            up.sendall(packet)
            threading.Thread(target=self._pipe, args=(up, conn), daemon=True).start()
            self._pipe(conn, up)
        except (OSError, IndexError, ValueError):
            conn.close()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes the accept() of the serving thread
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        for c in self.conns:
            c.close()


def test_falls_back_to_mqtt_311_when_v5_is_refused(mosquitto: BrokerFactory,
                                                   tmp_path: Path) -> None:
    broker = mosquitto()
    proxy = V311OnlyProxy(broker)
    sub = Subscriber(broker, "eva/dev3/#")
    sink = make_sink(f"mqtt://127.0.0.1:{proxy.port}", device_id="dev3", state_dir=tmp_path,
                     birth=BIRTH, mqtt=FAST)
    try:
        sink.publish(stats_msg("dev3", 0))
        assert sink.wait_connected(5)
        assert proxy.levels[:2] == [5, 4]
        got = collect_seqs(sub, {0}, 5)
        assert got == [0] and sink.stats()["protocol"] == "3.1.1"
        assert sink.close(5) is True
    finally:
        sink.close(0)
        sub.close()
        proxy.close()


def test_documented_broker_config_works(pki: Pki, tmp_path: Path) -> None:
    """docs/mosquitto/mosquitto.conf with only paths, port and logging swapped for the test."""
    if MOSQUITTO is None or MOSQUITTO_PASSWD is None:
        pytest.skip("mosquitto / mosquitto_passwd not installed")
    port = free_port()
    pw = tmp_path / "eva.passwd"
    pw.touch(mode=0o600)
    for user, password in {"devA": "pwA", "operator": "pwO"}.items():
        subprocess.run([MOSQUITTO_PASSWD, "-b", str(pw), user, password], check=True, timeout=10)
    conf = (DOCS / "mosquitto.conf").read_text()
    for old, new in {"/etc/mosquitto/certs/ca.crt": str(pki.ca),
                     "/etc/mosquitto/certs/server.crt": str(pki.server_cert),
                     "/etc/mosquitto/certs/server.key": str(pki.server_key),
                     "/etc/mosquitto/eva.passwd": str(pw),
                     "/etc/mosquitto/eva.acl": str(DOCS / "eva.acl"),
                     "/var/lib/mosquitto/": f"{tmp_path}/",
                     "listener 8883": f"listener {port} 127.0.0.1",
                     "log_dest syslog": "log_dest stderr"}.items():
        assert old in conf
        conf = conf.replace(old, new)
    if os.geteuid() == 0:
        conf += "user root\n"
    (tmp_path / "mosquitto.conf").write_text(conf)
    broker = Broker(port=port, conf=tmp_path / "mosquitto.conf", log_path=tmp_path / "log")
    try:
        broker.start()
        sub = Subscriber(broker, "eva/#", username="operator", password="pwO", ca=pki.ca)
        (tmp_path / "devA.pw").write_text("pwA\n")
        sink = make_sink(f"mqtts://127.0.0.1:{port}", device_id="devA", state_dir=tmp_path,
                         mqtt=MqttOptions(password_file=str(tmp_path / "devA.pw"),
                                          ca_file=str(pki.ca), reconnect_min_s=0.05))
        sink.publish(stats_msg("devA", 0))
        m = sub.wait_for(lambda m: m.topic.endswith("/stats"))
        assert m.json()["seq"] == 0 and sink.close(5)
        sub.close()
        log = broker.log()  # no deprecated or rejected settings in the documented config
        assert "Error:" not in log and "Note:" not in log and "Unknown" not in log, log
    finally:
        broker.kill()
