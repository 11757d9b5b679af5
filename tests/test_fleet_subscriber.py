"""The MQTT 5 subscriber of `fleet serve` (agent.fleet.subscriber, on gmqtt): against a real
mosquitto (persistent sessions across a replica restart, a broker restart, TLS with a password
and with a client certificate, refusals, the Maximum Packet Size bound) and against a fake
broker for what mosquitto does not do (a 3.1.1-only broker, refused subscriptions, a broker
that keeps dropping us: the back-off).
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.errors import AgentError, ConfigError
from agent.fleet.subscriber import MAX_PACKET, Subscriber
from tests.mqtt_fixtures import Broker, BrokerFactory, Pki, free_port, mosquitto, pki

pytest.importorskip("gmqtt", reason="the fleet extra (gmqtt)")

__all__ = ["mosquitto", "pki"]  # the fixtures
FAST = (0.05, 0.2)  # reconnect back-off in tests


@dataclass
class Collector:
    """ingest() for the reader: records, and wakes a waiter at a count."""

    items: list[tuple[str, bytes, bool]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def ingest(self, topic: str, payload: bytes, retained: bool) -> str:
        with self.cond:
            self.items.append((topic, payload, retained))
            self.cond.notify_all()
        return "stats"

    def wait(self, pred: Any, timeout_s: float = 10.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: pred(self.items), timeout_s):
                raise TimeoutError(f"not reached within {timeout_s} s: {len(self.items)} "
                                   "messages")

    def payloads(self) -> list[bytes]:
        with self.cond:
            return [p for _, p, _ in self.items]


def _publish(broker: Broker, msgs: list[tuple[str, bytes]], **kw: Any) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{free_port()}",
                    protocol=mqtt.MQTTv311)
    if kw.get("username"):
        c.username_pw_set(kw["username"], kw["password"])
    if kw.get("ca"):
        c.tls_set(ca_certs=str(kw["ca"]))
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        for info in [c.publish(t, b, qos=1) for t, b in msgs]:
            info.wait_for_publish(timeout=10)
    finally:
        c.disconnect()
        c.loop_stop()


def _until(pred: Any, what: str, timeout_s: float = 10.0) -> None:
    """Poll a counter of the reader (it has no event for it); bounded."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not seen within {timeout_s} s")
        time.sleep(0.01)


def _reader(broker: Broker, sink: Collector, **kw: Any) -> Subscriber:
    opts: dict[str, Any] = {"host": broker.host, "port": broker.port, "tls": False,
                            "topic_filter": "eva/+/stats", "client_id": "eva-serve-t-stats",
                            "backoff_s": FAST}
    opts.update(kw)
    return Subscriber(sink.ingest, **opts)


@pytest.fixture
def readers() -> Iterator[list[Subscriber]]:
    made: list[Subscriber] = []
    yield made
    for r in made:
        r.stop()


def test_acknowledged_messages_are_not_redelivered_to_a_persistent_session(
        mosquitto: BrokerFactory, readers: list[Subscriber]) -> None:
    """A replica restart with `--replica NAME`: what the broker queued meanwhile arrives, in
    order, and nothing acknowledged before comes again."""
    broker = mosquitto()
    sink = Collector()
    first = _reader(broker, sink, persistent=True, session_expiry_s=600)
    readers.append(first)
    first.start()
    _publish(broker, [("eva/d1/stats", b"a%d" % i) for i in range(300)])
    sink.wait(lambda m: len(m) >= 300)
    first.stop()  # acknowledged, then a clean DISCONNECT: the session stays
    _publish(broker, [("eva/d1/stats", b"b%d" % i) for i in range(50)])  # queued for us
    again = _reader(broker, sink, persistent=True, session_expiry_s=600)
    readers.append(again)
    again.start()
    _publish(broker, [("eva/d1/stats", b"end")])  # same topic: delivered after the queue
    sink.wait(lambda m: m[-1][1] == b"end")
    got = sink.payloads()
    assert got == [b"a%d" % i for i in range(300)] + [b"b%d" % i for i in range(50)] + [b"end"]
    assert again.messages == 51 and again.connections == 1


def test_reconnects_after_a_broker_restart_and_gets_what_was_queued(
        mosquitto: BrokerFactory, readers: list[Subscriber],
        caplog: pytest.LogCaptureFixture) -> None:
    broker = mosquitto(persistence=True)
    sink = Collector()
    reader = _reader(broker, sink, persistent=True, session_expiry_s=600)
    readers.append(reader)
    reader.start()
    _publish(broker, [("eva/d1/stats", b"before")])
    sink.wait(lambda m: len(m) == 1)
    assert reader.connected
    with caplog.at_level(logging.DEBUG):
        broker.stop()
        _until(lambda: not reader.connected, "the reader to notice the broker is gone")
        broker.start()  # the session (our subscription) is saved and restored
        _publish(broker, [("eva/d1/stats", b"after%d" % i) for i in range(20)])
        sink.wait(lambda m: len(m) == 21)
        _until(lambda: reader.connections == 2, "the SUBACK of the reconnection")
        assert reader.connected
        reader.stop()  # inside the block: its last log lines are captured too
    assert sink.payloads() == [b"before"] + [b"after%d" % i for i in range(20)]
    shown = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(shown) == 1, [r.getMessage() for r in shown]  # one line for the loss
    assert "lost the broker" in shown[0].getMessage() and broker.url in shown[0].getMessage()
    assert not any(r.exc_info for r in caplog.records)  # no traceback for a lost broker
    assert any("resubscribed" in r.getMessage() for r in caplog.records)
    assert reader.connections == 2


def test_tls_with_a_password_and_refused_credentials(
        mosquitto: BrokerFactory, pki: Pki, readers: list[Subscriber]) -> None:
    broker = mosquitto(tls=pki, users={"operator": "s3cret"})
    sink = Collector()
    bad = _reader(broker, sink, tls=True, ca_file=pki.ca, username="operator",
                  password="wrong")
    with pytest.raises(AgentError) as e:
        bad.start()
    assert str(e.value) == (f"broker mqtts://127.0.0.1:{broker.port} refused the "
                            "connection: code 135 (Connection Refused: Not authorized)")
    assert not bad.thread.is_alive()
    good = _reader(broker, sink, tls=True, ca_file=pki.ca, username="operator",
                   password="s3cret")
    readers.append(good)
    good.start()
    _publish(broker, [("eva/d1/stats", b"over tls")], username="operator", password="s3cret",
             ca=pki.ca)
    sink.wait(lambda m: len(m) == 1)
    assert sink.payloads() == [b"over tls"]


def test_tls_client_certificate_and_an_untrusted_server(
        mosquitto: BrokerFactory, pki: Pki, readers: list[Subscriber]) -> None:
    broker = mosquitto(tls=pki, require_certificate=True, use_identity_as_username=True)
    sink = Collector()
    with pytest.raises(AgentError, match=r"^cannot connect to broker mqtts://127\.0\.0\.1:\d+: "
                       r".*CERTIFICATE_VERIFY_FAILED"):
        _reader(broker, sink, tls=True).start()  # the system store does not know our CA
    cert, key = pki.client("operator")
    reader = _reader(broker, sink, tls=True, ca_file=pki.ca, cert_file=cert, key_file=key)
    readers.append(reader)
    reader.start()
    reader.stop()  # a polite DISCONNECT under TLS, from another thread: bounded
    assert not reader.thread.is_alive()


def test_an_absent_broker_is_one_line() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(AgentError, match=rf"^cannot connect to broker mqtt://127\.0\.0\.1:{port}"
                       r": Connection refused$"):
        Subscriber(Collector().ingest, host="127.0.0.1", port=port, tls=False,
                   topic_filter="eva/+/stats", client_id="x").start()


def test_the_broker_never_sends_a_packet_beyond_the_maximum_packet_size(
        mosquitto: BrokerFactory, readers: list[Subscriber]) -> None:
    """Issue 20, row 8: a huge packet must not exhaust memory. gmqtt's read buffer has no
    limit, so the bound is MQTT 5's Maximum Packet Size in the CONNECT: this broker has no
    max_packet_size of its own and takes a 200 KB publish, but does not forward it to us."""
    broker = mosquitto()
    sink = Collector()
    reader = _reader(broker, sink)
    readers.append(reader)
    reader.start()
    big = b"x" * (MAX_PACKET * 3)
    fits = b"y" * (MAX_PACKET - 100)
    _publish(broker, [("eva/d1/stats", big), ("eva/d1/stats", fits), ("eva/d1/stats", b"end")])
    sink.wait(lambda m: m and m[-1][1] == b"end")
    assert sink.payloads() == [fits, b"end"] and reader.connected
    assert reader.connections == 1  # not a reconnect: the broker dropped it for us


# --- against a fake broker: what mosquitto does not do ----------------------------------------
CONNACK5 = b"\x20\x03\x00\x00\x00"


class FakeBroker:
    """Accepts connections; answers CONNECT with `connack` and SUBSCRIBE with `suback` (an
    MQTT 5 SUBACK for packet id 1, empty properties); `drop_after` connections are served, the
    later ones closed at once. Records when each connection came."""

    def __init__(self, connack: bytes = CONNACK5, suback: bytes = b"\x90\x04\x00\x01\x00\x01",
                 serve: int = 1000, hold_s: float = 10.0) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connack, self.suback, self.serve, self.hold_s = connack, suback, serve, hold_s
        self.accepted: list[float] = []
        self.connects: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.accepted.append(time.monotonic())
            with conn:
                if len(self.accepted) > self.serve:
                    continue  # closed at once
                conn.settimeout(self.hold_s)
                try:
                    self.connects.append(conn.recv(65536))       # CONNECT
                    conn.sendall(self.connack)
                    if self.connack != CONNACK5:
                        continue
                    conn.recv(65536)                             # SUBSCRIBE (packet id 1)
                    conn.sendall(self.suback)
                    while conn.recv(65536):
                        pass
                except OSError:
                    pass

    def close(self) -> None:
        # shutdown wakes the accept() the thread sits in; close() alone leaves it blocked on a
        # number the next open file reuses (a thread spinning on ENOTSOCK for the whole suite)
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self.thread.join(self.hold_s + 5)
        assert not self.thread.is_alive(), "the fake broker's thread did not end"


def test_mqtt_3_1_1_is_refused_in_one_line_never_a_silent_fall_back() -> None:
    """gmqtt can bound what it reads only with MQTT 5: asked for 3.1.1, the link refuses; a
    broker that refuses MQTT 5 (CONNACK return code 1, as a 3.1.1 broker does) makes gmqtt
    fall back to 3.1.1, which the link turns into a one-line refusal."""
    with pytest.raises(ConfigError, match=r"^--mqtt-version 3\.1\.1: fleet serve speaks MQTT 5 "
                       r"only: .*Maximum Packet Size"):
        Subscriber(Collector().ingest, host="127.0.0.1", port=1, tls=False,
                   topic_filter="eva/+/stats", client_id="x", version="3.1.1")
    fake = FakeBroker(connack=b"\x20\x02\x00\x01")
    r = Subscriber(Collector().ingest, host="127.0.0.1", port=fake.port, tls=False,
                   topic_filter="eva/+/stats", client_id="x")
    try:
        t0 = time.monotonic()
        with pytest.raises(AgentError) as e:
            r.start()
        assert time.monotonic() - t0 < 5  # at once, not at the start timeout
        assert str(e.value).startswith(f"broker mqtt://127.0.0.1:{fake.port} refused MQTT 5 "
                                       "(a 3.1.1-only broker?)"), str(e.value)
        assert "upgrade to a broker with MQTT 5" in str(e.value)
        assert [c[8] for c in fake.connects] == [5]  # no 3.1.1 CONNECT was sent
    finally:
        r.stop()
        fake.close()


def test_connect_carries_mqtt_5_the_maximum_packet_size_and_the_session() -> None:
    fake = FakeBroker()
    r = Subscriber(Collector().ingest, host="127.0.0.1", port=fake.port, tls=False,
                   topic_filter="eva/+/stats", client_id="eva-serve-r1-stats", persistent=True,
                   session_expiry_s=3600, username="op", password="pw")
    try:
        r.start()
        c = fake.connects[0]
        assert c[2:9] == b"\x00\x04MQTT\x05" and c[9] & 0x02 == 0  # MQTT 5, clean start 0
        assert b"\x27\x00\x01\x00\x00" in c  # Maximum Packet Size 65536
        assert b"\x11\x00\x00\x0e\x10" in c  # Session Expiry Interval 3600 s
    finally:
        r.stop()
        fake.close()


def test_a_refused_subscription_is_one_line() -> None:
    """(mosquitto grants every subscription and filters by ACL on delivery, so a fake broker
    says no here.)"""
    fake = FakeBroker(suback=b"\x90\x04\x00\x01\x00\x87")
    r = Subscriber(Collector().ingest, host="127.0.0.1", port=fake.port, tls=False,
                   topic_filter="$share/g/eva/+/stats", client_id="x")
    try:
        with pytest.raises(AgentError) as e:
            r.start()
        assert str(e.value) == (
            f"broker mqtt://127.0.0.1:{fake.port} refused the subscription to "
            "$share/g/eva/+/stats (ACL? shared subscriptions need MQTT 5 or a broker that "
            "accepts $share): Not authorized")
    finally:
        r.stop()
        fake.close()


def test_a_refused_sys_filter_is_tolerated_any_other_refusal_is_one_line() -> None:
    """The control connection subscribes to several filters in one packet: an ACL that keeps
    the operator out of $SYS costs only the broker's drop counter; refusing alarms is an error
    that names the filter."""
    filters = [("eva/+/status", 1), ("$SYS/broker/publish/messages/dropped", 0)]
    fake = FakeBroker(suback=b"\x90\x06\x00\x01\x00\x01\x01\x87")  # $SYS refused
    r = Subscriber(Collector().ingest, host="127.0.0.1", port=fake.port, tls=False,
                   topic_filter="eva/+/alarm", extra_filters=filters, client_id="x")
    try:
        r.start()
        assert r.connected
    finally:
        r.stop()
        fake.close()
    fake = FakeBroker(suback=b"\x90\x06\x00\x01\x00\x01\x87\x00")  # status refused
    r = Subscriber(Collector().ingest, host="127.0.0.1", port=fake.port, tls=False,
                   topic_filter="eva/+/alarm", extra_filters=filters, client_id="x")
    try:
        with pytest.raises(AgentError) as e:
            r.start()
        assert str(e.value) == (f"broker mqtt://127.0.0.1:{fake.port} refused the subscription "
                                "to eva/+/status (ACL?): Not authorized")
    finally:
        r.stop()
        fake.close()


def test_reconnects_back_off_while_the_broker_keeps_closing_the_connection(
        caplog: pytest.LogCaptureFixture) -> None:
    """Served once, then every connection closed at once: the attempts space out (back-off
    0.1 s doubling to 0.8 s here) and the log says it once."""
    fake = FakeBroker(serve=1, hold_s=0.3)  # the served connection ends after 0.3 s idle
    r = Subscriber(Collector().ingest, host="127.0.0.1", port=fake.port, tls=False,
                   topic_filter="eva/+/stats", client_id="x", backoff_s=(0.1, 0.8))
    try:
        with caplog.at_level(logging.DEBUG):
            r.start()
            _until(lambda: len(fake.accepted) >= 7, "six reconnection attempts")
            r.stop()
        gaps = [b - a for a, b in zip(fake.accepted[1:], fake.accepted[2:], strict=False)]
        assert gaps[0] < 0.5 and max(gaps) < 1.5 and gaps[-1] >= 3 * gaps[0], gaps
        shown = [x.getMessage() for x in caplog.records if x.levelno >= logging.WARNING]
        assert len(shown) == 1 and "lost the broker" in shown[0], shown
        assert not any(x.exc_info for x in caplog.records)
    finally:
        r.stop()
        fake.close()


def test_serve_reads_stats_over_tls_with_a_password_on_its_own_session(
        mosquitto: BrokerFactory, pki: Pki, tmp_path: Any) -> None:
    """`fleet serve` wiring: both connections get the server's credentials, TLS and
    session (client ids `eva-serve-NAME-stats` for the shared stats, `eva-serve-NAME` for the
    control plane: alarms, presence, births, rollouts, the broker's drop counter)."""
    pytest.importorskip("prometheus_client", reason="the fleet extra (prometheus-client)")
    from agent.fleet.serve import Server
    from tests.fleet_sim import SimFleet

    broker = mosquitto(tls=pki, users={"operator": "s3cret"})
    creds = {"username": "operator", "password": "s3cret", "ca_file": pki.ca,
             "cert_file": None, "key_file": None}
    server = Server(broker_url=f"mqtts://127.0.0.1:{broker.port}", listen=("127.0.0.1", 0),
                    share="g", replica="r1", session_expiry_s=600, credentials=creds).start()
    try:
        assert server.stats.client_id == "eva-serve-r1-stats"
        assert server.stats.topic_filter == "$share/g/eva/+/stats"
        assert server.control.client_id == "eva-serve-r1"
        control = {server.control.topic_filter, *(f for f, _ in server.control.extra_filters)}
        assert {"eva/+/alarm", "eva/+/birth", "eva/+/status", "eva/+/rollout"} <= control
        assert not any(f.endswith("/stats") for f in control)
        sim = SimFleet(devices=1, windows=2)
        births = [(t, b) for t, b in sim.messages() if t.endswith("/birth")]
        msgs = [(t, b) for t, b in sim.messages() if not t.endswith("/birth")]
        _publish(broker, births + msgs, username="operator", password="s3cret", ca=pki.ca)

        def counted() -> int:
            with server.model.lock:
                return server.model.outcomes.get("stats", 0)

        deadline = time.monotonic() + 10
        while counted() < len(msgs) and time.monotonic() < deadline:
            time.sleep(0.05)  # the model has no event to wait on
        assert counted() == len(msgs) and server.stats.messages == len(msgs)
        _until(lambda: server.model.outcomes.get("birth") == len(births) == 1,
               "the birth, on the control link")
        assert server.control.messages >= 1  # the birth, and the broker's drop counter
        host, port = server.address
        with urllib.request.urlopen(f"http://{host}:{port}/api/ingest.json",  # noqa: S310
                                    timeout=10) as r:
            reader = json.loads(r.read())["stats_reader"]
        assert reader["messages"] == len(msgs) and reader["connections"] == 1
        assert reader["ingest_errors"] == 0 and "reads" not in reader
        with urllib.request.urlopen(f"http://{host}:{port}/metrics",  # noqa: S310
                                    timeout=10) as r:
            text = r.read().decode()
        assert "eva_serve_stats_connected 1.0" in text  # the stats link, for alerting
        assert f"eva_serve_stats_messages_total {float(len(msgs))}" in text
        assert "eva_serve_stats_connections_total 1.0" in text
        assert "eva_serve_stats_reads" not in text  # gmqtt has no read count
        log = broker.log()
        assert "eva-serve-r1-stats" in log and "eva-serve-r1 " in log  # both connected
    finally:
        server.stop()


def test_serve_command_with_refused_credentials_is_one_line_and_exit_1(
        mosquitto: BrokerFactory, tmp_path: Any) -> None:
    pytest.importorskip("prometheus_client", reason="the fleet extra (prometheus-client)")
    broker = mosquitto(users={"operator": "s3cret"})
    pw = tmp_path / "pw"
    pw.write_text("wrong\n")
    r = subprocess.run([sys.executable, "-m", "agent", "fleet", "serve", "--broker", broker.url,
                        "--listen", "127.0.0.1:0", "--history", "none", "--username",
                        "operator", "--password-file", str(pw)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(
        f"broker {broker.url} refused the connection: code 135 (Connection Refused: "
        "Not authorized)"), r.stderr
