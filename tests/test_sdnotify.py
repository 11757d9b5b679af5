"""agent.daemon.sdnotify against a fake $NOTIFY_SOCKET: a bound AF_UNIX datagram socket, as systemd
uses.

Every receive has a bounded timeout, so a missing datagram fails the test instead of hanging it.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.daemon.sdnotify import Notifier, socket_address, watchdog_ping_interval

RECV_TIMEOUT_S = 2.0


class FakeClock:
    """Monotonic time the test moves by hand."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeSystemd:
    """The receiving end of $NOTIFY_SOCKET."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.env_value, **extra}

    def recv(self) -> list[str]:
        """The next datagram as its KEY=VALUE lines; fails after RECV_TIMEOUT_S."""
        self.sock.settimeout(RECV_TIMEOUT_S)
        return self.sock.recv(65536).decode().split("\n")

    def pending(self) -> list[list[str]]:
        """All datagrams already queued, without waiting (datagrams are queued synchronously)."""
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(65536).decode().split("\n"))
        except BlockingIOError:
            return out
        finally:
            self.sock.setblocking(True)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="sdn") as d:
        yield Path(d)


@pytest.fixture
def systemd_path(short_dir: Path) -> Iterator[FakeSystemd]:
    path = short_dir / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        yield FakeSystemd(s, str(path))


@pytest.fixture
def systemd_abstract() -> Iterator[FakeSystemd]:
    name = f"edge-voice-agent-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        yield FakeSystemd(s, "@" + name)


def test_without_notify_socket_everything_is_a_noop() -> None:
    n = Notifier(env={"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())})
    assert not n.enabled
    assert n.watchdog_interval is None  # a watchdog without a socket cannot be served
    assert n.ready() is False
    assert n.status("x") is False
    assert n.watchdog() is False
    assert n.maybe_ping(0.0) is False
    assert n.reloading() is False
    assert n.stopping() is False


def test_default_env_is_os_environ(monkeypatch: pytest.MonkeyPatch,
                                   systemd_path: FakeSystemd) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", systemd_path.env_value)
    with Notifier() as n:
        assert n.enabled
        assert n.ready()
    assert systemd_path.recv() == ["READY=1"]
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not Notifier().enabled


def test_ready_and_status_on_a_path_socket(systemd_path: FakeSystemd) -> None:
    with Notifier(env=systemd_path.env()) as n:
        assert n.ready()
        assert systemd_path.recv() == ["READY=1"]
        assert n.ready(status="listening on mic:USB, model v3")
        assert systemd_path.recv() == ["READY=1", "STATUS=listening on mic:USB, model v3"]
        assert n.status("12 decisions in the last minute")
        assert systemd_path.recv() == ["STATUS=12 decisions in the last minute"]


def test_status_is_kept_to_one_field(systemd_path: FakeSystemd) -> None:
    # A newline would smuggle in a second KEY=VALUE field (e.g. READY=1).
    with Notifier(env=systemd_path.env()) as n:
        assert n.status("audio lost\nREADY=1")
    assert systemd_path.recv() == ["STATUS=audio lost READY=1"]


def test_abstract_namespace_socket(systemd_abstract: FakeSystemd) -> None:
    assert socket_address(systemd_abstract.env_value) == \
        b"\0" + systemd_abstract.env_value[1:].encode()
    with Notifier(env=systemd_abstract.env()) as n:
        assert n.enabled
        assert n.ready(status="up")
    assert systemd_abstract.recv() == ["READY=1", "STATUS=up"]


def test_relative_or_unknown_socket_address_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="agent.daemon.sdnotify"):
        n = Notifier(env={"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    assert n.ready() is False
    assert "NOTIFY_SOCKET" in caplog.text


def test_stopping_and_reloading(systemd_path: FakeSystemd) -> None:
    clock = FakeClock(1234.5)
    with Notifier(env=systemd_path.env(), clock=clock) as n:
        assert n.reloading()
        assert systemd_path.recv() == ["RELOADING=1", "MONOTONIC_USEC=1234500000"]
        assert n.ready()
        assert systemd_path.recv() == ["READY=1"]
        assert n.stopping()
        assert systemd_path.recv() == ["STOPPING=1"]
        assert n.extend_timeout(20)
        assert systemd_path.recv() == ["EXTEND_TIMEOUT_USEC=20000000"]


def test_reloading_uses_the_same_clock_as_systemd(systemd_path: FakeSystemd) -> None:
    # systemd compares MONOTONIC_USEC with CLOCK_MONOTONIC; the default clock must be that one.
    with Notifier(env=systemd_path.env()) as n:
        before = time_monotonic_usec()
        assert n.reloading()
        after = time_monotonic_usec()
    fields = dict(f.split("=", 1) for f in systemd_path.recv())
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


def time_monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": ""}, None),
    ({"WATCHDOG_USEC": "abc"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
])
def test_watchdog_ping_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_ping_interval(env, pid=4242) == expected


def test_watchdog_pid_defaults_to_this_process() -> None:
    env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_ping_interval(env) == 1.0
    env["WATCHDOG_PID"] = str(os.getpid() + 1)
    assert watchdog_ping_interval(env) is None


def test_watchdog_cadence_is_half_the_interval(systemd_path: FakeSystemd) -> None:
    env = systemd_path.env(WATCHDOG_USEC="10000000", WATCHDOG_PID=str(os.getpid()))
    with Notifier(env=env, clock=FakeClock()) as n:
        assert n.watchdog_interval == 5.0
        sent = [t for t in (0.0, 0.1, 4.9, 5.0, 5.1, 9.99, 10.0, 14.0, 16.0)
                if n.maybe_ping(t)]
    assert sent == [0.0, 5.0, 10.0, 16.0]
    assert systemd_path.pending() == [["WATCHDOG=1"]] * 4


def test_watchdog_from_a_simulated_pipeline_loop(systemd_path: FakeSystemd) -> None:
    # 60 s of 100 ms audio blocks: one ping every 15 s of a 30 s watchdog, never a gap >= 30 s.
    env = systemd_path.env(WATCHDOG_USEC="30000000")
    clock = FakeClock(0.0)
    with Notifier(env=env, clock=clock) as n:
        times = []
        for i in range(601):
            clock.t = i / 10
            if n.maybe_ping():  # without an argument the injected clock is read
                times.append(clock.t)
    assert times == [0.0, 15.0, 30.0, 45.0, 60.0]
    assert len(systemd_path.pending()) == 5


def test_no_pings_without_watchdog(systemd_path: FakeSystemd) -> None:
    with Notifier(env=systemd_path.env()) as n:
        assert n.watchdog_interval is None
        assert not any(n.maybe_ping(float(t)) for t in range(100))
    assert systemd_path.pending() == []


def test_explicit_watchdog_resets_the_cadence(systemd_path: FakeSystemd) -> None:
    clock = FakeClock(50.0)
    env = systemd_path.env(WATCHDOG_USEC="4000000")
    with Notifier(env=env, clock=clock) as n:
        assert n.watchdog()
        assert not n.maybe_ping(51.9)
        assert n.maybe_ping(52.0)
    assert systemd_path.pending() == [["WATCHDOG=1"]] * 2


def test_undeliverable_notification_is_logged_once_and_ping_retried(
        short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = short_dir / "notify"  # nobody listening yet
    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"}
    with caplog.at_level(logging.WARNING, logger="agent.daemon.sdnotify"), \
            Notifier(env=env, clock=FakeClock()) as n:
        assert n.ready() is False
        assert n.maybe_ping(0.0) is False
        assert n.status("x") is False
        assert caplog.text.count("cannot notify systemd") == 1
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.bind(str(path))
            # The failed ping is not counted: the next loop iteration retries at once.
            assert n.maybe_ping(0.1) is True
            s.settimeout(RECV_TIMEOUT_S)
            assert s.recv(100) == b"WATCHDOG=1"
