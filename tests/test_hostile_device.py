"""A hostile retained rollout command cannot crash the device (issue 20, row 5 and 12).

A retained 3,000-byte message nested 1,500 deep made json.loads raise RecursionError in the
agent, and since the broker keeps it, the device crash-looped. Commands are now bounded in
size and depth before decoding and refused with one event and one log line; patterns are
full matches (a trailing newline used to pass `^...$`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.rollout.command import CommandError, parse
from tests.mqtt_fixtures import BrokerFactory, Subscriber, mosquitto  # noqa: F401
from tests.test_rollout_mqtt import publish

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "agent" / "demo" / "demo-digits.flac"
GOOD = {"schema": 1, "id": "r-1", "model": {"name": "fsdd-digits", "version": "1.0.0",
                                            "sha256": "a" * 64}, "percent": 10, "mode": "shadow"}
DEEP = b"[" * 1500 + b"]" * 1500


def test_nested_and_newline_commands_are_refused_with_a_reason() -> None:
    assert parse(json.dumps(GOOD).encode()).version == "1.0.0"
    with pytest.raises(CommandError, match="nested deeper"):
        parse(DEEP)
    with pytest.raises(CommandError, match="nested deeper"):
        parse(b'{"a": ' + b'{"b": ' * 20 + b"1" + b"}" * 21)
    # brackets inside strings do not count; a string cannot hide the real nesting either
    assert parse(json.dumps({**GOOD, "id": "r-1"}).encode().replace(b'"r-1"', b'"r-1"'))
    with pytest.raises(CommandError):
        parse(json.dumps({**GOOD, "id": "[[[[[[[[" * 3}).encode())
    for key, bad in (("version", "1.0.0\n"), ("name", "fsdd\n"), ("sha256", "a" * 64 + "\n")):
        with pytest.raises(CommandError, match="is not valid"):
            parse(json.dumps({**GOOD, "model": {**GOOD["model"], key: bad}}).encode())
    with pytest.raises(CommandError, match="is not valid"):
        parse(json.dumps({**GOOD, "id": "r-1\n"}).encode())


def test_the_agent_finishes_its_stream_with_a_hostile_retained_command_waiting(
        mosquitto: BrokerFactory, tmp_path: Path) -> None:  # noqa: F811
    broker = mosquitto()
    publish(broker, "eva/fleet/rollout", DEEP)          # retained: waiting before the start
    sub = Subscriber(broker, "eva/dev-h/#")
    try:
        r = subprocess.run(
            [sys.executable, "-m", "agent", "run", "--source", str(DEMO), "--telemetry",
             broker.url, "--device-id", "dev-h", "--state-dir", str(tmp_path / "state"),
             "--decisions", str(tmp_path / "d.jsonl"), "--window", "5"],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        refused = [ln for ln in r.stderr.splitlines() if "rollout refused" in ln]
        assert len(refused) == 1 and "nested deeper" in refused[0], r.stderr[-3000:]
        e = sub.wait_for(lambda m: m.topic == "eva/dev-h/event", 20).json()
        assert (e["event"], e["state"]) == ("rollout_refused", "refused")
        assert "nested deeper" in e["reason"]
    finally:
        sub.close()
