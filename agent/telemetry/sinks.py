"""Telemetry sinks: where `Message`s go, chosen by one spec string.

`none | stdout | file:PATH | mqtt://HOST:PORT | mqtts://HOST:PORT`. Every sink has the same
small contract (`Sink`) so the service and the tests never care which one is configured, and
`publish()` never waits for anything slower than a local append (a line write, or an outbox
commit for MQTT): the audio pipeline calls it.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

from agent.errors import ConfigError
from agent.telemetry.message import DEFAULT_PREFIX, Message, topic

if TYPE_CHECKING:
    from agent.daemon.state_health import StateHealth
    from agent.telemetry.mqtt import MqttOptions
    from agent.telemetry.outbox import OutboxLimits

SINK_FORMS = "none | stdout | file:PATH | mqtt://HOST:PORT | mqtts://HOST:PORT"


@runtime_checkable
class Sink(Protocol):
    """What the service needs from any telemetry transport."""

    def publish(self, msg: Message) -> None:
        """Hand over one message; returns after a local append, never waits for a network."""

    def close(self, drain_timeout_s: float = 10.0) -> bool:
        """Stop; wait at most drain_timeout_s for delivery; True if nothing is left undelivered."""

    def stats(self) -> dict[str, Any]:
        """At least `delivered`, `queued`, `dropped` (ints) and `connected` (bool)."""


class NullSink:
    """`none`: telemetry off; messages are counted and discarded."""

    def __init__(self) -> None:
        self.discarded = 0

    def publish(self, msg: Message) -> None:
        self.discarded += 1

    def close(self, drain_timeout_s: float = 10.0) -> bool:
        return True

    def stats(self) -> dict[str, Any]:
        return {"sink": "none", "delivered": 0, "queued": 0, "dropped": 0, "connected": False,
                "discarded": self.discarded}


class _LineSink:
    """One JSON object per line, flushed per message, so a reader (or a crash) sees whole lines."""

    kind = "lines"

    def __init__(self, stream: IO[str], *, owns: bool, birth: Message | None = None) -> None:
        self._stream = stream
        self._owns = owns
        self._lock = threading.Lock()
        self._closed = False
        self.delivered = 0
        self.errors = 0
        if birth is not None:
            self.publish(birth)

    def publish(self, msg: Message) -> None:
        line = msg.to_json_line()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.kind} telemetry sink is closed")
            try:
                self._stream.write(line)
                self._stream.flush()
            except OSError:
                self.errors += 1  # a full disk or closed pipe must not stop the pipeline
                return
            self.delivered += 1

    def close(self, drain_timeout_s: float = 10.0) -> bool:
        with self._lock:
            if self._closed:
                return True
            self._closed = True
            try:
                self._stream.flush()
                if self._owns:
                    os.fsync(self._stream.fileno())
                    self._stream.close()
            except OSError:
                self.errors += 1
                return False
            return True

    def stats(self) -> dict[str, Any]:
        return {"sink": self.kind, "delivered": self.delivered, "queued": 0,
                "dropped": self.errors, "connected": not self._closed}


class StdoutSink(_LineSink):
    """`stdout`: JSON Lines on standard output (or the given text stream)."""

    kind = "stdout"

    def __init__(self, stream: IO[str] | None = None, *, birth: Message | None = None) -> None:
        super().__init__(stream if stream is not None else sys.stdout, owns=False, birth=birth)


class FileSink(_LineSink):
    """`file:PATH`: JSON Lines appended to PATH (parent directories are created)."""

    kind = "file"

    def __init__(self, path: str | os.PathLike[str], *, birth: Message | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(open(self.path, "a", encoding="utf-8"), owns=True,
                         birth=birth)


def parse_sink_spec(spec: str) -> tuple[str, str, int]:
    """Split a spec into (kind, target, port); kind is none|stdout|file|mqtt|mqtts."""
    s = (spec or "").strip()
    if any(c.isspace() for c in s):
        raise ConfigError(f"invalid telemetry sink {spec!r}: it contains a space; expected "
                          f"{SINK_FORMS}")
    if s in ("none", "stdout"):
        return s, "", 0
    if s.startswith("file:") and len(s) > len("file:"):
        return "file", s[len("file:"):], 0
    if s.startswith(("mqtt://", "mqtts://")):
        try:
            u = urlsplit(s)
            port = u.port if u.port is not None else (8883 if u.scheme == "mqtts" else 1883)
        except ValueError:
            port, u = -1, None
        if (u is not None and u.hostname and 0 < port < 65536
                and u.path in ("", "/") and not u.query and not u.fragment
                and u.username is None):
            return u.scheme, u.hostname, port
    raise ConfigError(f"invalid telemetry sink {spec!r}: expected {SINK_FORMS}")


def make_sink(spec: str, *, device_id: str = "", prefix: str = DEFAULT_PREFIX,
              state_dir: str | os.PathLike[str] | None = None, birth: dict | None = None,
              mqtt: MqttOptions | None = None, outbox: OutboxLimits | None = None,
              stream: IO[str] | None = None, health: StateHealth | None = None) -> Sink:
    """Build the sink for `spec`.

    `birth` (the payload describing this boot and its metric schema) is written first by the
    line sinks and published retained on every (re)connect by the MQTT sink. The MQTT sink
    needs `device_id` (client id, topic level) and `state_dir` (where its outbox lives).
    """
    kind, target, port = parse_sink_spec(spec)
    birth_msg = None
    if birth is not None and device_id:
        birth_msg = Message(topic(prefix, device_id, "birth"), birth, qos=1, retain=True)
    if kind == "none":
        return NullSink()
    if kind == "stdout":
        return StdoutSink(stream, birth=birth_msg)
    if kind == "file":
        try:
            return FileSink(target, birth=birth_msg)
        except OSError as e:
            raise ConfigError(f"telemetry file {target!r} cannot be opened: {e.strerror}") from e
    from agent.telemetry.mqtt import MqttOptions, MqttSink  # paho only when needed
    from agent.telemetry.outbox import OUTBOX_FILENAME

    if not device_id:
        raise ConfigError("the mqtt telemetry sink needs a device id (--device-id)")
    if state_dir is None:
        raise ConfigError("the mqtt telemetry sink needs a state directory (--state-dir) "
                          "for its outbox")
    return MqttSink(target, port, device_id=device_id, tls=(kind == "mqtts"), prefix=prefix,
                    birth=birth, options=mqtt or MqttOptions(),
                    outbox_path=Path(state_dir) / OUTBOX_FILENAME, outbox_limits=outbox,
                    health=health)
