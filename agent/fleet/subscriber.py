"""The MQTT subscriber that carries `fleet serve`'s input (the stats stream and, on a second
connection, the control plane), on gmqtt, a well-kept MQTT 5 library (issue 21: it replaced a
hand-written reader; docs/fleet.md, "A well-kept MQTT library instead of the lean reader?").

gmqtt runs asyncio: each `Subscriber` owns one event loop in one thread, and hands every message
to `ingest(topic, payload, retained)` on that thread, in the order the broker sent them (what
the hand-written reader did). What this module adds to gmqtt, through its public API only:

- a bound on what it reads: MQTT 5 only, with the CONNECT property Maximum Packet Size
  (MAX_PACKET, the broker's own `max_packet_size`), so the broker never sends a larger packet
  (issue 20, row 8). gmqtt grows its receive buffer without a limit, so MQTT 3.1.1, which has
  no such property, is refused (`--mqtt-version 3.1.1` is a one-line error), and so is gmqtt's
  silent fall-back to 3.1.1 when a broker refuses MQTT 5;
- reconnecting with back-off (1 s doubling to 30 s: gmqtt's own reconnect, its public
  `reconnect_delay` raised while the broker stays away), one log line per loss and one per
  recovery; gmqtt's own log below ERROR (a lost connection with a traceback) is dropped;
- the link's counters for `eva_serve_stats_*`: messages, connections, ingest errors (gmqtt
  exposes no socket read count, so `eva_serve_stats_reads` went).

Acknowledgement: gmqtt acknowledges a QoS 1 message just before handing it over in the same
synchronous step ("optimistic acknowledgement"); the model is in memory and lost with the
process anyway, and a message the model raises on is acknowledged and counted, as before.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent.errors import AgentError, ConfigError

log = logging.getLogger("edge-voice-agent.fleet")
# What gmqtt logs, through the logger we give it: only ERROR and above pass (see _GmqttLog).
GMQTT_LOG = logging.getLogger("edge-voice-agent.fleet.gmqtt")

# The broker's max_packet_size (docs/mosquitto/mosquitto.conf): what a device can send at most.
# Sent as MQTT 5's Maximum Packet Size, so the broker never forwards a larger packet (one
# 260 MB packet cost 800 MiB when nothing bounded the read).
MAX_PACKET = 65536
SHARE_HINT = "ACL? shared subscriptions need MQTT 5 or a broker that accepts $share"
MQTT5_ONLY = ("fleet serve speaks MQTT 5 only: its MQTT library (gmqtt) bounds what it reads "
              "only through MQTT 5's Maximum Packet Size (use --mqtt-version 5 and a broker "
              "with MQTT 5, e.g. mosquitto >= 1.6 or EMQX)")
NO_MQTT5 = ("refused MQTT 5 (a 3.1.1-only broker?); " + MQTT5_ONLY.split(": ", 1)[1]
            .replace("use --mqtt-version 5 and ", "upgrade to "))


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


def reason_name(packet: str, code: int) -> str:
    """paho's words for an MQTT 5 refusal, so `fleet serve` says what `fleet watch` says."""
    try:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.reasoncodes import ReasonCode

        return str(ReasonCode(getattr(PacketTypes, packet), identifier=code))
    except Exception:  # an unknown code, or paho's names moved
        return f"reason code 0x{code:02x}"


def quiet_gmqtt() -> None:
    """gmqtt's module loggers log a lost connection as a warning with a traceback: keep only
    its errors (our own lines say what happened)."""
    logging.getLogger("gmqtt").setLevel(logging.ERROR)


class _GmqttLog(logging.Filter):
    """On the logger gmqtt's client is given: lets ERROR and above through once the link has
    started (a refused reconnection: gmqtt gives up on a permanent refusal), and turns gmqtt's
    (info-level) note that it falls back to MQTT 3.1.1 into a refusal: without MQTT 5 nothing
    bounds the packet size. gmqtt has no callback or flag for the fall-back, so its log record
    (through the public `logger` parameter) is the signal: the range of gmqtt in pyproject.toml
    is the one tested, and tests/test_fleet_subscriber.py fails if the note ever changes."""

    def filter(self, record: logging.LogRecord) -> bool:
        link = SUBSCRIBERS.get(threading.get_ident())
        if link is not None and "Downgrading to MQTT 3.1" in str(record.msg):
            link.refuse_downgrade()
        # until start() returns, its AgentError is the one line for a refusal
        started = link is None or link.connections > 0
        return started and record.levelno >= logging.ERROR


SUBSCRIBERS: dict[int, Subscriber] = {}  # loop thread id -> its link (for _GmqttLog)
GMQTT_LOG.addFilter(_GmqttLog())
GMQTT_LOG.setLevel(logging.INFO)  # the filter sees the fall-back note, then drops it


class Subscriber:
    """One MQTT 5 connection, its subscriptions (`topic_filter` at QoS 1 plus `extra_filters`),
    `ingest(topic, payload, retained)` for every message from one thread. `start()` connects
    (bounded) and raises AgentError with one line if it cannot; afterwards the link survives
    anything: a lost broker is one warning line and a reconnect with back-off; the broker's
    queue for a persistent session arrives after the reconnect."""

    def __init__(self, ingest: Callable[[str, bytes, bool], Any], *, host: str, port: int,
                 tls: bool, topic_filter: str, client_id: str, version: str = "5",
                 extra_filters: Sequence[tuple[str, int]] = (),
                 persistent: bool = False, session_expiry_s: float = 0.0, username: str = "",
                 password: str | None = None, ca_file: Path | None = None,
                 cert_file: Path | None = None, key_file: Path | None = None,
                 keepalive_s: int = 30, backoff_s: tuple[float, float] = (1.0, 30.0)) -> None:
        if version != "5":
            raise ConfigError(f"--mqtt-version {version}: {MQTT5_ONLY}")
        self.ingest = ingest
        self.host, self.port, self.tls = host, port, tls
        self.url = f"{'mqtts' if tls else 'mqtt'}://{host}:{port}"
        self.topic_filter = topic_filter
        self.extra_filters = tuple(extra_filters)  # $SYS ones may be refused (ACL)
        self.filters = [(topic_filter, 1), *self.extra_filters]
        self.client_id = client_id
        self.persistent = persistent
        self.session_expiry_s = int(session_expiry_s) if persistent else 0
        self.username, self.password = username, password
        self.keepalive_s = keepalive_s
        self.backoff_s = backoff_s
        self.ssl = client_tls(ca_file, cert_file, key_file) if tls else None
        self.loop = asyncio.new_event_loop()  # run by `thread` from start() on
        self.thread = threading.Thread(target=self._run_loop, daemon=True,
                                       name=f"mqtt-{client_id}")
        self.client: Any = None
        self.subs: list[Any] = []             # gmqtt Subscriptions, made on the first connect
        self.pending: dict[int, list[str]] = {}  # SUBSCRIBE packet id -> its filters
        self.ready = threading.Event()        # subscribed, or refused/failed at start
        self.failed: str | None = None        # why start() fails, or why the link gave up
        self.live = False                     # this connection got all its SUBACKs
        self.lost_at: float | None = None     # monotonic time the live connection was lost
        self.stopping = False
        self.messages = 0                     # messages handed to ingest
        self.connections = 0                  # successful subscriptions (1 + reconnects)
        self.ingest_errors = 0

    # --- lifecycle (any thread) -------------------------------------------------------------
    def start(self, timeout_s: float = 10.0) -> None:
        quiet_gmqtt()
        self.thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._connect(), self.loop)
        fut.add_done_callback(lambda f: self.ready.set()
                              if f.cancelled() or f.exception() is not None else None)
        if not self.ready.wait(timeout_s):
            self._fail(f"did not complete the connection within {timeout_s:g} s")
        if self.failed is not None:
            self._fail(self.failed)
        e = fut.exception() if fut.done() and not fut.cancelled() else None
        if isinstance(e, OSError):
            self.stop()
            reason = (os.strerror(e.errno) if e.errno and not isinstance(e, ssl.SSLError)
                      else str(e) or type(e).__name__)  # asyncio's strerror names the address
            raise AgentError(f"cannot connect to broker {self.url}: {reason}") from None
        if e is not None:  # gmqtt's MQTTConnectError: "code 135 (Connection Refused: ...)"
            self._fail(f"refused the connection: {e}")
        log.info("subscribed to %s on %s", ", ".join(
            f for f, _ in self.filters if not f.startswith("$SYS")), self.url)

    def _fail(self, why: str) -> None:
        self.stop()
        raise AgentError(f"broker {self.url} {why}")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Disconnect politely and end the loop thread, bounded."""
        if not self.thread.is_alive():
            if self.thread.ident is None and not self.loop.is_closed():
                self.loop.close()  # never started
            return
        self.stopping = True
        if self.client is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._disconnect(), self.loop).result(timeout_s)
            except Exception:  # noqa: BLE001 - stopping anyway (a broker already gone)
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        if self.thread is not threading.current_thread():
            self.thread.join(timeout_s)

    @property
    def connected(self) -> bool:
        """Subscribed on a live connection (False while it reconnects)."""
        return self.live

    # --- the loop thread --------------------------------------------------------------------
    def _run_loop(self) -> None:
        SUBSCRIBERS[threading.get_ident()] = self
        asyncio.set_event_loop(self.loop)
        self.loop.set_exception_handler(self._loop_error)
        try:
            self.loop.run_forever()
        finally:
            SUBSCRIBERS.pop(threading.get_ident(), None)
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.run_until_complete(asyncio.sleep(0))
            self.loop.close()

    def _loop_error(self, loop: Any, context: dict[str, Any]) -> None:
        """An exception no task awaited (gmqtt's fire-and-forget reconnects): one line, and
        none for the tasks cancelled when the link stops."""
        if self.stopping:
            return
        exc = context.get("exception")
        log.error("MQTT link %s: %s", self.url,
                  f"{type(exc).__name__}: {exc}" if exc else context.get("message"))

    async def _connect(self) -> None:
        from gmqtt import Client
        from gmqtt.mqtt.constants import MQTTv50

        c = Client(self.client_id, clean_session=not self.persistent, logger=GMQTT_LOG,
                   session_expiry_interval=self.session_expiry_s,
                   maximum_packet_size=MAX_PACKET)
        c.on_connect, c.on_subscribe = self._on_connect, self._on_subscribe
        c.on_message, c.on_disconnect = self._on_message, self._on_disconnect
        c.reconnect_delay = self.backoff_s[0]
        if self.username:
            c.set_auth_credentials(self.username, self.password)
        self.client = c
        self.loop.create_task(self._back_off())
        await c.connect(self.host, self.port, ssl=self.ssl or False,
                        keepalive=self.keepalive_s, version=MQTTv50)

    async def _disconnect(self) -> None:
        self.live = False
        await self.client.disconnect()

    async def _back_off(self) -> None:
        """While the broker stays away, gmqtt's next attempt waits as long as the outage has
        lasted so far (at least backoff_s[0], at most backoff_s[1]): 1, 2, 4, ... 30 s."""
        lo, hi = self.backoff_s
        while not self.stopping:
            await asyncio.sleep(min(0.5, lo))
            lost = self.lost_at
            self.client.reconnect_delay = lo if lost is None else \
                min(hi, max(lo, time.monotonic() - lost))

    def refuse_downgrade(self) -> None:
        """gmqtt is about to retry with MQTT 3.1.1: give up instead (one line)."""
        self.failed = NO_MQTT5
        self.stopping = True
        self.ready.set()
        if self.connections:  # at start, start() says it; later, the log does
            log.error("broker %s %s; stopped reading %s", self.url, NO_MQTT5, self.topic_filter)
        self.loop.create_task(self._disconnect())

    def _on_connect(self, client: Any, flags: Any, rc: Any, props: Any) -> None:
        if self.stopping:
            return
        if not self.subs:
            from gmqtt import Subscription

            self.subs = [Subscription(f, qos=q) for f, q in self.filters]
            mid = client.subscribe(self.subs)
            self.pending = {mid: [f for f, _ in self.filters]}
        else:  # gmqtt keeps the list: send it again, one packet per filter
            self.pending = {client.resubscribe(s): [s.topic] for s in self.subs}

    def _on_subscribe(self, client: Any, mid: int, codes: Sequence[int], props: Any) -> None:
        filters = self.pending.pop(mid, [])
        refused = [(f, c) for f, c in zip(filters, codes, strict=False)
                   if c >= 0x80 and not f.startswith("$SYS")]  # $SYS: an ACL may say no
        if refused:
            f, c = refused[0]
            hint = f" ({SHARE_HINT})" if f.startswith("$share") else " (ACL?)"
            why = f"refused the subscription to {f}{hint}: {reason_name('SUBACK', c)}"
            if not self.ready.is_set():
                self.failed = why
                self.ready.set()
            else:
                log.error("broker %s %s", self.url, why)
            return
        if self.pending:
            return
        self.connections += 1
        self.live = True
        if self.lost_at is not None:
            self.lost_at = None
            log.info("resubscribed to %s on %s", self.topic_filter, self.url)
        self.ready.set()

    def _on_message(self, client: Any, topic: Any, payload: bytes, qos: int,
                    props: dict[str, Any]) -> int:
        self.messages += 1
        if not isinstance(topic, str):  # gmqtt hands over a non-UTF-8 topic as bytes
            topic = bytes(topic).decode(errors="replace")
        try:
            self.ingest(topic, payload, bool(props.get("retain")))
        except Exception:  # one bad message must not stop the stream
            self._ingest_failed(topic)
        return 0

    def _on_disconnect(self, client: Any, packet: Any, exc: Any = None) -> None:
        was_live, self.live = self.live, False
        if was_live and not self.stopping:
            self.lost_at = time.monotonic()
            log.warning("lost the broker %s; reconnecting (back-off %g s doubling to %g s)",
                        self.url, *self.backoff_s)

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
