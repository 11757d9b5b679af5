"""The lean stats reader of `fleet serve` (agent.fleet.mqttin).

The parser is pure and fed split buffers here (every split point, inside the remaining-length
varint, MQTT 5 properties); the reader runs against a real mosquitto (QoS 1 acknowledgements
seen from the broker's side, a broker restart, TLS with a password and with a client
certificate, refusals) and against a fake broker for what mosquitto never sends (a malformed
packet) and for the keepalive ping.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
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

from agent.errors import AgentError
from agent.fleet.mqttin import (
    Control,
    MalformedPacket,
    Publish,
    Subscriber,
    connect_packet,
    parse_packets,
    subscribe_packet,
)
from tests.mqtt_fixtures import Broker, BrokerFactory, Pki, free_port, mosquitto, pki

__all__ = ["mosquitto", "pki"]  # the fixtures
FAST = (0.05, 0.2)  # reconnect back-off in tests


# --- building packets as a broker would ------------------------------------------------------
def _varint(n: int) -> bytes:
    """The remaining-length encoding, written here independently of agent.fleet.mqttin (a test
    oracle that shares the code under test would agree with its bugs)."""
    out = bytearray()
    while True:
        b, n = n & 127, n >> 7
        out.append(b | (128 if n else 0))
        if not n:
            return bytes(out)


def publish(topic: str, payload: bytes, *, qos: int = 1, pid: int = 1, retain: bool = False,
            v5: bool = False, props: bytes = b"") -> bytes:
    t = topic.encode()
    body = struct.pack(">H", len(t)) + t + (struct.pack(">H", pid) if qos else b"")
    if v5:
        body += _varint(len(props)) + props
    body += payload
    return bytes([0x30 | qos << 1 | int(retain)]) + _varint(len(body)) + body


# MQTT 5 properties a broker may add: payload format (1), message expiry (4 bytes), a user
# property (two strings), a subscription identifier (varint): 129 bytes in all, so the
# properties length itself is a 2-byte varint.
PROPS = (b"\x01\x01" + b"\x02\x00\x00\x0e\x10" + b"\x26\x00\x03key\x00\x70" + b"v" * 112
         + b"\x0b\x81\x01")


def _stream(v5: bool) -> tuple[bytes, list[Publish | Control]]:
    """A SUBACK, PUBLISHes of 1-, 2- and 3-byte remaining lengths, QoS 0 and 1, retained,
    a PINGRESP: the bytes and what parse_packets must make of them."""
    big = bytes(range(256)) * 80  # 20,480 bytes: a 3-byte remaining length
    suback = b"\x00\x01" + (b"\x00" if v5 else b"") + b"\x01"
    parts = [(b"\x90" + _varint(len(suback)) + suback, Control(9, 0, suback))]
    for i, (payload, qos, retain) in enumerate([(b"{}", 1, False), (b"x" * 300, 0, True),
                                                (big, 1, False), (b"\xff" * 5, 1, True)]):
        topic = f"eva/dev-{i}/stats"
        parts.append((publish(topic, payload, qos=qos, pid=0x1234 + i, retain=retain, v5=v5,
                              props=PROPS if v5 else b""),
                      Publish(topic, payload, retain,
                              struct.pack(">H", 0x1234 + i) if qos else b"")))
    parts.append((b"\xd0\x00", Control(13, 0, b"")))
    return b"".join(b for b, _ in parts), [p for _, p in parts]


def _feed(chunks: list[bytes], v5: bool) -> list[Publish | Control]:
    """What the reader does with successive recv()s: parse, keep the incomplete rest."""
    out: list[Publish | Control] = []
    rest = b""
    for c in chunks:
        data = rest + c
        packets, used, err = parse_packets(data, v5)
        assert err is None
        out += packets
        rest = data[used:]
    assert rest == b""
    return out


@pytest.mark.parametrize("v5", [False, True], ids=["3.1.1", "5"])
def test_parser_gives_the_same_packets_however_the_stream_is_split(v5: bool) -> None:
    buf, expected = _stream(v5)
    assert _feed([buf], v5) == expected
    big_at = buf.index(b"eva/dev-2/stats") - 6  # fixed header of the 20 KB packet
    small = [k for k in range(len(buf)) if k < 700 or big_at - 4 <= k <= big_at + 200
             or k > len(buf) - 200]
    for k in small:  # every split point where the headers are, a few inside the payload
        assert _feed([buf[:k], buf[k:]], v5) == expected, k
    assert _feed([buf[i:i + 7] for i in range(0, len(buf), 7)], v5) == expected


def test_parser_waits_when_the_split_is_inside_the_remaining_length() -> None:
    pkt = publish("eva/d/stats", b"p" * 20_000)  # remaining length 0x8b 0x9c 0x01
    assert pkt[1] >= 128 and pkt[2] >= 128 and pkt[3] < 128
    for k in (1, 2, 3):
        assert parse_packets(b"\xd0\x00" + pkt[:k], False) == ([Control(13, 0, b"")], 2, None)
    packets, used, _ = parse_packets(pkt, False)
    assert used == len(pkt) and packets[0].payload == b"p" * 20_000


@pytest.mark.parametrize(("bad", "v5", "why"), [
    (b"\x30\xff\xff\xff\xff\x01", False, "longer than 4 bytes"),
    (publish("eva/d/stats", b"x", qos=2), False, "QoS 2"),
    (b"\x32\x03\x00\x09a", False, "longer than the packet"),
    (publish("", b"x", v5=True), True, "topic aliases"),
    (publish("eva/d/stats", b"", v5=True)[:-1] + b"\x05", True, "longer than the packet"),
    (b"\x30\x05\x00\x02\xff\xfex", False, "UTF-8"),
])
def test_parser_refuses_malformed_packets_after_handing_over_the_good_ones(
        bad: bytes, v5: bool, why: str) -> None:
    packets, used, err = parse_packets(b"\xd0\x00" + bad + b"\xd0\x00", v5)
    assert packets == [Control(13, 0, b"")] and used == 2  # the bad one starts at 2
    assert isinstance(err, MalformedPacket) and why in str(err)


# --- against mosquitto -----------------------------------------------------------------------
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


@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_acknowledged_messages_are_not_redelivered_to_a_persistent_session(
        mosquitto: BrokerFactory, readers: list[Subscriber], version: str) -> None:
    broker = mosquitto()
    sink = Collector()
    first = _reader(broker, sink, version=version, persistent=True, session_expiry_s=600)
    readers.append(first)
    first.start()
    _publish(broker, [("eva/d1/stats", b"a%d" % i) for i in range(300)])
    sink.wait(lambda m: len(m) >= 300)
    first.stop()  # acknowledged, then a clean DISCONNECT: the session stays
    _publish(broker, [("eva/d1/stats", b"b%d" % i) for i in range(50)])  # queued for us
    again = _reader(broker, sink, version=version, persistent=True, session_expiry_s=600)
    readers.append(again)
    again.start()
    _publish(broker, [("eva/d1/stats", b"end")])  # same topic: delivered after the queue
    sink.wait(lambda m: m[-1][1] == b"end")
    got = sink.payloads()
    assert got == [b"a%d" % i for i in range(300)] + [b"b%d" % i for i in range(50)] + [b"end"]
    assert again.messages == 51 and again.connections == 1


def test_a_message_ingested_but_not_acknowledged_is_redelivered(
        mosquitto: BrokerFactory, readers: list[Subscriber]) -> None:
    """The PUBACKs go out after the model has the chunk: a connection lost in between means
    the broker sends those messages again (at least once; the model counts duplicates)."""
    broker = mosquitto()
    sink = Collector()
    reader: Subscriber

    def ingest(topic: str, payload: bytes, retained: bool) -> str:
        if payload == b"m5" and payload not in sink.payloads():
            sock = reader._sock  # cut the connection before this chunk's acks go out
            assert sock is not None
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        return sink.ingest(topic, payload, retained)

    reader = Subscriber(ingest, host=broker.host, port=broker.port, tls=False,
                         topic_filter="eva/+/stats", client_id="eva-serve-unacked-stats",
                         persistent=True, session_expiry_s=600, backoff_s=FAST)
    readers.append(reader)
    reader.start()
    _publish(broker, [("eva/d1/stats", b"m%d" % i) for i in range(10)])
    sink.wait(lambda m: {p for _, p, _ in m} >= {b"m%d" % i for i in range(10)}
              and sum(p == b"m5" for _, p, _ in m) == 2)


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
    with caplog.at_level(logging.INFO, logger="edge-voice-agent.fleet"):
        broker.stop()
        _until(lambda: not reader.connected, "the reader to notice the broker is gone")
        broker.start()  # the session (our subscription) is saved and restored
        _publish(broker, [("eva/d1/stats", b"after%d" % i) for i in range(20)])
        sink.wait(lambda m: len(m) == 21)
        _until(lambda: reader.connections == 2, "the SUBACK of the reconnection")
        assert reader.connected
        reader.stop()  # inside the block: its last log lines are captured too
    assert sink.payloads() == [b"before"] + [b"after%d" % i for i in range(20)]
    lost = [r for r in caplog.records if "lost the broker" in r.getMessage()]
    assert len(lost) == 1 and lost[0].levelno == logging.WARNING
    assert broker.url in lost[0].getMessage()
    assert reader.connections == 2


def test_tls_with_a_password_and_refused_credentials(
        mosquitto: BrokerFactory, pki: Pki, readers: list[Subscriber]) -> None:
    broker = mosquitto(tls=pki, users={"operator": "s3cret"})
    sink = Collector()
    for version in ("5", "3.1.1"):  # mosquitto says 0x87 (v5) or 5 (3.1.1)
        bad = _reader(broker, sink, tls=True, ca_file=pki.ca, username="operator",
                      password="wrong", version=version)
        with pytest.raises(AgentError) as e:
            bad.start()
        assert str(e.value) == (f"broker mqtts://127.0.0.1:{broker.port} refused the "
                                "connection: Not authorized")
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
    assert reader._thread is not None and not reader._thread.is_alive()


def test_an_absent_broker_is_one_line() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(AgentError, match=rf"^cannot connect to broker mqtt://127\.0\.0\.1:{port}"
                       r": Connection refused$"):
        Subscriber(Collector().ingest, host="127.0.0.1", port=port, tls=False,
                    topic_filter="eva/+/stats", client_id="x").start()


# --- against a fake broker: what mosquitto never sends ---------------------------------------
class FakeBroker:
    """Accepts connections, answers CONNECT and SUBSCRIBE, then sends what the test says."""

    def __init__(self, after_suback: bytes, suback: bytes = b"\x90\x03\x00\x01\x01") -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.after_suback, self.suback = after_suback, suback
        self.connections = 0
        self.received: list[bytes] = []
        self.pinged = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(10)
                try:
                    conn.recv(65536)                         # CONNECT
                    conn.sendall(b"\x20\x02\x00\x00")        # CONNACK (3.1.1), accepted
                    conn.recv(65536)                         # SUBSCRIBE (packet id 1)
                    conn.sendall(self.suback)                # SUBACK (QoS 1 granted)
                    conn.sendall(self.after_suback)
                    while data := conn.recv(65536):
                        self.received.append(data)
                        if b"\xc0\x00" in data:
                            self.pinged.set()
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()


def test_a_malformed_packet_is_logged_and_the_reader_reconnects(
        caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeBroker(publish("eva/d/stats", b"ok", qos=0) + b"\x30\xff\xff\xff\xff\x01")
    sink = Collector()
    r = Subscriber(sink.ingest, host="127.0.0.1", port=fake.port, tls=False,
                    topic_filter="eva/+/stats", client_id="x", version="3.1.1",
                    backoff_s=FAST)
    try:
        with caplog.at_level(logging.WARNING, logger="edge-voice-agent.fleet"):
            r.start()
            sink.wait(lambda m: len(m) >= 3)  # one good message per connection
            _until(lambda: r.connections >= 3, "three subscriptions")
            assert r._thread is not None and r._thread.is_alive()
            r.stop()
        warnings = [x.getMessage() for x in caplog.records if "lost the broker" in x.getMessage()]
        assert warnings and "remaining length longer than 4 bytes" in warnings[0]
    finally:
        r.stop()
        fake.close()


def test_a_refused_subscription_is_one_line() -> None:
    """(mosquitto grants every subscription and filters by ACL on delivery, so a fake broker
    says no here; brokers that refuse $share from 3.1.1 clients do so at SUBACK.)"""
    fake = FakeBroker(b"", suback=b"\x90\x03\x00\x01\x80")
    r = Subscriber(Collector().ingest, host="127.0.0.1", port=fake.port, tls=False,
                    topic_filter="$share/g/eva/+/stats", client_id="x", version="3.1.1")
    try:
        with pytest.raises(AgentError) as e:
            r.start()
        assert str(e.value) == (
            f"broker mqtt://127.0.0.1:{fake.port} refused the subscription to "
            "$share/g/eva/+/stats (ACL? shared subscriptions need MQTT 5 or a broker that "
            "accepts $share): Unspecified error")
    finally:
        r.stop()
        fake.close()


def test_pings_within_the_keepalive_when_idle() -> None:
    fake = FakeBroker(b"")
    r = Subscriber(Collector().ingest, host="127.0.0.1", port=fake.port, tls=False,
                    topic_filter="eva/+/stats", client_id="x", version="3.1.1", keepalive_s=1)
    try:
        t0 = time.monotonic()
        r.start()
        assert fake.pinged.wait(5)
        assert time.monotonic() - t0 < 2  # at half the keepalive, with a 0.25 s tick
    finally:
        r.stop()
        fake.close()


def test_connect_and_subscribe_packets_carry_the_session_and_credentials() -> None:
    v5 = connect_packet("eva-serve-r1-stats", v5=True, clean=False, session_expiry_s=3600,
                        keepalive_s=30, username="op", password="pw")
    assert v5[0] == 0x10 and v5[2:9] == b"\x00\x04MQTT\x05"
    assert v5[9] == 0x80 | 0x40  # username, password; clean start 0
    # session expiry 3600 s, then Maximum Packet Size 65536 (the broker's max_packet_size)
    assert v5[12:23] == b"\x0a\x11\x00\x00\x0e\x10\x27\x00\x01\x00\x00"
    v3 = connect_packet("c", v5=False, clean=True)
    assert v3 == b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x1e\x00\x01c"
    assert subscribe_packet("a/+", v5=False) == b"\x82\x08\x00\x01\x00\x03a/+\x01"
    assert subscribe_packet("a/+", v5=True) == b"\x82\x09\x00\x01\x00\x00\x03a/+\x01"
    assert subscribe_packet("a/+", v5=False, extra=[("b", 1), ("$SYS/x", 0)]) == \
        b"\x82\x15\x00\x01\x00\x03a/+\x01\x00\x01b\x01\x00\x06$SYS/x\x00"


def test_a_refused_sys_filter_is_tolerated_any_other_refusal_is_one_line() -> None:
    """The control connection subscribes to several filters in one packet: an ACL that keeps
    the operator out of $SYS costs only the broker's drop counter; refusing alarms is an error
    that names the filter."""
    filters = [("eva/+/status", 1), ("$SYS/broker/publish/messages/dropped", 0)]
    fake = FakeBroker(b"", suback=b"\x90\x05\x00\x01\x01\x01\x80")  # $SYS refused
    r = Subscriber(Collector().ingest, host="127.0.0.1", port=fake.port, tls=False,
                   topic_filter="eva/+/alarm", extra_filters=filters, client_id="x",
                   version="3.1.1")
    try:
        r.start()
        assert r.connected
    finally:
        r.stop()
        fake.close()
    fake = FakeBroker(b"", suback=b"\x90\x05\x00\x01\x01\x80\x00")  # status refused
    r = Subscriber(Collector().ingest, host="127.0.0.1", port=fake.port, tls=False,
                   topic_filter="eva/+/alarm", extra_filters=filters, client_id="x",
                   version="3.1.1")
    try:
        with pytest.raises(AgentError) as e:
            r.start()
        assert str(e.value) == (f"broker mqtt://127.0.0.1:{fake.port} refused the subscription "
                                "to eva/+/status (ACL?): Unspecified error")
    finally:
        r.stop()
        fake.close()


def test_serve_reads_stats_over_tls_with_a_password_on_its_own_session(
        mosquitto: BrokerFactory, pki: Pki, tmp_path: Any) -> None:
    """`fleet serve` wiring: both lean connections get the server's credentials, TLS and
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
        assert reader["ingest_errors"] == 0 and reader["reads"] >= 1
        with urllib.request.urlopen(f"http://{host}:{port}/metrics",  # noqa: S310
                                    timeout=10) as r:
            text = r.read().decode()
        assert "eva_serve_stats_connected 1.0" in text  # the stats link, for alerting
        assert f"eva_serve_stats_messages_total {float(len(msgs))}" in text
        assert "eva_serve_stats_connections_total 1.0" in text
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
        f"broker {broker.url} refused the connection: Not authorized"), r.stderr
