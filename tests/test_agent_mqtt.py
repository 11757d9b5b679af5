"""The whole agent (`python -m agent run`, a real process) against a real mosquitto (issue 5).

What is shown, one test each: a 30 s broker outage mid-stream loses and duplicates nothing (after
dedup) and leaves the decisions untouched; windows queued by an agent SIGKILLed while the broker
is down are delivered by the next start, marked historical, and the last will reports a killed
agent offline; a broker that never comes up changes no decision, keeps the outbox within its
bound and ends the run with the one-line drain error; every stats/alarm payload, live or
replayed, validates against docs/*.schema.json and fits in 8 KB.

Waits are on events (paho callbacks into queues, the agent's stderr lines, process exit), each
with a bound; the only timed wait is the outage itself.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tests.mqtt_fixtures import (
    Broker,
    BrokerFactory,
    Received,
    Subscriber,
    free_port,
    mosquitto,
)

__all__ = ["mosquitto"]  # the fixture, imported so pytest finds it here

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "agent" / "demo" / "demo-digits.flac"  # bundled, ~21.5 s: always available
OUTBOX = "telemetry-outbox.sqlite3"
MAX_PAYLOAD = 8192
VALIDATORS = {kind: Draft202012Validator(json.loads((ROOT / "docs" / f"{kind}.schema.json")
                                                    .read_text()))
              for kind in ("stats", "alarm")}
# Fast reconnects: the default back-off (1 s doubling to 60 s) could sleep ~30 s past the end
# of a 30 s outage; the back-off itself is unit-tested in test_mqtt.py.
FAST_RECONNECT = ("--telemetry-reconnect-min-s", "0.2", "--telemetry-reconnect-max-s", "2")
# A rule on the per-window speech ratio that flips on the demo recording with 2 s windows
# (scored on the window alone: drift span = window), so raised and cleared alarms both occur.
ALARM_RULES = """
[alarms.vad_speech_ratio]
on = "value_low"
stat = "mean"
threshold = 0.2
raise_after = 1
clear_after = 1
min_count = 1
"""


# -- the agent as a process -------------------------------------------------------------------
class Agent:
    """`python -m agent run ...` with its stderr collected line by line, so a test can await
    what the agent says ("telemetry connected", ...) instead of sleeping."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", *args], cwd=ROOT,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def stderr(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_line(self, text: str, timeout_s: float, nth: int = 1) -> str:
        """The `nth` stderr line containing `text` (fails on timeout or process exit)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                hits = [ln for ln in self.lines if text in ln]
                if len(hits) >= nth:
                    return hits[nth - 1]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._reader.is_alive():
                    raise AssertionError(f"agent never logged {text!r} (x{nth}); exit "
                                         f"{self.proc.poll()}; stderr:\n" + "\n".join(self.lines))
                self._cond.wait(remaining)

    def wait(self, timeout_s: float) -> int:
        rc = self.proc.wait(timeout_s)
        self._reader.join(5)
        return rc

    def sigkill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.wait(5)

    def windows_done(self) -> int:
        """Stats windows the agent says it emitted (its final `done:` log line)."""
        m = re.search(r"(\d+) stats windows", self.wait_line("done:", 1))
        assert m is not None
        return int(m.group(1))


def agent_args(source: Path, tmp: Path, name: str, *extra: str, window: float = 2.0,
               state: Path | None = None) -> list[str]:
    return ["--source", str(source), "--decisions", str(tmp / f"{name}.decisions.jsonl"),
            "--state-dir", str(state or tmp / f"{name}-state"), "--device-id", name,
            "--window", str(window), *extra]


def run_agent(*args: str, timeout_s: float = 60) -> Agent:
    a = Agent(*args)
    try:
        a.wait(timeout_s)
    except subprocess.TimeoutExpired:
        a.sigkill()
        raise AssertionError(f"agent did not finish within {timeout_s} s:\n{a.stderr}") from None
    return a


def decisions(path: Path) -> list[dict[str, Any]]:
    """Decisions without `latency_ms` (wall-clock compute time, the only nondeterministic field)."""
    out = [json.loads(line) for line in path.read_text().splitlines()]
    for d in out:
        d.pop("latency_ms")
    return out


# -- what the operator receives ---------------------------------------------------------------
@dataclass
class Payload:
    """One stats or alarm message, checked against its schema and size on arrival."""

    kind: str
    payload: dict[str, Any]

    @property
    def key(self) -> tuple[str, str, int]:
        p = self.payload
        return p["device_id"], p["boot_id"], p["seq"]


def check_payload(m: Received) -> Payload:
    kind = m.topic.rsplit("/", 1)[1]
    assert len(m.payload) <= MAX_PAYLOAD, f"{m.topic} payload is {len(m.payload)} bytes"
    payload = m.json()
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in VALIDATORS[kind].iter_errors(payload)]
    assert not errors, (f"{kind} payload (historical={payload.get('historical')}) breaks "
                        f"docs/{kind}.schema.json: {errors}")
    return Payload(kind, payload)


@dataclass
class Log:
    """Everything an operator's subscriber got for one device, in arrival order."""

    data: list[Payload] = field(default_factory=list)
    status: list[bytes] = field(default_factory=list)

    def add(self, m: Received) -> None:
        kind = m.topic.rsplit("/", 1)[1]
        if kind in VALIDATORS:
            self.data.append(check_payload(m))
        elif kind == "status":
            self.status.append(m.payload)

    def first_occurrences(self) -> list[Payload]:
        """Dedup by (device, boot, seq), as consumers do: QoS 1 is at-least-once."""
        seen: set[tuple[str, str, int]] = set()
        out = []
        for r in self.data:
            if r.key not in seen:
                seen.add(r.key)
                out.append(r)
        return out


def subscribe(broker: Broker, dev: str) -> Subscriber:
    # A persistent session on a broker with persistence: QoS 1 messages queued for us survive
    # the broker's restart, and the subscriber resubscribes on every reconnect anyway.
    return Subscriber(broker, f"eva/{dev}/#", client_id=f"operator-{dev}", persistent=True)


def pump(sub: Subscriber, log: Log, until: Any, timeout_s: float) -> Received:
    """Record messages into `log` until one satisfies `until` (it is recorded too)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = sub.get(max(0.0, deadline - time.monotonic()))
        log.add(m)
        if until(m):
            return m


def pump_to_end(sub: Subscriber, log: Log, dev: str, timeout_s: float = 15) -> None:
    """Record everything up to a marker published after the agent's last acknowledged message.

    The agent exited with its outbox drained, so the broker holds all its messages; the marker
    goes into our session's queue behind them, so when it arrives nothing is still on its way.
    """
    token = uuid.uuid4().hex.encode()
    info = sub.client.publish(f"eva/{dev}/end-of-test", token, qos=1)
    info.wait_for_publish(5)
    pump(sub, log, lambda m: m.payload == token, timeout_s)


def outbox_rows(state: Path) -> list[dict[str, Any]]:
    """The payloads waiting in an agent's outbox, oldest first (read-only; the agent may run)."""
    path = state / OUTBOX
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        rows = db.execute("SELECT payload FROM outbox ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # the agent has not created the table yet
        return []
    finally:
        db.close()
    return [json.loads(p) for (p,) in rows]


def wait_outbox(state: Path, ok: Callable[[list[dict[str, Any]]], bool],
                timeout_s: float) -> list[dict[str, Any]]:
    """The outbox's rows once `ok(rows)` holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = outbox_rows(state)
        if ok(rows):
            return rows
        assert time.monotonic() < deadline, f"outbox never got there: {len(rows)} rows"
        time.sleep(0.05)  # polling a file another process writes: there is no event to await


def seqs_complete(items: Iterable[Payload]) -> list[int]:
    return sorted(r.payload["seq"] for r in items)


# -- the tests --------------------------------------------------------------------------------
@pytest.mark.slow
def test_30s_broker_outage_mid_stream_loses_nothing(mosquitto: BrokerFactory, make_stream,
                                                    tmp_path: Path) -> None:
    # 90 s of audio at 2x real time: 45 s of wall time, 5 s windows (one per 2.5 s). The outage
    # starts after the third window arrived (~8 s in) and lasts 30 s, so the agent keeps
    # producing ~12 windows into its outbox and is still streaming when the broker returns.
    wav = make_stream(seconds=90, seed=5).with_suffix(".wav")
    broker = mosquitto(persistence=True)
    ref = run_agent(*agent_args(wav, tmp_path, "ref", "--telemetry", broker.url, window=5))
    assert ref.proc.returncode == 0, ref.stderr

    dev = "dev-outage"
    sub = subscribe(broker, dev)
    log = Log()
    agent = Agent(*agent_args(wav, tmp_path, dev, "--telemetry", broker.url, "--speed", "2",
                              "--drain-timeout", "30", *FAST_RECONNECT, window=5))
    try:
        agent.wait_line("telemetry connected", 15)
        pump(sub, log, lambda m: m.topic.endswith("/stats") and m.json()["seq"] >= 2, 20)
        broker.stop()
        agent.wait_line("telemetry disconnected", 5)
        with pytest.raises(subprocess.TimeoutExpired):  # the outage: the agent must live on
            agent.proc.wait(30)
        before_restart = {r.key for r in log.data}
        broker.start()
        agent.wait_line("telemetry connected", 10, nth=2)
        assert agent.wait(60) == 0, agent.stderr
        pump_to_end(sub, log, dev)
    finally:
        agent.sigkill()
        sub.close()

    got = log.first_occurrences()
    assert len({r.payload["boot_id"] for r in got}) == 1
    last = max(r.payload["seq"] for r in got)
    assert seqs_complete(got) == list(range(last + 1))  # every seq 0..last, once after dedup
    assert [r.payload["seq"] for r in got] == list(range(last + 1))  # and in order
    stats = [r for r in got if r.kind == "stats"]
    assert len(stats) == agent.windows_done()
    bounds = [(r.payload["window"]["start_s"], r.payload["window"]["end_s"]) for r in stats]
    assert bounds[0][0] == 0 and bounds[-1][1] == pytest.approx(90.0, abs=0.1)
    assert all(b[0] == a[1] for a, b in zip(bounds, bounds[1:], strict=False))  # no gap
    assert len({r.key for r in got} - before_restart) >= 10  # held in the outbox meanwhile
    assert decisions(tmp_path / f"{dev}.decisions.jsonl") == \
        decisions(tmp_path / "ref.decisions.jsonl")


def test_sigkill_while_broker_down_replays_historical_and_will_says_offline(
        mosquitto: BrokerFactory, tmp_path: Path) -> None:
    dev, state = "dev-crash", tmp_path / "state"
    broker = mosquitto(persistence=True)
    sub = subscribe(broker, dev)
    log = Log()
    run_args = [*FAST_RECONNECT, "--telemetry", broker.url]
    agents: list[Agent] = []
    try:
        # 1. The will needs a live connection to die: kill a connected agent first.
        a = Agent(*agent_args(DEMO, tmp_path, dev, *run_args, "--speed", "2", state=state))
        agents.append(a)
        pump(sub, log, lambda m: m.topic.endswith("/status") and m.payload == b"online", 15)
        pump(sub, log, lambda m: m.topic.endswith("/stats"), 10)
        a.sigkill()  # no clean close can run: only the broker's will can say "offline"
        pump(sub, log, lambda m: m.topic.endswith("/status"), 5)
        assert log.status[-2:] == [b"online", b"offline"]
        boots_a = {r.payload["boot_id"] for r in log.data}

        # 2. Broker down; the next agent queues windows on disk and is killed mid-stream.
        broker.stop()
        b = Agent(*agent_args(DEMO, tmp_path, dev, *run_args, "--speed", "4", state=state))
        agents.append(b)
        b.wait_line("unreachable", 15)
        # a few of its windows on disk (A's unacknowledged rows, if any, are there too)
        wait_outbox(state, lambda rows: sum(p["boot_id"] not in boots_a for p in rows) >= 3, 15)
        b.sigkill()
        assert b.proc.returncode == -signal.SIGKILL
        queued = outbox_rows(state)
        queued_keys = {(p["device_id"], p["boot_id"], p["seq"]) for p in queued}
        (boot_b,) = {p["boot_id"] for p in queued} - boots_a

        # 3. Broker back, agent restarted: the queued windows arrive first, marked historical.
        broker.start()
        c = run_agent(*agent_args(DEMO, tmp_path, dev, *run_args, "--drain-timeout", "20",
                                  state=state))
        agents.append(c)
        assert c.proc.returncode == 0, c.stderr
        pump_to_end(sub, log, dev)
    finally:
        for ag in agents:
            ag.sigkill()
        sub.close()

    got = log.first_occurrences()
    # Every queued message came back marked historical (A's in-flight rows may also have
    # arrived live before the kill: dedup keeps that copy, so look at every copy).
    assert queued_keys <= {r.key for r in log.data if r.payload.get("historical") is True}
    assert all(r.payload.get("historical") is True for r in log.data
               if r.payload["boot_id"] == boot_b)
    boots_c = {r.payload["boot_id"] for r in got} - boots_a - {boot_b}
    assert len(boots_c) == 1, boots_c
    c_msgs = [r for r in got if r.payload["boot_id"] in boots_c]
    assert not any(r.payload.get("historical") for r in c_msgs)
    assert seqs_complete(c_msgs) == list(range(len(c_msgs)))
    assert sum(r.kind == "stats" for r in c_msgs) == c.windows_done()
    # the outbox replays in order: the killed agent's windows before the new boot's first
    keys = [r.key for r in got]
    assert max(keys.index(k) for k in queued_keys if k in keys) < keys.index(c_msgs[0].key)
    assert log.status[-1] == b"offline"  # the clean close at the end says so itself


def test_broker_never_up_pipeline_unaffected_outbox_bounded(tmp_path: Path) -> None:
    ref = run_agent(*agent_args(DEMO, tmp_path, "ref", "--telemetry", "none"))
    assert ref.proc.returncode == 0, ref.stderr
    dev, port, bound = "dev-nobroker", free_port(), 3  # nothing listens on the port
    t0 = time.monotonic()
    a = run_agent(*agent_args(DEMO, tmp_path, dev, "--telemetry", f"mqtt://127.0.0.1:{port}",
                              "--telemetry-outbox-max-messages", str(bound),
                              "--drain-timeout", "1", *FAST_RECONNECT))
    elapsed = time.monotonic() - t0
    assert a.proc.returncode not in (0, None), a.stderr
    errors = [ln for ln in a.lines if ln.startswith("edge-voice-agent: error:")]
    assert errors == [a.lines[-1]], a.stderr  # exactly one error line, and it is the last
    assert "telemetry outbox not drained within 1 s" in errors[0]
    assert 1.0 <= elapsed < 20, "the exit was not bounded by the 1 s drain timeout"

    assert decisions(tmp_path / f"{dev}.decisions.jsonl") == \
        decisions(tmp_path / "ref.decisions.jsonl")
    rows = outbox_rows(tmp_path / f"{dev}-state")
    assert len(rows) == bound  # the newest `bound` messages, the older ones dropped and counted
    seqs = [p["seq"] for p in rows]
    assert seqs == list(range(seqs[0], seqs[0] + bound))
    assert sum(p.get("outbox_dropped", 0) for p in rows) + len(rows) == seqs[-1] + 1
    assert a.windows_done() >= 10  # 21.5 s in 2 s windows: far more messages than the bound
    for p in rows:  # what will eventually be sent is still valid, drop count included
        kind = "alarm" if "metric" in p else "stats"
        assert not list(VALIDATORS[kind].iter_errors(p)), p


def test_every_payload_live_and_replayed_validates_and_fits(mosquitto: BrokerFactory,
                                                            tmp_path: Path) -> None:
    dev, state = "dev-schema", tmp_path / "state"
    conf = tmp_path / "alarms.toml"
    conf.write_text(ALARM_RULES)
    broker = mosquitto(persistence=True, start=False)
    args = ["--config", str(conf), "--monitoring-drift-span-s", "2", "--telemetry", broker.url,
            *FAST_RECONNECT]
    # First run with the broker down: all its messages stay in the outbox (replayed later,
    # marked historical); then a run with the broker up sends those and its own live ones.
    first = run_agent(*agent_args(DEMO, tmp_path, dev, *args, "--drain-timeout", "0.5",
                                  state=state))
    assert first.proc.returncode != 0, first.stderr
    assert len(outbox_rows(state)) > first.windows_done()  # stats and alarms queued
    broker.start()
    sub = subscribe(broker, dev)
    log = Log()
    try:
        second = run_agent(*agent_args(DEMO, tmp_path, dev, *args, "--drain-timeout", "20",
                                       state=state))
        assert second.proc.returncode == 0, second.stderr
        pump_to_end(sub, log, dev)  # check_payload validated each one on arrival
    finally:
        sub.close()

    got = log.first_occurrences()
    kinds = {(r.kind, r.payload.get("historical", False)) for r in got}
    assert kinds == {("stats", True), ("stats", False), ("alarm", True), ("alarm", False)}
    assert {r.payload["state"] for r in got if r.kind == "alarm"} == {"raised", "cleared"}
