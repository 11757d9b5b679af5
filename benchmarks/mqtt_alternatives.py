"""Well-kept MQTT libraries in place of agent.fleet.mqttin, for measuring (issue 21, point 4).

Each class here has the interface `fleet serve` uses of `agent.fleet.mqttin.Subscriber`
(`ingest(topic, payload, retained)` per message; `start()`, `stop()`, `url`, `connected`,
`messages`, `reads`, `connections`, `ingest_errors`), so `bench_fleet.py --client gmqtt` runs the
real `fleet serve` with only its MQTT layer replaced (`serve_with`), and `bench_mqttin.py` times
the layer alone. Plain subscriptions and $share; TLS and credentials are passed through but not
benchmarked.

* `GmqttSubscriber`: gmqtt 0.8 (MQTT 5 and 3.1.1, asyncio) on an event loop in its own thread;
  PUBACKs as gmqtt sends them. Not a dependency of the project: `pip install gmqtt` to run it.
* `PahoTunedSubscriber`: paho 2.2 with its receive loop tuned as far as it goes: a manual loop
  (select, then `loop_read()` until the buffered bytes are used up, ONE `loop_write()` for all
  the PUBACKs of a read, `loop_misc()` once per pass), reads of 256 KB served to paho's
  one-byte-at-a-time header reads from a buffer (a subclass overriding paho's `_sock_recv`: a
  private method, acceptable in a benchmark only), PUBACK writes deferred by a no-op
  `on_socket_register_write`, and an `on_message` that only hands the message over.
"""

from __future__ import annotations

import asyncio
import select
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent.fleet.mqttin import client_tls

CHUNK = 262144


class _Base:
    def __init__(self, ingest: Callable[[str, bytes, bool], Any], *, host: str, port: int,
                 tls: bool, topic_filter: str, client_id: str, version: str = "5",
                 extra_filters: Sequence[tuple[str, int]] = (), persistent: bool = False,
                 session_expiry_s: float = 0.0, username: str = "",
                 password: str | None = None, ca_file: Path | None = None,
                 cert_file: Path | None = None, key_file: Path | None = None,
                 keepalive_s: int = 30, **_: Any) -> None:
        self.ingest = ingest
        self.host, self.port, self.tls = host, port, tls
        self.url = f"{'mqtts' if tls else 'mqtt'}://{host}:{port}"
        self.filters = [(topic_filter, 1), *extra_filters]
        self.topic_filter = topic_filter
        self.client_id = client_id
        self.v5 = version == "5"
        self.persistent, self.session_expiry_s = persistent, int(session_expiry_s)
        self.username, self.password = username, password
        self.ssl = client_tls(ca_file, cert_file, key_file) if tls else None
        self.keepalive_s = keepalive_s
        self.ready = threading.Event()
        self.live = False
        self.messages = self.reads = self.connections = self.ingest_errors = 0

    @property
    def connected(self) -> bool:
        return self.live

    def _hand_over(self, topic: str, payload: bytes, retained: bool) -> None:
        self.messages += 1
        try:
            self.ingest(topic, payload, retained)
        except Exception:  # as mqttin: acknowledged, counted
            self.ingest_errors += 1


class GmqttSubscriber(_Base):
    """gmqtt on its own asyncio loop (thread)."""

    def __init__(self, ingest: Callable[[str, bytes, bool], Any], **kw: Any) -> None:
        super().__init__(ingest, **kw)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="gmqtt")
        self.client: Any = None

    def start(self, timeout_s: float = 10.0) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._connect(), self.loop).result(timeout_s)
        if not self.ready.wait(timeout_s):
            raise TimeoutError(f"gmqtt did not subscribe on {self.url} within {timeout_s} s")

    async def _connect(self) -> None:
        from gmqtt import Client, Subscription
        from gmqtt.mqtt.constants import MQTTv50, MQTTv311

        kw: dict[str, Any] = {}
        if self.v5:
            kw["session_expiry_interval"] = self.session_expiry_s if self.persistent else 0
            kw["maximum_packet_size"] = 65536
        c = Client(self.client_id, clean_session=not self.persistent, **kw)
        subs = [Subscription(f, qos=q) for f, q in self.filters]

        def on_connect(client: Any, flags: Any, rc: Any, props: Any) -> None:
            client.subscribe(subs)

        def on_subscribe(client: Any, mid: Any, qos: Any, props: Any) -> None:
            self.connections += 1
            self.live = True
            self.ready.set()

        def on_message(client: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:
            self._hand_over(topic, payload, bool(props.get("retain")))
            return 0

        def on_disconnect(client: Any, packet: Any, exc: Any = None) -> None:
            self.live = False

        c.on_connect, c.on_subscribe = on_connect, on_subscribe
        c.on_message, c.on_disconnect = on_message, on_disconnect
        if self.username:
            c.set_auth_credentials(self.username, self.password)
        self.client = c
        await c.connect(self.host, self.port, ssl=self.ssl or False, keepalive=self.keepalive_s,
                        version=MQTTv50 if self.v5 else MQTTv311)

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.client is not None:
            try:
                asyncio.run_coroutine_threadsafe(self.client.disconnect(),
                                                 self.loop).result(timeout_s)
            except Exception:  # noqa: BLE001 - stopping anyway
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout_s)


class PahoTunedSubscriber(_Base):
    """paho with a manual, batched receive loop (see the module docstring)."""

    def __init__(self, ingest: Callable[[str, bytes, bool], Any], **kw: Any) -> None:
        super().__init__(ingest, **kw)
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        outer = self

        class Buffered(mqtt.Client):
            rbuf = b""
            rpos = 0

            def _sock_recv(self, bufsize: int) -> bytes:  # paho's private read (benchmark)
                if self.rpos >= len(self.rbuf):
                    data = super()._sock_recv(CHUNK)
                    outer.reads += 1
                    if len(data) <= bufsize:
                        return data
                    self.rbuf, self.rpos = data, 0
                out = self.rbuf[self.rpos:self.rpos + bufsize]
                self.rpos += len(out)
                return out

        kwargs: dict[str, Any] = {} if self.v5 else {"clean_session": not self.persistent}
        c = Buffered(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                     protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311, **kwargs)
        self.mqtt = mqtt
        self.c = c
        c.on_connect = lambda cl, *a: cl.subscribe(self.filters)
        c.on_subscribe = self._on_subscribe
        c.on_message = lambda cl, ud, m: self._hand_over(m.topic, m.payload, m.retain)
        c.on_disconnect = lambda *a: setattr(self, "live", False)
        c.on_socket_register_write = lambda *a: None  # PUBACKs wait for our one loop_write
        if self.username:
            c.username_pw_set(self.username, self.password)
        if self.ssl is not None:
            c.tls_set_context(self.ssl)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="paho-tuned")

    def _on_subscribe(self, *a: Any) -> None:
        self.connections += 1
        self.live = True
        self.ready.set()

    def start(self, timeout_s: float = 10.0) -> None:
        ckw: dict[str, Any] = {}
        if self.v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s if self.persistent else 0
            props.MaximumPacketSize = 65536
            ckw = {"clean_start": not self.persistent, "properties": props}
        self.c.connect(self.host, self.port, keepalive=self.keepalive_s, **ckw)
        self.thread.start()
        if not self.ready.wait(timeout_s):
            raise TimeoutError(f"paho did not subscribe on {self.url} within {timeout_s} s")

    def _loop(self) -> None:
        c, ok = self.c, self.mqtt.MQTT_ERR_SUCCESS
        while not self.stopping.is_set():
            sock = c.socket()
            if sock is None:
                return
            if c.rpos >= len(c.rbuf):  # nothing buffered: wait for the socket
                r, _, _ = select.select([sock], [], [], 1.0)
                if r and c.loop_read() != ok:
                    return
            while c.rpos < len(c.rbuf):  # every packet of the read, one loop_read each
                if c.loop_read() != ok:
                    return
            if c.want_write():
                c.loop_write()
            c.loop_misc()

    def stop(self, timeout_s: float = 5.0) -> None:
        self.stopping.set()
        self.thread.join(timeout_s)
        self.c.disconnect()
        self.c.loop_write()


CLIENTS: dict[str, type] = {"gmqtt": GmqttSubscriber, "paho": PahoTunedSubscriber}


def serve_with(client: str, argv: list[str]) -> int:
    """Run `edge-voice-agent ARGV` (a `fleet serve`) with its MQTT layer replaced."""
    from agent import cli
    from agent.fleet import serve

    if client != "lean":
        serve.Subscriber = CLIENTS[client]  # type: ignore[misc,assignment]
    return cli.main(argv)


if __name__ == "__main__":  # python benchmarks/mqtt_alternatives.py CLIENT fleet serve ...
    sys.exit(serve_with(sys.argv[1], sys.argv[2:]))
