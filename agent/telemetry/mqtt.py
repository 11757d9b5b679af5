"""MQTT sink: outbox on disk → publisher thread → broker, with presence and back-off.

Why this shape: the audio pipeline must never wait for the network, and an edge device must not
lose monitoring windows to outages or crashes. So `publish()` only commits the message to the
SQLite outbox; a publisher thread sends rows in order with a bounded number of QoS 1 messages in
flight and deletes a row only on its PUBACK. After every (re)connect it rewinds to the oldest
unacknowledged row, so order holds and nothing is skipped; the price is that up to
`max_inflight` messages may arrive twice, which consumers drop by (device, boot, seq).

Presence: the last will sets `{prefix}/{device_id}/status` to `offline` (retained) when the
connection dies; every connect publishes `online` and the caller's birth payload (both
retained, status as plain text, birth as JSON); a clean `close()` publishes `offline` itself,
because a clean DISCONNECT does not fire the will.
"""

from __future__ import annotations

import logging
import queue
import random
import ssl
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from agent.daemon.state_health import StateHealth
from agent.errors import ConfigError, one_line
from agent.telemetry.link import CauseLog, connect_error_cause
from agent.telemetry.message import DEFAULT_PREFIX, Message, check_level, json_bytes, topic
from agent.telemetry.outbox import Outbox, OutboxLimits

log = logging.getLogger(__name__)

# An attempt whose TCP/TLS connect succeeded but got no CONNACK for this long is reported
# (paho itself only gives up after the keepalive, silently).
CONNACK_WAIT_S = 5.0

STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"
_UNSUPPORTED_PROTOCOL = 132  # MQTT 5 CONNACK reason; paho maps a 3.1.1 broker's "1" to it


_deaths_lock = threading.Lock()
_deaths: weakref.WeakKeyDictionary[threading.Thread, list[BaseException]] = \
    weakref.WeakKeyDictionary()


def keep_death(thread: threading.Thread) -> list[BaseException]:
    """A list that receives the exception that ends `thread`, instead of a traceback on stderr.

    An exception escaping paho's network loop (seen: an OSError from time.sleep) ends its thread
    with a multi-line traceback and telemetry silently dead. Through `threading.excepthook`
    (chained: every other thread's exception goes to the hook that was there before) the
    sink's supervisor gets it and names it in one log line when it restarts the client. The hook
    is put back if something replaced it since."""
    box: list[BaseException] = []
    with _deaths_lock:
        _deaths[thread] = box
        if not getattr(threading.excepthook, "keeps_deaths", False):
            previous = threading.excepthook

            def hook(args: Any) -> None:
                kept = _deaths.get(args.thread) if args.thread is not None else None
                if kept is not None and isinstance(args.exc_value, Exception):
                    kept.append(args.exc_value)
                    return
                previous(args)

            hook.keeps_deaths = True  # type: ignore[attr-defined]
            threading.excepthook = hook
    return box


@dataclass(frozen=True)
class MqttOptions:
    """Connection settings; see the [telemetry] section of the configuration."""

    username: str = ""        # empty: the device id when a password file is set, else none
    password_file: str = ""   # first line is the password (keeps it out of config and argv)
    ca_file: str = ""         # mqtts: CA bundle; empty = the system's trust store
    cert_file: str = ""       # client certificate (mqtts), e.g. for use_identity_as_username
    key_file: str = ""
    keepalive_s: int = 30
    protocol: str = "auto"    # auto = MQTT 5, falling back to 3.1.1 if refused | 5 | 3.1.1
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    max_inflight: int = 16
    # False: only messages from an earlier process are marked historical. True: also those
    # committed while disconnected and replayed after a reconnect.
    historical_on_reconnect: bool = False

    def __post_init__(self) -> None:
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise ConfigError(f"invalid telemetry.mqtt_protocol {self.protocol!r}: "
                              "expected auto, 5 or 3.1.1")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ConfigError("telemetry reconnect back-off needs 0 < min <= max")
        if self.max_inflight < 1:
            raise ConfigError("telemetry.max_inflight must be at least 1")
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("telemetry client certificate needs both cert_file and key_file")


def backoff_delay(attempt: int, lo: float, hi: float, rng: random.Random | None = None) -> float:
    """Exponential back-off with "equal jitter": [½, 1] × min(hi, lo·2^attempt).

    Jitter keeps a fleet that lost the same broker from reconnecting in lock-step.
    """
    cap = min(hi, lo * (2.0 ** min(attempt, 30)))
    return cap * (rng or random).uniform(0.5, 1.0)


class MqttSink:
    """Telemetry over MQTT with a durable outbox; see the module docstring."""

    def __init__(self, host: str, port: int, *, device_id: str, outbox_path: str | Path,
                 tls: bool = False, prefix: str = DEFAULT_PREFIX, birth: dict | None = None,
                 options: MqttOptions | None = None,
                 outbox_limits: OutboxLimits | None = None,
                 health: StateHealth | None = None) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.device_id = check_level(device_id)
        self.options = opts = options or MqttOptions()
        self.status_topic = topic(prefix, device_id, "status")
        self.birth_topic = topic(prefix, device_id, "birth")
        self._birth = json_bytes(birth) if birth is not None else None
        self._password: str | None = None
        if opts.password_file:
            try:
                self._password = Path(opts.password_file).read_text().splitlines()[0]
            except (OSError, IndexError) as e:
                raise ConfigError(f"telemetry password file {opts.password_file!r} cannot be "
                                  "read or is empty") from e
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(opts, name)
            if value and not Path(value).is_file():
                raise ConfigError(f"telemetry.{name} {value!r} does not exist")
        self._outbox = Outbox(outbox_path, outbox_limits, autocheckpoint=False, health=health)
        self._rng = random.Random()
        self._wake = threading.Event()
        self._progress = threading.Condition()
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._acks: queue.SimpleQueue[tuple[int, int, bool]] = queue.SimpleQueue()
        self._inflight: dict[int, int] = {}  # mid -> outbox row id (publisher thread only)
        self._last_sent = 0
        self._rewind = False
        self._connected_at = 0.0
        self._fallback = False
        self._attempt = 0
        self._gen = 0
        self._closed = False
        self._close_result: bool | None = None
        self.delivered = self.rejected = self.append_errors = self.connects = 0
        self.restarts = 0  # paho network threads found dead and replaced
        self._causes = CauseLog(log)
        self._pre_connect_at: float | None = None  # an attempt without CONNACK or failure yet
        self._net_thread: threading.Thread | None = None  # paho's, seen from its callbacks
        self._net_death: list[BaseException] = []
        self._restarted_at = -1e9
        self._restart_delay = 0.5
        self._restart_not_before = 0.0
        self._protocol = mqtt.MQTTv311 if opts.protocol == "3.1.1" else mqtt.MQTTv5
        self._subscriptions: list[str] = []
        # one SUBSCRIBE per link: a second one delivers every retained command twice
        self._subscribe_lock = threading.Lock()
        self._link_subscribed = False
        self._on_command: Callable[[str, bytes], None] | None = None
        self._client = self._new_client()
        self._thread = threading.Thread(target=self._run, name="telemetry-publisher",
                                        daemon=True)
        self._thread.start()

    # -- caller side ---------------------------------------------------------------------
    def publish(self, msg: Message) -> None:
        """Commit `msg` to the outbox and wake the publisher; never touches the network."""
        if self._closed:
            raise RuntimeError("mqtt telemetry sink is closed")
        try:
            self._outbox.append(msg)
        except Exception as e:  # noqa: BLE001 - a full disk must not stop the audio pipeline
            self.append_errors += 1
            if self.append_errors == 1 or self.append_errors % 1000 == 0:
                log.error("telemetry outbox append failed (%d so far): %s",
                          self.append_errors, e)
            return
        self._wake.set()

    def update_birth(self, birth: dict) -> None:
        """Replace the birth payload (e.g. after a config reload) and republish it if online."""
        self._birth = json_bytes(birth)
        if self._connected.is_set():
            self._client.publish(self.birth_topic, self._birth, qos=1, retain=True)

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def wait_drained(self, timeout_s: float) -> bool:
        """Wait (bounded) until every committed message has been acknowledged."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._progress:
            while len(self._outbox) > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._progress.wait(remaining)
        return True

    def close(self, drain_timeout_s: float = 10.0) -> bool:
        """Drain (bounded), publish `offline`, disconnect; True if the outbox is empty.

        Undelivered rows stay in the outbox and are replayed (historical) by the next process.
        """
        if self._closed:
            return bool(self._close_result)
        self._closed = True
        deadline = time.monotonic() + max(0.0, drain_timeout_s)
        drained = self.wait_drained(drain_timeout_s)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5.0)
        client = self._client
        if self._connected.is_set():
            try:
                info = client.publish(self.status_topic, STATUS_OFFLINE, qos=1, retain=True)
                info.wait_for_publish(timeout=min(2.0, max(0.5, deadline - time.monotonic())))
            except (RuntimeError, ValueError) as e:
                log.warning("could not publish offline status: %s", e)
        client.disconnect()
        client.loop_stop()
        self._connected.clear()
        self._outbox.close()
        self._close_result = drained
        if not drained:
            log.warning("telemetry outbox not drained: %d message(s) kept for the next start",
                        self._outbox.stats()["queued"])
        return drained

    def stats(self) -> dict[str, Any]:
        ob = self._outbox.stats()
        return {"sink": "mqtts" if self.tls else "mqtt", "delivered": self.delivered,
                "queued": ob["queued"], "queued_bytes": ob["queued_bytes"],
                "dropped": ob["dropped"], "rejected": self.rejected,
                "append_errors": self.append_errors, "in_flight": len(self._inflight),
                "connected": self._connected.is_set(), "connects": self.connects,
                "restarts": self.restarts,
                "protocol": "5" if self._protocol == mqtt.MQTTv5 else "3.1.1"}

    # -- paho client and callbacks (run on paho's network thread) ------------------------
    def _new_client(self) -> mqtt.Client:
        opts = self.options
        self._gen += 1
        gen = self._gen
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.device_id,
                        protocol=self._protocol)
        c.max_inflight_messages_set(0)  # our own window bounds what is in flight
        c.will_set(self.status_topic, STATUS_OFFLINE, qos=1, retain=True)
        username = opts.username or (self.device_id if self._password is not None else "")
        if username:
            c.username_pw_set(username, self._password)
        if self.tls:
            c.tls_set(ca_certs=opts.ca_file or None, certfile=opts.cert_file or None,
                      keyfile=opts.key_file or None, cert_reqs=ssl.CERT_REQUIRED,
                      tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.on_connect = lambda cl, ud, fl, rc, pr: self._on_connect(gen, cl, rc)
        c.on_disconnect = lambda cl, ud, fl, rc, pr: self._on_disconnect(gen, rc)
        c.on_publish = lambda cl, ud, mid, rc, pr: self._on_publish(gen, mid, rc)
        c.on_message = lambda cl, ud, msg: self._on_message(msg)
        c.on_pre_connect = lambda cl, ud: self._on_pre_connect(gen, cl)
        c.on_connect_fail = lambda cl, ud: self._on_connect_fail(gen)
        c.reconnect_delay_set(opts.reconnect_min_s, opts.reconnect_min_s)  # type: ignore[arg-type]
        c.connect_async(self.host, self.port, keepalive=opts.keepalive_s)
        self._net_thread, self._net_death = None, []
        c.loop_start()
        return c

    def _on_pre_connect(self, gen: int, client: mqtt.Client) -> None:
        # Set the wait *after* this attempt, should it fail: paho sleeps reconnect_min_delay
        # first and then min(2 × previous, max), so min = max = our jittered delay.
        if gen != self._gen:
            return
        if self._net_thread is None:  # paho keeps no public handle on its thread: it runs us
            self._net_thread = threading.current_thread()
            self._net_death = keep_death(self._net_thread)
        self._pre_connect_at = time.monotonic()
        d = backoff_delay(self._attempt, self.options.reconnect_min_s,
                          self.options.reconnect_max_s, self._rng)
        self._attempt += 1
        client.reconnect_delay_set(d, d)  # type: ignore[arg-type]

    def _on_connect_fail(self, gen: int) -> None:
        # TCP/TLS failed (refused, unreachable, DNS, certificate). paho calls this inside its
        # `except OSError`, so the exception in flight is the real cause. Said once per cause,
        # not at every back-off step; the rows wait in the outbox meanwhile.
        if gen != self._gen or self._closed:
            return
        self._pre_connect_at = None
        cause = connect_error_cause(sys.exc_info()[1])
        self._causes.report(cause, "telemetry broker %s:%d unreachable: %s; retrying with "
                            "back-off up to %.0f s (logged again only if the cause changes)",
                            self.host, self.port, cause, self.options.reconnect_max_s)

    def _on_connect(self, gen: int, client: mqtt.Client, rc: ReasonCode) -> None:
        if gen != self._gen:
            return
        if rc.is_failure:
            if (rc.value == _UNSUPPORTED_PROTOCOL and self._protocol == mqtt.MQTTv5
                    and self.options.protocol == "auto"):
                log.info("broker %s:%d refused MQTT 5; falling back to 3.1.1", self.host,
                         self.port)
                self._fallback = True
                self._wake.set()
            else:
                self._causes.report(f"refused: {rc}", "broker %s:%d refused the connection: %s",
                                    self.host, self.port, rc, level=logging.ERROR)
            self._pre_connect_at = None
            return
        self._attempt = 0
        self._pre_connect_at = None
        self._causes.clear()
        self.connects += 1
        self._connected_at = self._outbox.now()  # the outbox clock
        client.publish(self.status_topic, STATUS_ONLINE, qos=1, retain=True)
        with self._subscribe_lock:  # retained commands arrive again after every connect
            for t in self._subscriptions:
                client.subscribe(t, qos=1)
            self._link_subscribed = True
        if self._birth is not None:
            client.publish(self.birth_topic, self._birth, qos=1, retain=True)
        self._rewind = True
        self._connected.set()
        self._wake.set()
        log.info("telemetry connected to %s:%d (MQTT %s)", self.host, self.port,
                 "5" if self._protocol == mqtt.MQTTv5 else "3.1.1")

    def subscribe(self, topics: list[str], callback: Callable[[str, bytes], None]) -> None:
        """Receive messages on `topics` (e.g. rollout commands) on every connection; the
        callback runs on paho's thread and must only hand the message over."""
        with self._subscribe_lock:
            self._subscriptions = list(topics)
            self._on_command = callback
            if self._link_subscribed:  # connected already; otherwise on_connect subscribes
                for t in self._subscriptions:
                    self._client.subscribe(t, qos=1)

    def _on_message(self, msg: Any) -> None:
        if self._on_command is not None and msg.topic in self._subscriptions:
            self._on_command(msg.topic, bytes(msg.payload))

    def _on_disconnect(self, gen: int, rc: ReasonCode) -> None:
        if gen != self._gen:
            return
        with self._subscribe_lock:
            self._link_subscribed = False
        was = self._connected.is_set()
        self._connected.clear()
        self._wake.set()
        if was and not self._closed:
            log.warning("telemetry disconnected from %s:%d: %s", self.host, self.port, rc)
        elif self._pre_connect_at is not None and not self._closed:
            self._pre_connect_at = None  # closed before any CONNACK (e.g. paho's keepalive)
            self._report_silent_broker()

    def _report_silent_broker(self) -> None:
        self._causes.report(
            "no CONNACK", "telemetry broker %s:%d accepted the connection but did not answer "
            "MQTT CONNECT within %g s (not an MQTT broker on that port, or overloaded?); "
            "retrying with back-off up to %.0f s", self.host, self.port, CONNACK_WAIT_S,
            self.options.reconnect_max_s)

    def _on_publish(self, gen: int, mid: int, rc: ReasonCode) -> None:
        self._acks.put((gen, mid, bool(rc.is_failure)))
        self._wake.set()

    # -- supervision (publisher thread) --------------------------------------------------
    def _supervise(self) -> None:
        """Notice what paho does not report: its network thread dead, or a connection that
        TCP (and TLS) accepted but MQTT never answered."""
        if self._closed or self._stop.is_set():
            return
        t = self._net_thread
        if t is not None and not t.is_alive():
            now = time.monotonic()
            if now >= self._restart_not_before:
                # a thread that keeps dying is restarted with back-off (1 s doubling to 60 s),
                # so a persistent fault cannot flood the journal
                self._restart_delay = min(60.0, self._restart_delay * 2) \
                    if now - self._restarted_at < 60.0 else 1.0
                self._restarted_at = now
                self._restart_not_before = now + self._restart_delay
                self._restart_network_thread()
            return
        started = self._pre_connect_at
        if (started is not None and not self._connected.is_set()
                and time.monotonic() - started >= CONNACK_WAIT_S
                and self._client.socket() is not None):
            self._report_silent_broker()

    def _restart_network_thread(self) -> None:
        old = self._client
        death = self._net_death[0] if self._net_death else None
        self.restarts += 1
        log.error("telemetry network thread died (%s); restarting the MQTT client (%d restart(s) "
                  "so far, counted in the telemetry_restarts system metric)",
                  one_line(death) if death is not None else "no exception reported",
                  self.restarts)
        self._connected.clear()
        try:
            old.loop_stop()
            sock = old.socket()
            if sock is not None:  # the broker sees the old connection end (its will fires)
                sock.close()
        except Exception as e:  # noqa: BLE001 - the old client is dropped either way
            log.debug("closing the dead MQTT client: %s", e)
        self._inflight.clear()  # the rewind after the new connect re-sends them in order
        self._client = self._new_client()

    # -- publisher thread ----------------------------------------------------------------
    def _run(self) -> None:
        next_expire = 0.0
        while True:
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            try:
                self._supervise()
                if self._fallback:
                    self._fall_back_to_311()
                self._take_acks()
                if time.monotonic() >= next_expire:
                    self._outbox.expire()
                    self._outbox.checkpoint()
                    next_expire = time.monotonic() + 2.0
                if self._stop.is_set():
                    break
                if self._connected.is_set():
                    self._send_window()
            except Exception:  # noqa: BLE001 - keep the publisher alive; the rows stay on disk
                log.exception("telemetry publisher error")
                self._stop.wait(1.0)
            finally:
                with self._progress:
                    self._progress.notify_all()
        with self._progress:
            self._progress.notify_all()

    def _take_acks(self) -> None:
        done: list[int] = []
        while True:
            try:
                gen, mid, failed = self._acks.get_nowait()
            except queue.Empty:
                break
            if gen != self._gen:
                continue
            rid = self._inflight.pop(mid, None)
            if rid is None:
                continue  # status/birth, or a resend from before a rewind
            if failed:
                # The broker will never take it (e.g. ACL): retrying would wedge the queue.
                self.rejected += 1
                log.warning("broker rejected telemetry message %d; dropped", rid)
            else:
                self.delivered += 1
            done.append(rid)
        if done:
            self._outbox.ack(done)

    def _send_window(self) -> None:
        if self._rewind:
            # paho resends its own unacknowledged copies too; ours restart from the oldest row
            # so nothing newer can overtake an older message.
            self._rewind = False
            self._inflight.clear()
            self._last_sent = 0
        room = self.options.max_inflight - len(self._inflight)
        if room <= 0:
            return
        since = self._connected_at if self.options.historical_on_reconnect else None
        for row in self._outbox.peek(self._last_sent, room, live_since=since):
            info = self._client.publish(row.topic, row.payload, qos=row.qos, retain=row.retain)
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                log.warning("telemetry publish failed: %s", mqtt.error_string(info.rc))
                break
            self._inflight[info.mid] = row.id
            self._last_sent = row.id
            if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                break  # connection just dropped; the rewind after reconnect covers it

    def _fall_back_to_311(self) -> None:
        self._fallback = False
        old = self._client
        self._protocol = mqtt.MQTTv311
        old.disconnect()  # first, so a pending back-off sleep ends at once
        old.loop_stop()
        self._inflight.clear()
        self._client = self._new_client()
