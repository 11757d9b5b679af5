"""The lean MQTT subscriber that carries `fleet serve`'s input: the stats stream (the bulk)
and, on a second connection, the control plane.

Why hand-written rather than paho: issue 12 asks for ≥ 5,000 stats messages (4.8 KB each) a
second per replica on one core, a budget of 200 µs CPU per message for everything (decode,
merge, history). paho-mqtt 2.2 alone cost 120 µs CPU per message with MQTT 5 and 76 µs with
3.1.1 here, even reading 256 KB per recv() (its per-packet Python machinery: several reads,
property objects, MQTTMessage, callbacks, one PUBACK send per message). This reader does one
recv() of up to 256 KB, parses every complete PUBLISH in it with a pure function
(`parse_packets`), hands each to the model and sends all the chunk's PUBACKs in ONE sendall,
after the model has the messages (at-least-once: a crash before the ack means a redelivery,
which the model counts as a duplicate). benchmarks/bench_mqttin.py measures both; measured again
against gmqtt and a tuned paho (docs/fleet.md, "A well-kept MQTT library instead"), it stays:
gmqtt costs ~1.5 times its CPU per message in `fleet serve` and reads without a bound.
tests/test_fleet_mqttin_fuzz.py fuzzes the parser.

What it implements: CONNECT (MQTT 5 and 3.1.1; clean start, or a persistent session with a
session expiry; username/password; TLS with a CA file or the system trust store and an optional
client certificate), one SUBSCRIBE packet (a filter at QoS 1, more at QoS 0/1; a refused $SYS
filter is tolerated, any other refusal is an error), receiving PUBLISH at QoS 0/1 (MQTT 5 properties
skipped), PUBACK (the 2-byte form, valid in both versions), PINGREQ within the keepalive,
PINGRESP, SUBACK, a broker's DISCONNECT (MQTT 5), and reconnecting with a bounded back-off.

What it deliberately does not: QoS 2 receive (we subscribe at QoS 1, so a broker never sends
QoS 2; one that does is treated as a protocol error), topic aliases (we never send Topic Alias
Maximum, so the broker may not use them), AUTH (enhanced authentication), a will, publishing,
unsubscribing. `fleet watch` (a terminal tool, not the throughput path) stays on paho.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from agent.errors import AgentError

log = logging.getLogger("edge-voice-agent.fleet")

CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 2, 3, 4, 8, 9
PINGREQ_PACKET, PINGRESP, DISCONNECT = b"\xc0\x00", 13, 14
DISCONNECT_PACKET = b"\xe0\x00"  # normal disconnection (MQTT 5 allows omitting reason code 0)
CHUNK = 262144                    # bytes per recv(): ~50 stats messages
# The broker's max_packet_size (docs/mosquitto/mosquitto.conf): what a device can send at most.
# Sent as MQTT 5's Maximum Packet Size so the broker never forwards a larger one, and checked
# here (3.1.1, or a broker configured otherwise): a larger packet is a protocol error, never a
# buffer that grows to hold it (one 260 MB packet cost 800 MiB).
MAX_PACKET = 65536
SHARE_HINT = "ACL? shared subscriptions need MQTT 5 or a broker that accepts $share"


class MalformedPacket(ValueError):
    """The broker sent bytes that are not an MQTT packet we accept (we reconnect)."""


class Publish(NamedTuple):
    """One received PUBLISH. `packet_id` is the two bytes as received (b"" for QoS 0): the
    PUBACK echoes them."""

    topic: str
    payload: bytes
    retained: bool
    packet_id: bytes


class Control(NamedTuple):
    """Any other packet: its type (the fixed header's upper nibble), flags and body."""

    kind: int
    flags: int
    body: bytes


# --- the pure protocol part ------------------------------------------------------------------
def _varint(buf: bytes, i: int, end: int) -> tuple[int, int]:
    """(value, next offset) of a variable byte integer inside a complete packet."""
    value, shift = 0, 0
    while True:
        if i >= end:
            raise MalformedPacket("variable byte integer runs past the packet")
        b = buf[i]
        i += 1
        value |= (b & 127) << shift
        if b < 128:
            return value, i
        shift += 7
        if shift > 21:
            raise MalformedPacket("variable byte integer longer than 4 bytes")


def parse_packets(buf: bytes, v5: bool, start: int = 0, max_packet: int = MAX_PACKET
                  ) -> tuple[list[Publish | Control], int, MalformedPacket | None]:
    """Every complete packet in `buf[start:]`, in order; the offset of the first byte that is
    not part of one (an incomplete packet waits for the next recv()); and, when the bytes
    there cannot be MQTT from a broker we subscribed at QoS 1, why (the packets before it are
    still good: the caller hands them on, then drops the connection). Pure."""
    out: list[Publish | Control] = []
    n = len(buf)
    pos = start
    try:
        while pos + 2 <= n:
            b0 = buf[pos]
            b = buf[pos + 1]
            if b < 128:  # the usual case for control packets; stats need 2-3 bytes
                length, i = b, pos + 2
            else:
                length, shift, i = b & 127, 7, pos + 2
                while True:
                    if i >= n:
                        return out, pos, None  # split inside the remaining length
                    b = buf[i]
                    i += 1
                    length |= (b & 127) << shift
                    if b < 128:
                        break
                    shift += 7
                    if shift > 21:
                        raise MalformedPacket("remaining length longer than 4 bytes")
            end = i + length
            if end - pos > max_packet:
                raise MalformedPacket(f"a packet of {end - pos} bytes exceeds the maximum "
                                      f"packet size {max_packet}")
            if end > n:
                break
            if b0 >> 4 == PUBLISH:
                qos = (b0 >> 1) & 3
                if i + 2 > end:
                    raise MalformedPacket("PUBLISH shorter than its topic length")
                j = i + 2 + ((buf[i] << 8) | buf[i + 1])
                if j > end or j == i + 2:
                    raise MalformedPacket("PUBLISH topic empty (topic aliases are not enabled) or "
                                          "longer than the packet")
                try:
                    topic = buf[i + 2:j].decode()
                except UnicodeDecodeError:
                    raise MalformedPacket("PUBLISH topic is not UTF-8") from None
                if qos == 1:
                    pid = buf[j:j + 2]
                    j += 2
                elif qos == 0:
                    pid = b""
                else:
                    raise MalformedPacket(f"PUBLISH with QoS {qos} (we subscribed at QoS 1)")
                if v5:
                    if j >= end:
                        raise MalformedPacket("PUBLISH without its properties length")
                    p = buf[j]
                    if p < 128:
                        j += 1 + p
                    else:
                        p, j = _varint(buf, j, end)
                        j += p
                if j > end:
                    raise MalformedPacket("PUBLISH header longer than the packet")
                out.append(Publish(topic, buf[j:end], bool(b0 & 1), pid))
            else:
                out.append(Control(b0 >> 4, b0 & 15, buf[i:end]))
            pos = end
    except MalformedPacket as err:  # `pos` is where the bad packet starts
        return out, pos, err
    return out, pos, None


def packet_end(buf: bytes, pos: int) -> int:
    """Where the packet starting at `pos` ends, if its fixed header is in `buf`; else a
    lower bound (one byte more than there is)."""
    n, i, length, shift = len(buf), pos + 1, 0, 0
    while i < n and shift <= 21:
        b = buf[i]
        i += 1
        length |= (b & 127) << shift
        if b < 128:
            return i + length
        shift += 7
    return n + 1


def _remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 127, n >> 7
        out.append(b | (128 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    if len(b) > 65535:
        raise ValueError("MQTT string longer than 65535 bytes")
    return struct.pack(">H", len(b)) + b


def connect_packet(client_id: str, *, v5: bool, clean: bool, session_expiry_s: int = 0,
                   keepalive_s: int = 30, username: str = "",
                   password: str | None = None) -> bytes:
    """CONNECT. A persistent session is clean=False (3.1.1 clean session 0; MQTT 5 clean
    start 0 plus a Session Expiry Interval, without which a v5 session ends with the
    connection)."""
    flags = (0x02 if clean else 0) | (0x80 if username else 0) \
        | (0x40 if username and password is not None else 0)
    head = _str("MQTT") + bytes([5 if v5 else 4, flags]) + struct.pack(">H", keepalive_s)
    if v5:
        props = b"\x11" + struct.pack(">I", session_expiry_s) if session_expiry_s > 0 else b""
        props += b"\x27" + struct.pack(">I", MAX_PACKET)  # Maximum Packet Size
        head += _remaining(len(props)) + props
    body = head + _str(client_id)
    if username:
        body += _str(username)
        if password is not None:
            body += _str(password)
    return b"\x10" + _remaining(len(body)) + body


def subscribe_packet(topic_filter: str, *, v5: bool, packet_id: int = 1,
                     extra: Sequence[tuple[str, int]] = ()) -> bytes:
    """SUBSCRIBE to `topic_filter` at QoS 1, then to the `extra` (filter, QoS) pairs, in one
    packet (MQTT 5 options: no-local 0, as $share requires; retained messages sent)."""
    body = struct.pack(">H", packet_id) + (b"\x00" if v5 else b"") + _str(topic_filter) + b"\x01"
    for f, qos in extra:
        body += _str(f) + bytes([qos])
    return b"\x82" + _remaining(len(body)) + body


def connack_result(body: bytes, v5: bool) -> int:
    """The CONNACK's return/reason code (0 = accepted)."""
    if len(body) < 2:
        raise MalformedPacket("CONNACK shorter than 2 bytes")
    return body[1]


def suback_codes(body: bytes, v5: bool) -> list[int]:
    """The SUBACK's return/reason codes (≥ 0x80 = refused)."""
    if len(body) < 3:
        raise MalformedPacket("SUBACK shorter than 3 bytes")
    i = 2
    if v5:
        p, i = _varint(body, i, len(body))
        i += p
    return list(body[i:])


def reason_name(packet: str, code: int, v5: bool) -> str:
    """paho's words for a refusal, so `fleet serve` says what `fleet watch` says."""
    try:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.reasoncodes import ReasonCode

        if packet == "CONNACK" and not v5:
            return str(mqtt.convert_connack_rc_to_reason_code(code))
        return str(ReasonCode(getattr(PacketTypes, packet), identifier=code))
    except Exception:  # an unknown code, or paho's names moved
        return f"reason code 0x{code:02x}"


# --- the network edge ------------------------------------------------------------------------
def client_tls(ca_file: Path | None, cert_file: Path | None,
               key_file: Path | None) -> ssl.SSLContext:
    """The TLS context of an operator-side connection: verifies the chain and the host name
    (against `ca_file`, or the system trust store), with an optional client certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_file:
        ctx.load_verify_locations(cafile=str(ca_file))
    else:
        ctx.load_default_certs()
    if cert_file:
        ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return ctx


class _Lost(Exception):
    """The connection ended; str() says why (one log line)."""


class _Refused(Exception):
    """CONNACK or SUBACK refused us; str() is the one-line reason."""


SEND_TIMEOUT_S = 10.0


def _send(sock: socket.socket, data: bytes) -> None:
    """sendall with a 10 s bound also under TLS, where the socket's Python timeout is the
    short receive tick (see Subscriber._session)."""
    if isinstance(sock, ssl.SSLSocket):
        tick = sock.gettimeout()
        sock.settimeout(SEND_TIMEOUT_S)
        try:
            sock.sendall(data)
        finally:
            sock.settimeout(tick)
    else:
        sock.sendall(data)


class Subscriber:
    """One MQTT connection, its subscriptions (`topic_filter` at QoS 1 plus `extra_filters`),
    `ingest(topic, payload, retained)` for every message from one thread. `start()` connects
    (bounded) and raises AgentError with one line if it cannot; afterwards the thread survives
    anything: a lost broker is one warning line and a reconnect with back-off; the broker's
    queue for a persistent session arrives after the reconnect."""

    def __init__(self, ingest: Callable[[str, bytes, bool], Any], *, host: str, port: int,
                 tls: bool, topic_filter: str, client_id: str, version: str = "5",
                 extra_filters: Sequence[tuple[str, int]] = (),
                 persistent: bool = False, session_expiry_s: float = 0.0, username: str = "",
                 password: str | None = None, ca_file: Path | None = None,
                 cert_file: Path | None = None, key_file: Path | None = None,
                 keepalive_s: int = 30, backoff_s: tuple[float, float] = (1.0, 30.0)) -> None:
        self.ingest = ingest
        self.host, self.port, self.tls = host, port, tls
        self.url = f"{'mqtts' if tls else 'mqtt'}://{host}:{port}"
        self.topic_filter = topic_filter
        self.extra_filters = tuple(extra_filters)  # $SYS ones may be refused (ACL): tolerated
        self.client_id = client_id
        self.v5 = version == "5"
        self.keepalive_s = keepalive_s
        self.backoff_s = backoff_s
        self._connect = connect_packet(
            client_id, v5=self.v5, clean=not persistent,
            session_expiry_s=int(session_expiry_s) if persistent else 0,
            keepalive_s=keepalive_s, username=username, password=password)
        self._subscribe = subscribe_packet(topic_filter, v5=self.v5, extra=self.extra_filters)
        self._ssl = client_tls(ca_file, cert_file, key_file) if tls else None
        self._stop = threading.Event()
        self._ready = threading.Event()      # subscribed, or refused/failed at start
        self._failed: str | None = None      # why start() fails
        self._live = False                   # this connection got its SUBACK
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.messages = 0                    # PUBLISHes handed to ingest
        self.reads = 0                       # recv() calls that returned data
        self.connections = 0                 # successful subscriptions (1 + reconnects)
        self.ingest_errors = 0

    # --- lifecycle ------------------------------------------------------------------------
    def start(self, timeout_s: float = 10.0) -> None:
        try:
            sock = self._open(timeout_s)
        except OSError as e:
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise AgentError(f"cannot connect to broker {self.url}: {reason}") from None
        self._thread = threading.Thread(target=self._run, args=(sock,), daemon=True,
                                        name="mqttin")
        self._thread.start()
        if not self._ready.wait(timeout_s) or self._failed is not None:
            why = self._failed or (f"did not complete the connection within {timeout_s:g} s")
            self.stop()
            raise AgentError(f"broker {self.url} {why}")
        log.info("subscribed to %s on %s (lean reader)", ", ".join(
            [self.topic_filter, *(f for f, _ in self.extra_filters if not f.startswith("$"))]),
            self.url)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Disconnect politely (the thread sends DISCONNECT) and join, bounded."""
        self._stop.set()
        sock = self._sock
        if sock is not None:
            try:  # wakes the blocked recv (also under TLS: the SSL object stays usable)
                socket.socket.shutdown(sock, socket.SHUT_RD)
            except OSError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    # --- the thread -----------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """Subscribed on a live connection (False while it reconnects)."""
        return self._live and self._sock is not None

    def _open(self, timeout_s: float) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_hostname=self.host)
            sock.sendall(self._connect)
        except BaseException:
            sock.close()
            raise
        return sock

    def _run(self, sock: socket.socket | None) -> None:
        delay = self.backoff_s[0]
        while not self._stop.is_set():
            if sock is None:
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, self.backoff_s[1])
                try:
                    sock = self._open(10.0)
                except OSError as e:
                    log.debug("reconnect to %s failed: %s", self.url, e)
                    continue
            self._sock = sock
            self._live = False
            refused = False
            try:
                self._session(sock)
                reason = ""
            except _Refused as e:
                reason, refused = str(e), True
            except (_Lost, OSError, MalformedPacket) as e:
                reason = str(e) or type(e).__name__
            except Exception as e:  # never out of this thread: log, reconnect
                log.exception("lean MQTT reader for %s failed; reconnecting", self.url)
                reason = f"{type(e).__name__}: {e}"
            finally:
                self._sock = None
                sock.close()
            sock = None
            if self._stop.is_set():
                break
            if not self._ready.is_set():  # before the first SUBACK: start() reports it
                self._failed = reason if refused else \
                    f"closed the connection before subscribing ({reason})"
                self._ready.set()
                return
            if refused:
                log.error("broker %s %s; retrying in %g s", self.url, reason, delay)
                continue
            if self._live:  # we were subscribed: a real loss, so start the back-off afresh
                delay = self.backoff_s[0]
                log.warning("lost the broker %s (%s); reconnecting", self.url, reason)

    def _session(self, sock: socket.socket) -> None:
        """One connection, CONNECT already sent: returns on stop, raises otherwise."""
        v5, ka = self.v5, self.keepalive_s
        # Blocking with a kernel receive timeout rather than Python's timeout: the latter
        # poll()s before every recv(), one more system call per read.
        tick = min(1.0, ka / 4)
        if isinstance(sock, ssl.SSLSocket):
            # Under TLS the kernel timeout never surfaces: the SSL read takes the EAGAIN as
            # "want read" and blocks again, so an idle connection sent no keepalive and the
            # broker dropped it after 1.5 keepalives. Python's own timeout does end that read.
            sock.settimeout(tick)
        else:
            sock.settimeout(None)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                            struct.pack("ll", int(tick), int(tick % 1 * 1e6)))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 10, 0))
        # One buffer for the connection: recv_into() it (a fresh 256 KB bytes object per
        # recv() costs more than the copy below), an incomplete packet kept at its front.
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        have = 0
        need = 0  # bytes the incomplete packet at the front needs: no parse (copy) before
        now = last_sent = last_recv = time.monotonic()
        ping_sent = 0.0
        ingest = self.ingest
        while True:
            if self._stop.is_set():
                try:
                    _send(sock, DISCONNECT_PACKET)
                except OSError:
                    pass
                return
            try:
                got = sock.recv_into(view[have:])
            except (BlockingIOError, ssl.SSLWantReadError, TimeoutError):
                got = -1  # the receive timeout: time for the keepalive
            now = time.monotonic()
            if got >= 0:
                if not got:
                    if self._stop.is_set():
                        continue  # our own shutdown: say goodbye above
                    raise _Lost("connection closed by the broker")
                last_recv = now
                self.reads += 1
                if have + got < need:  # a trickle into one packet: wait, do not copy again
                    have += got
                else:
                    data = bytes(view[:have + got])
                    packets, used, malformed = parse_packets(data, v5)
                    have = len(data) - used
                    need = packet_end(data, used) - used if have else 0
                    if have:
                        if have == len(buf):  # one packet bigger than the buffer: grow it
                            view.release()
                            buf.extend(bytes(len(buf)))
                            view = memoryview(buf)
                        elif used:
                            view[:have] = data[used:]
                    acks = []
                    n = 0
                    try:
                        for p in packets:
                            if type(p) is Publish:
                                n += 1
                                try:
                                    ingest(p.topic, p.payload, p.retained)
                                except Exception:  # one bad message must not stop the stream
                                    self._ingest_failed(p.topic)
                                if p.packet_id:
                                    acks.append(b"\x40\x02" + p.packet_id)
                            else:
                                self._control(sock, p)
                    finally:  # also those before a control packet that ends the session
                        self.messages += n
                    if acks:
                        _send(sock, b"".join(acks))
                        last_sent = now
                    if malformed is not None:
                        raise malformed
            if ping_sent and now - max(ping_sent, last_recv) > ka:
                raise _Lost(f"no answer to a keepalive ping within {ka} s")
            if now - last_sent >= ka / 2:
                _send(sock, PINGREQ_PACKET)
                last_sent = ping_sent = now

    def _ingest_failed(self, topic: str) -> None:
        """A bug in the model, not the broker's fault: the message is acknowledged (a
        redelivery would fail the same way); the first failure with its traceback, then
        every 1000th as one line."""
        self.ingest_errors += 1
        if self.ingest_errors == 1:
            log.exception("ingesting a message on %s failed (acknowledged, not retried)", topic)
        elif self.ingest_errors % 1000 == 0:
            log.error("%d messages failed to ingest so far (latest on %s)",
                      self.ingest_errors, topic)

    def _control(self, sock: socket.socket, p: Control) -> None:
        if p.kind == CONNACK:
            code = connack_result(p.body, self.v5)
            if code:
                raise _Refused("refused the connection: "
                               + reason_name("CONNACK", code, self.v5))
            _send(sock, self._subscribe)
        elif p.kind == SUBACK:
            filters = [self.topic_filter, *(f for f, _ in self.extra_filters)]
            refused = [(f, c) for f, c in zip(filters, suback_codes(p.body, self.v5),
                                               strict=False)
                       if c >= 0x80 and not f.startswith("$SYS")]  # $SYS: an ACL may say no
            if refused:
                f, c = refused[0]
                hint = f" ({SHARE_HINT})" if f.startswith("$share") else " (ACL?)"
                raise _Refused(f"refused the subscription to {f}{hint}: "
                               + reason_name("SUBACK", c, self.v5))
            self.connections += 1
            self._live = True
            if self.connections > 1:
                log.info("resubscribed to %s on %s", self.topic_filter, self.url)
            self._ready.set()
        elif p.kind == PINGRESP:
            pass
        elif p.kind == DISCONNECT and self.v5:
            code = p.body[0] if p.body else 0
            raise _Lost("the broker disconnected us: " + reason_name("DISCONNECT", code, True))
        else:
            raise MalformedPacket(f"unexpected packet type {p.kind} from the broker")
