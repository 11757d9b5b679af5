"""Message format, line sinks, sink spec parsing, device ids and back-off."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.telemetry import (
    SINK_FORMS,
    FileSink,
    Message,
    NullSink,
    Sink,
    StdoutSink,
    derive_device_id,
    make_sink,
    parse_sink_spec,
    resolve_device_id,
    topic,
)
from agent.telemetry.mqtt import backoff_delay

LINE_KEYS = {"topic", "payload", "qos", "retain"}


def _stats(seq: int) -> Message:
    return Message(topic("eva", "dev1", "stats"), {"schema": 1, "seq": seq, "note": "é"})


def test_topic_helper_and_validation() -> None:
    assert topic("eva", "dev-1", "stats") == "eva/dev-1/stats"
    assert topic(None, "d", "alarm") == "eva/d/alarm"
    assert topic("site/a", "d", "birth") == "site/a/d/birth"
    for bad_dev in ("a/b", "a+", "#", "", "x" * 65):
        with pytest.raises(ValueError, match="device id"):
            topic("eva", bad_dev, "stats")
    with pytest.raises(ValueError, match="kind"):
        topic("eva", "d", "audio")
    with pytest.raises(ValueError):
        Message("eva/+/stats", {})
    with pytest.raises(ValueError):
        Message("eva/d/stats", {}, qos=3)


def test_json_line_is_one_object_with_the_contract_keys() -> None:
    m = Message("eva/d/alarm", {"state": "raised", "value": 1.5, "text": "line\nbreak"},
                qos=1, retain=False)
    line = m.to_json_line()
    assert line.endswith("\n") and line.count("\n") == 1
    d = json.loads(line)
    assert set(d) == LINE_KEYS
    assert d == {"topic": "eva/d/alarm", "payload": m.payload, "qos": 1, "retain": False}
    assert Message.from_json_line(line) == m
    with pytest.raises(ValueError):  # NaN is not JSON; it must not reach a consumer
        Message("eva/d/stats", {"x": float("nan")}).to_json_line()


def test_file_sink_appends_birth_then_messages(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "telemetry.jsonl"
    sink = make_sink(f"file:{path}", device_id="dev1", birth={"schema": 1, "boot_id": "b1"})
    assert isinstance(sink, FileSink) and isinstance(sink, Sink)
    for i in range(3):
        sink.publish(_stats(i))
    # flushed per message: a reader sees every line before close
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4
    assert sink.close() is True
    assert sink.stats()["delivered"] == 4
    sink2 = FileSink(path)  # a second run appends, never truncates
    sink2.publish(_stats(3))
    sink2.close()
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert all(set(r) == LINE_KEYS for r in rows)
    assert rows[0] == {"topic": "eva/dev1/birth", "payload": {"schema": 1, "boot_id": "b1"},
                       "qos": 1, "retain": True}
    assert [r["payload"]["seq"] for r in rows[1:]] == [0, 1, 2, 3]
    assert rows[1]["payload"]["note"] == "é"
    with pytest.raises(RuntimeError):
        sink.publish(_stats(9))


def test_stdout_sink_writes_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    sink = make_sink("stdout")
    assert isinstance(sink, StdoutSink)
    sink.publish(_stats(0))
    sink.publish(_stats(1))
    assert sink.close() is True
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(x)["payload"]["seq"] for x in out] == [0, 1]
    buf = io.StringIO()
    StdoutSink(buf).publish(_stats(5))
    assert json.loads(buf.getvalue())["topic"] == "eva/dev1/stats"


def test_null_sink() -> None:
    sink = make_sink("none")
    assert isinstance(sink, NullSink) and isinstance(sink, Sink)
    sink.publish(_stats(0))
    s = sink.stats()
    assert (s["delivered"], s["queued"], s["dropped"], s["connected"]) == (0, 0, 0, False)
    assert s["discarded"] == 1 and sink.close(0) is True


@pytest.mark.parametrize("spec,expected", [
    ("none", ("none", "", 0)),
    ("stdout", ("stdout", "", 0)),
    ("file:/tmp/x.jsonl", ("file", "/tmp/x.jsonl", 0)),
    ("mqtt://broker.example:1884", ("mqtt", "broker.example", 1884)),
    ("mqtts://10.0.0.2:8884", ("mqtts", "10.0.0.2", 8884)),
    ("mqtts://broker", ("mqtts", "broker", 8883)),
    ("mqtt://[::1]:1883", ("mqtt", "::1", 1883)),
])
def test_parse_sink_spec(spec: str, expected: tuple[str, str, int]) -> None:
    assert parse_sink_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", "kafka://x:1", "file:", "mqtt://", "mqtt://h:0",
                                  "mqtt://h:99999", "mqtt://h:x", "mqtt://h:1883/topic",
                                  "mqtt://u:p@h:1883", "STDOUT"])
def test_bad_sink_spec_is_one_line_naming_value_and_forms(spec: str) -> None:
    with pytest.raises(ConfigError) as e:
        make_sink(spec)
    msg = str(e.value)
    assert "\n" not in msg and repr(spec) in msg and SINK_FORMS in msg
    assert e.value.exit_code == 2


def test_mqtt_sink_needs_device_id_and_state_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="device id"):
        make_sink("mqtt://127.0.0.1:1883", state_dir=tmp_path)
    with pytest.raises(ConfigError, match="state directory"):
        make_sink("mqtt://127.0.0.1:1883", device_id="d1")


def test_device_id_is_a_salted_hash_never_the_machine_id(tmp_path: Path) -> None:
    mid = "0123456789abcdef0123456789abcdef"
    f = tmp_path / "machine-id"
    f.write_text(mid + "\n")
    dev = resolve_device_id("", machine_id_paths=(str(tmp_path / "missing"), str(f)))
    assert dev == derive_device_id(mid) and len(dev) == 16
    assert dev not in mid and mid[:8] not in dev
    assert derive_device_id(mid, salt="other") != dev  # the salt matters
    assert derive_device_id("ffff" + mid[4:]) != dev
    assert resolve_device_id("kitchen-01") == "kitchen-01"
    with pytest.raises(ConfigError, match="device_id"):
        resolve_device_id("a/b")
    with pytest.raises(ConfigError, match="--device-id"):
        resolve_device_id("", machine_id_paths=(str(tmp_path / "missing"),))


def test_backoff_is_exponential_capped_and_jittered() -> None:
    rng = random.Random(1)
    for attempt in range(12):
        cap = min(30.0, 0.5 * 2 ** attempt)
        ds = [backoff_delay(attempt, 0.5, 30.0, rng) for _ in range(50)]
        assert all(cap / 2 <= d <= cap for d in ds)
        assert len(set(ds)) > 1  # jitter: devices do not reconnect in lock-step
    assert backoff_delay(1000, 0.5, 30.0, rng) <= 30.0
