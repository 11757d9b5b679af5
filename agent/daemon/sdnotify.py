"""The systemd notify protocol, spoken directly over $NOTIFY_SOCKET.

Why not a library: the protocol is one datagram of newline-separated KEY=VALUE lines sent to an
AF_UNIX socket, a few lines of code, and a dependency would be one more thing to install on the
device. Outside systemd (no $NOTIFY_SOCKET) every call is a cheap no-op, so the daemon code calls
it unconditionally.

The pipeline loop itself calls `Notifier.maybe_ping(now)` once per iteration: it sends WATCHDOG=1
at most once per half watchdog interval, so a stuck pipeline (not just a live process) stops
the pings and systemd restarts the service.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def socket_address(value: str | None) -> str | bytes | None:
    """Turn a $NOTIFY_SOCKET value into an address for sendto(), or None if unusable.

    A leading '@' means the Linux abstract namespace (a NUL byte on the wire). Like libsystemd,
    only absolute paths and '@' names are accepted; anything else (e.g. the newer `vsock:` form)
    is reported and ignored rather than sent somewhere unexpected.
    """
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    log.warning("NOTIFY_SOCKET=%r is neither an absolute path nor an abstract name; "
                "systemd notifications are disabled", value)
    return None


def watchdog_ping_interval(env: Mapping[str, str] | None = None,
                           pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None without a watchdog.

    $WATCHDOG_PID, when set, names the process the watchdog is meant for; a child that inherited
    the environment must not ping on its parent's behalf, so another pid means None.
    """
    env = os.environ if env is None else env
    raw = env.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    wd_pid = env.get("WATCHDOG_PID", "")
    if wd_pid:
        try:
            if int(wd_pid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


class Notifier:
    """Tells systemd about readiness, status, liveness, reloads and shutdown.

    `env`, `clock` and `pid` are injectable so tests can use a fake socket and a fake clock;
    by default they are os.environ, time.monotonic (CLOCK_MONOTONIC on Linux, as systemd expects
    for MONOTONIC_USEC) and os.getpid().
    """

    def __init__(self, env: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic, pid: int | None = None) -> None:
        env = os.environ if env is None else env
        self._address = socket_address(env.get("NOTIFY_SOCKET"))
        self._clock = clock
        self._sock: socket.socket | None = None
        self._last_ping: float | None = None
        self._warned = False
        self.watchdog_interval: float | None = (
            watchdog_ping_interval(env, pid) if self._address is not None else None)

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a usable notify socket."""
        return self._address is not None

    def send(self, *fields: str) -> bool:
        """Send KEY=VALUE fields as one datagram; False (never an exception) when not delivered.

        A notification that cannot be delivered must not take the daemon down: it is logged once
        and the caller carries on.
        """
        if self._address is None:
            return False
        payload = "\n".join(fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, self._address)
        except OSError as e:
            if not self._warned:
                log.warning("cannot notify systemd (%s); further failures are not logged", e)
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1 once audio, model and sinks are up; optionally with a STATUS= line."""
        fields = ["READY=1"]
        if status is not None:
            fields.append(_status_field(status))
        return self.send(*fields)

    def status(self, text: str) -> bool:
        """A short human summary shown by `systemctl status`."""
        return self.send(_status_field(text))

    def watchdog(self) -> bool:
        """WATCHDOG=1 now, regardless of cadence (prefer `maybe_ping` in loops)."""
        ok = self.send("WATCHDOG=1")
        if ok:
            self._last_ping = self._clock()
        return ok

    def maybe_ping(self, now: float | None = None) -> bool:
        """Send WATCHDOG=1 if half the watchdog interval has passed since the last ping.

        Called every pipeline iteration with the loop's monotonic time; returns True when a ping
        was sent. A failed ping is retried on the next call rather than waiting a full interval,
        since a missed ping brings the restart closer.
        """
        if self.watchdog_interval is None:
            return False
        now = self._clock() if now is None else now
        if self._last_ping is not None and now - self._last_ping < self.watchdog_interval:
            return False
        if not self.send("WATCHDOG=1"):
            return False
        self._last_ping = now
        return True

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC, sent when SIGHUP handling starts; READY=1 ends it."""
        usec = int(self._clock() * 1_000_000)
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """STOPPING=1 when shutdown begins, so systemd shows `deactivating` rather than a hang."""
        return self.send("STOPPING=1")

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: ask for more start/stop time (e.g. a slow model load)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _status_field(text: str) -> str:
    # A newline would start a new KEY=VALUE field: keep STATUS to one line.
    return "STATUS=" + " ".join(text.splitlines())
