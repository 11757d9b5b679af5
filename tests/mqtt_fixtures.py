"""Real-mosquitto fixtures for the MQTT tests (import them in conftest.py or a test module).

`mosquitto(...)` starts a broker from a generated config on a free loopback port, waits (bounded)
until the port accepts, and can stop/restart it on the same port; every broker is killed at
teardown. `pki` makes a throw-away CA, a server certificate for 127.0.0.1 and client
certificates with openssl. `Subscriber` is a paho client that records what it receives.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

_SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
MOSQUITTO = shutil.which("mosquitto", path=_SBIN)
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd", path=_SBIN)
OPENSSL = shutil.which("openssl")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Pki:
    """A CA, a server certificate valid for 127.0.0.1/localhost, and client certificates."""

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path

    def client(self, cn: str) -> tuple[Path, Path]:
        """(cert, key) for a client whose certificate identity (CN) is `cn`."""
        cert, key = self.dir / f"{cn}.crt", self.dir / f"{cn}.key"
        if not cert.exists():
            _issue(self.dir, cn, cert, key, "extendedKeyUsage=clientAuth\n")
        return cert, key


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run([OPENSSL or "openssl", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=30)
    if r.returncode:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {r.stderr.strip()}")


def _issue(d: Path, cn: str, cert: Path, key: Path, ext: str) -> None:
    csr, extfile = d / f"{cn}.csr", d / f"{cn}.ext"
    extfile.write_text(ext)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}", cwd=d)
    _openssl("x509", "-req", "-in", str(csr), "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(extfile), cwd=d)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if OPENSSL is None:
        pytest.skip("openssl binary not found (apt-get install -y openssl)")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj",
             "/CN=eva-test-ca", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    _issue(d, "server", d / "server.crt", d / "server.key",
           "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    return Pki(d, d / "ca.crt", d / "server.crt", d / "server.key")


@dataclass
class Broker:
    """One mosquitto process on 127.0.0.1:port, restartable on the same port."""

    port: int
    conf: Path
    log_path: Path
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout_s: float = 5.0) -> Broker:
        assert self.proc is None or self.proc.poll() is not None, "broker already running"
        logf = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen([MOSQUITTO or "mosquitto", "-c", str(self.conf)],
                                         stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
        finally:
            logf.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"mosquitto not accepting on {self.port}:\n{self.log()}") from None
                time.sleep(0.02)  # polling a port: there is no event to wait for

    def stop(self, timeout_s: float = 5.0) -> None:
        """Graceful stop (SIGTERM): clients see the connection close; persistence is saved."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> Broker:
        self.stop()
        return self.start()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


BrokerFactory = Callable[..., Broker]


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[BrokerFactory]:
    """Factory: `mosquitto(tls=pki, users={"devA": "pw"}, acl="...", persistence=True,
    require_certificate=False, use_identity_as_username=False, start=True) -> Broker`."""
    if MOSQUITTO is None:
        pytest.skip("mosquitto binary not found (apt-get install -y mosquitto mosquitto-clients)")
    brokers: list[Broker] = []

    def factory(*, tls: Pki | None = None, users: dict[str, str] | None = None,
                acl: str | None = None, persistence: bool = False,
                require_certificate: bool = False, use_identity_as_username: bool = False,
                start: bool = True) -> Broker:
        n = len(brokers)
        d = tmp_path / f"mosquitto{n}"
        d.mkdir()
        port = free_port()
        lines = [f"listener {port} 127.0.0.1", "log_dest stderr",
                 "log_type error", "log_type warning", "log_type notice",
                 "log_type information"]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to `mosquitto` and cannot read 0600 keys
        anonymous = not (users or use_identity_as_username)
        lines.append(f"allow_anonymous {'true' if anonymous else 'false'}")
        if tls is not None:
            lines += [f"cafile {tls.ca}", f"certfile {tls.server_cert}",
                      f"keyfile {tls.server_key}"]
            if require_certificate:
                lines.append("require_certificate true")
            if use_identity_as_username:
                lines.append("use_identity_as_username true")
        if users:
            if MOSQUITTO_PASSWD is None:
                pytest.skip("mosquitto_passwd not found")
            pw = d / "passwords"
            pw.touch(mode=0o600)
            for user, password in users.items():
                subprocess.run([MOSQUITTO_PASSWD, "-b", str(pw), user, password], check=True,
                               capture_output=True, timeout=10)
            lines.append(f"password_file {pw}")
        if acl is not None:
            (d / "acl").write_text(acl)
            lines.append(f"acl_file {d / 'acl'}")
        if persistence:
            lines += ["persistence true", f"persistence_location {d}/"]
        conf = d / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        broker = Broker(port=port, conf=conf, log_path=d / "broker.log")
        brokers.append(broker)
        return broker.start() if start else broker

    yield factory
    for b in brokers:
        b.kill()


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool

    def json(self) -> Any:
        import json
        return json.loads(self.payload)


class Subscriber:
    """A paho client that subscribes on every connect and queues what it receives."""

    def __init__(self, broker: Broker, topic: str, *, client_id: str = "", persistent: bool = False,
                 username: str | None = None, password: str | None = None,
                 ca: Path | None = None, cert: tuple[Path, Path] | None = None,
                 timeout_s: float = 5.0) -> None:
        self.messages: queue.Queue[Received] = queue.Queue()
        self._seen: set[tuple[str, str, int]] = set()
        self._subscribed = threading.Event()
        self.topic = topic
        # A persistent (clean_session=False) 3.1.1 session lets the broker queue QoS 1
        # messages for us while we reconnect after a broker restart.
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"sub-{free_port()}",
                                  protocol=mqtt.MQTTv311, clean_session=not persistent)
        if username:
            self.client.username_pw_set(username, password)
        if ca is not None:
            self.client.tls_set(ca_certs=str(ca), certfile=str(cert[0]) if cert else None,
                                keyfile=str(cert[1]) if cert else None,
                                tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = lambda c, u, m: self.messages.put(
            Received(m.topic, bytes(m.payload), bool(m.retain)))
        self.client.connect_async(broker.host, broker.port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(timeout_s):
            self.close()
            raise TimeoutError(f"subscriber not subscribed to {topic} within {timeout_s} s")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                    props: Any) -> None:
        if not rc.is_failure:
            client.subscribe(self.topic, qos=1)

    def get(self, timeout_s: float = 5.0) -> Received:
        try:
            return self.messages.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"nothing received on {self.topic} within {timeout_s} s") from None

    def wait_for(self, pred: Callable[[Received], bool], timeout_s: float = 5.0) -> Received:
        """The first message matching `pred` (others are discarded)."""
        deadline = time.monotonic() + timeout_s
        while True:
            m = self.get(max(0.0, deadline - time.monotonic()))
            if pred(m):
                return m

    def next_new(self, pred: Callable[[Received], bool], timeout_s: float = 5.0) -> Received:
        """The first matching message not seen before: delivery is at least once, and a consumer
        drops a repeat by (topic, boot, seq), as the telemetry contract says."""
        while True:
            m = self.wait_for(pred, timeout_s)
            try:
                body = m.json()
                key = (m.topic, str(body["boot_id"]), int(body["seq"]))
            except (ValueError, KeyError, TypeError):
                return m
            if key not in self._seen:
                self._seen.add(key)
                return m

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
