"""The telemetry link over days: a dead paho network thread is restarted and counted, and a
link that will not come up is logged with its real cause, once per cause (real mosquitto)."""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent import config as config_mod
from agent.daemon import service
from agent.resources import demo_audio
from agent.telemetry import Message, make_sink, topic
from agent.telemetry import mqtt as mqtt_mod
from agent.telemetry.mqtt import MqttOptions, MqttSink
from tests.mqtt_fixtures import BrokerFactory, Pki, Subscriber, free_port, mosquitto, pki

__all__ = ["mosquitto", "pki"]

FAST = MqttOptions(reconnect_min_s=0.05, reconnect_max_s=0.3, keepalive_s=5)
LOGGER = "agent.telemetry.mqtt"


def wait(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def kill_network_thread(sink: MqttSink) -> None:
    """Make paho's loop raise, as time.sleep's OSError did in the field: the thread dies."""
    client, thread = sink._client, sink._net_thread
    assert thread is not None and thread.is_alive()

    def boom(*_a: object, **_k: object) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    client._loop = boom  # type: ignore[method-assign]
    thread.join(5)
    assert not thread.is_alive()


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def stats_msg(seq: int) -> Message:
    return Message(topic("eva", "dev-t", "stats"), {"schema": 1, "device_id": "dev-t",
                                                    "seq": seq})


def test_dead_network_thread_is_logged_restarted_and_delivery_resumes(
        mosquitto: BrokerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broker = mosquitto()
    sub = Subscriber(broker, "eva/dev-t/stats")
    sink = make_sink(broker.url, device_id="dev-t", state_dir=tmp_path, mqtt=FAST)
    assert isinstance(sink, MqttSink)
    caplog.set_level(logging.INFO, LOGGER)
    try:
        assert sink.wait_connected(5)
        sink.publish(stats_msg(0))
        assert sub.wait_for(lambda m: m.json()["seq"] == 0).json()["seq"] == 0
        kill_network_thread(sink)
        sink.publish(stats_msg(1))  # committed while telemetry is dead: must still arrive
        wait(lambda: sink.stats()["restarts"] == 1, 5, "the supervisor to restart paho")
        assert sub.wait_for(lambda m: m.json()["seq"] == 1, 10).json()["seq"] == 1
        assert sink.wait_drained(5)
        (line,) = lines(caplog, "network thread died")
        assert "Invalid argument" in line and "\n" not in line
        assert sink.stats()["connected"]
    finally:
        sink.close(0)
        sub.close()


def test_restart_shows_in_the_system_stage_metrics(
        mosquitto: BrokerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broker = mosquitto()
    sub = Subscriber(broker, "eva/dev-s/stats")
    sinks: list[MqttSink] = []
    real = service.build_sink

    def build(*a: object) -> object:
        s = real(*a)  # type: ignore[arg-type]
        sinks.append(s)  # type: ignore[arg-type]
        return s

    monkeypatch.setattr(service, "build_sink", build)
    cfg = config_mod.load(None, {
        "agent.state_dir": str(tmp_path), "agent.device_id": "dev-s",
        "output.decisions": str(tmp_path / "d.jsonl"), "telemetry.sink": broker.url,
        "telemetry.reconnect_min_s": 0.05, "telemetry.reconnect_max_s": 0.3,
        "monitoring.window_s": 1.0, "audio.source": str(demo_audio()), "audio.speed": 4.0})
    out: list[service.RunSummary] = []
    runner = threading.Thread(target=lambda: out.append(service.run(cfg)), daemon=True)
    runner.start()
    try:
        wait(lambda: bool(sinks) and sinks[0].wait_connected(0), 10, "the agent to connect")
        kill_network_thread(sinks[0])
        runner.join(30)
        assert out and out[0].drained
        by_seq: dict[int, dict] = {}  # at-least-once: a resend after the restart is a dup
        while len(by_seq) < out[0].windows:
            p = sub.get(10).json()
            by_seq[p["seq"]] = p
    finally:
        sub.close()
    stats = list(by_seq.values())
    restarts = [p["metrics"]["telemetry_restarts"]["count"] for p in stats]
    assert sum(restarts) == 1, restarts  # every window arrived, one of them counts the restart
    assert stats[0]["metrics"]["telemetry_restarts"]["stage"] == "system"


def test_tls_certificate_failure_is_logged_with_its_real_cause_once(
        mosquitto: BrokerFactory, pki: Pki, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    broker = mosquitto(tls=pki)
    caplog.set_level(logging.INFO, LOGGER)
    # no ca_file: the system trust store does not know the test CA
    sink = make_sink(f"mqtts://127.0.0.1:{broker.port}", device_id="dev-tls",
                     state_dir=tmp_path, mqtt=FAST)
    try:
        wait(lambda: len(sink._client._out_packet) == 0 and sink._attempt >= 4, 10,  # type: ignore[attr-defined]
             "several attempts")
    finally:
        sink.close(0)
    (line,) = lines(caplog, "unreachable")
    assert "CERTIFICATE_VERIFY_FAILED" in line and "ca_file" in line


def test_refused_connection_is_named_once_not_per_attempt(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    sink = make_sink(f"mqtt://127.0.0.1:{free_port()}", device_id="dev-r",
                     state_dir=tmp_path, mqtt=FAST)
    try:
        wait(lambda: sink._attempt >= 4, 10, "several attempts")  # type: ignore[attr-defined]
    finally:
        sink.close(0)
    (line,) = lines(caplog, "unreachable")
    assert "connection refused" in line


def test_broker_that_accepts_tcp_but_never_answers_connect_is_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mqtt_mod, "CONNACK_WAIT_S", 0.5)
    caplog.set_level(logging.INFO, LOGGER)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # the kernel completes the handshake; nobody ever reads or answers
    port = server.getsockname()[1]
    sink = make_sink(f"mqtt://127.0.0.1:{port}", device_id="dev-silent", state_dir=tmp_path,
                     mqtt=FAST)
    try:
        wait(lambda: bool(lines(caplog, "did not answer MQTT CONNECT")), 5, "the log line")
        time.sleep(1.0)  # several supervisor passes (every 0.5 s) with the cause unchanged
        (line,) = lines(caplog, "did not answer MQTT CONNECT")
        assert f"127.0.0.1:{port}" in line and not lines(caplog, "unreachable")
        assert not sink.stats()["connected"]
    finally:
        sink.close(0)
        server.close()
    json.dumps(sink.stats())  # stats stay serialisable with the new counter


def test_a_thread_that_keeps_dying_is_restarted_with_back_off(
        mosquitto: BrokerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broker = mosquitto()
    sink = make_sink(broker.url, device_id="dev-b", state_dir=tmp_path, mqtt=FAST)
    assert isinstance(sink, MqttSink)
    caplog.set_level(logging.INFO, LOGGER)
    try:
        assert sink.wait_connected(5)
        dead = sink._client
        kill_network_thread(sink)
        wait(lambda: sink.stats()["restarts"] == 1, 5, "the first restart")
        first = time.monotonic()
        # the new client's thread can run before the sink holds the new client: wait for both
        wait(lambda: sink._client is not dead and sink._net_thread is not None
             and sink._net_thread.is_alive(), 5, "the new client and its network thread")
        kill_network_thread(sink)
        wait(lambda: sink.stats()["restarts"] == 2, 10, "the second restart")
        assert time.monotonic() - first >= 0.9  # not at once: 1 s back-off after a recent one
        assert len(lines(caplog, "network thread died")) == 2
        assert sink.wait_connected(5)
    finally:
        sink.close(0)


def test_a_watched_threads_death_is_kept_and_other_threads_still_reach_the_previous_hook(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))

    def die(why: str) -> None:
        raise OSError(errno.EINVAL, why)

    watched = threading.Thread(target=die, args=("watched",))
    kept = mqtt_mod.keep_death(watched)
    other = threading.Thread(target=die, args=("other",))
    for t in (watched, other):
        t.start()
        t.join(5)
    assert [e.strerror for e in kept] == ["watched"]  # type: ignore[attr-defined]
    assert [e.strerror for e in seen] == ["other"]  # type: ignore[attr-defined]
