"""The daemon's life as a systemd service: notify protocol, SIGTERM, SIGHUP, device loss.

The agent runs as a child process, as systemd runs it, with $NOTIFY_SOCKET pointing at a
datagram socket bound here; its stdout (decisions, `--decisions -`) and stderr (logs) are read
by threads into queues. Every wait is bounded and on an event (a datagram, a line, an exit),
never a bare sleep. Device loss is tested in-process with an injected source factory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from jsonschema import Draft202012Validator

from agent.audio.sources import AudioBlock
from agent.config import Config
from agent.daemon import service
from agent.errors import AgentError
from agent.resources import default_model_dir, demo_audio
from tests.conftest import ROOT

DOCS = ROOT / "docs"
ALARM = Draft202012Validator(json.loads((DOCS / "alarm.schema.json").read_text()))
STATS = Draft202012Validator(json.loads((DOCS / "stats.schema.json").read_text()))
WAIT_S = 10.0  # generous bound for any single event; a healthy run meets each in well under 2 s


class Agent:
    """`edge-voice-agent run` as a child process under a fake systemd."""

    def __init__(self, args: list[str], workdir: Path, watchdog_usec: int | None = None) -> None:
        self._sockdir = tempfile.TemporaryDirectory(prefix="eva")  # AF_UNIX path ≤ 107 bytes
        path = os.path.join(self._sockdir.name, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        env = {k: v for k, v in os.environ.items()
               if k not in ("WATCHDOG_PID", "WATCHDOG_USEC", "JOURNAL_STREAM")}
        env["NOTIFY_SOCKET"] = path
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", *args], cwd=ROOT,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.stdout: queue.Queue[str | None] = queue.Queue()
        self.stderr: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []
        self.decisions: list[dict] = []
        for stream, q in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            threading.Thread(target=self._read, args=(stream, q), daemon=True).start()
        self.workdir = workdir

    @staticmethod
    def _read(stream, q: queue.Queue) -> None:
        for line in stream:
            q.put(line.rstrip("\n"))
        q.put(None)

    def datagram(self, timeout: float = WAIT_S) -> tuple[float, list[str]]:
        """The next notification's fields and when it arrived; fails the test on timeout."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            pytest.fail(f"no notification within {timeout} s; log: {self.log[-5:]}")
        return time.monotonic(), data.decode().split("\n")

    def until(self, field: str, timeout: float = WAIT_S) -> list[tuple[float, list[str]]]:
        """Every datagram up to and including the first with a field starting with `field`."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            t, fields = self.datagram(max(0.01, deadline - time.monotonic()))
            seen.append((t, fields))
            if any(f.startswith(field) for f in fields):
                return seen

    def log_line(self, needle: str, timeout: float = WAIT_S) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.stderr.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no log line with {needle!r} within {timeout} s: {self.log[-5:]}")
            if line is None:
                pytest.fail(f"agent ended before logging {needle!r}: {self.log[-5:]}")
            self.log.append(line)
            if needle in line:
                return line

    def decision(self, timeout: float = WAIT_S) -> dict | None:
        """The next decision from stdout; None when stdout closed."""
        line = self.stdout.get(timeout=timeout)
        if line is None:
            return None
        d = json.loads(line)
        self.decisions.append(d)
        return d

    def finish(self, timeout: float = WAIT_S) -> int:
        """Wait for the exit; collect remaining decisions and log lines."""
        rc = self.proc.wait(timeout)
        while self.decision(timeout=2) is not None:
            pass
        while (line := self.stderr.get(timeout=2)) is not None:
            self.log.append(line)
        return rc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.sock.close()
        self._sockdir.cleanup()


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for a in started:
        a.close()


def telemetry(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def common_args(tmp_path: Path, clip: Path, speed: float) -> list[str]:
    return ["--source", str(clip), "--speed", str(speed), "--state-dir", str(tmp_path / "state"),
            "--telemetry", f"file:{tmp_path / 'telemetry.jsonl'}", "--window", "5",
            "--decisions", "-", "--drain-timeout", "1"]


# --- notify protocol and SIGTERM --------------------------------------------------------------
def test_ready_status_watchdog_then_sigterm_flushes_the_partial_window(
        tmp_path: Path, clip: Path, agents: list[Agent]) -> None:
    a = Agent(common_args(tmp_path, clip, speed=2), tmp_path, watchdog_usec=400_000)
    agents.append(a)
    first = a.until("READY=1")
    ready_at, ready = first[-1]
    assert not any("WATCHDOG=1" in f for _, f in first[:-1]), "pinged before READY"
    status = next(f for f in ready if f.startswith("STATUS="))
    assert "clip.wav" in status and "fsdd-digits@" in status and "mode partial" in status
    assert "0 decisions" in status and "alarms: none" in status

    # Pings at half of WATCHDOG_USEC (0.2 s) from the pipeline loop, until a STATUS update that
    # counts decisions (sent at most every 2 s).
    seen = a.until("STATUS=", timeout=4.0)
    pings = [t for t, f in seen if "WATCHDOG=1" in f]
    updated = next(f for f in seen[-1][1] if f.startswith("STATUS="))
    assert "0 decisions" not in updated and " decisions" in updated
    assert seen[-1][0] - ready_at >= 1.9  # rate-limited, not one per decision
    assert len(pings) >= 7
    gaps = np.diff([ready_at, *pings])
    assert gaps.max() < 0.4, f"a gap of {gaps.max():.2f} s would trip a 0.4 s watchdog"
    assert 0.15 < float(np.median(gaps)) < 0.3

    t0 = time.monotonic()
    a.proc.send_signal(signal.SIGTERM)
    assert any(f == ["STOPPING=1"] for _, f in a.until("STOPPING=1", timeout=5.0))
    rc = a.finish(timeout=5.0)
    assert rc == 0 and time.monotonic() - t0 < 5.0
    line = next(x for x in a.log if "SIGTERM received" in x)
    assert "decided if it already has 90 ms of speech" in line and "flushed" in line
    assert all("error" not in x.lower() for x in a.log), a.log

    msgs = telemetry(tmp_path / "telemetry.jsonl")
    stats = [m["payload"] for m in msgs if m["topic"].endswith("/stats")]
    assert stats, "no stats window published"
    last = stats[-1]["window"]
    assert last["end_s"] - last["start_s"] < 5.0 - 1e-3, "the last window should be partial"
    assert last["end_s"] < 10.0  # stopped mid-file, not at its end
    assert stats[-1]["counts"]["frames"] > 0
    assert all(not list(STATS.iter_errors(p)) for p in stats)
    # Decisions stop near the stop point: none after the last window's end.
    assert a.decisions and max(d["decided_at"] for d in a.decisions) <= last["end_s"] + 1e-3


def test_watchdog_pings_come_from_the_pipeline_loop_idle_or_busy_but_not_stuck(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Idle (an empty queue) keeps pinging; a pipeline stuck in the model stops pinging, so
    systemd would restart it; once unstuck the pings resume."""
    from agent.daemon.sdnotify import Notifier
    from agent.recognition.model import ModelRunner

    x, sr = sf.read(str(demo_audio()), dtype="float32", always_2d=True)
    blocks = [AudioBlock(x[i:i + sr // 10], sr) for i in range(0, 3 * sr, sr // 10)]
    stop, idle, stuck, release = (threading.Event() for _ in range(4))

    class PausingMic(FakeMic):
        def __iter__(self) -> Iterator[AudioBlock]:
            yield blocks[0]
            idle.wait(WAIT_S)  # the device delivers nothing until the test says so
            yield from blocks[1:]
            stop.set()

    real = ModelRunner.predict

    def predict(self, features):
        if np.any(features) and not release.is_set():  # the start-up probe is all zeros
            stuck.set()
            release.wait(WAIT_S)
        return real(self, features)

    monkeypatch.setattr(ModelRunner, "predict", predict)
    with tempfile.TemporaryDirectory(prefix="eva") as d, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(os.path.join(d, "notify"))
        notifier = Notifier(env={"NOTIFY_SOCKET": os.path.join(d, "notify"),
                                 "WATCHDOG_USEC": "200000"})  # a ping every 0.1 s
        cfg = Config()
        cfg.agent.state_dir = str(tmp_path / "state")
        cfg.output.decisions = str(tmp_path / "d.jsonl")
        cfg.audio.queue_blocks = 1000
        runner = threading.Thread(target=service.run, args=(cfg, stop), kwargs=dict(
            notifier=notifier, opener=lambda: PausingMic([]), live=True), daemon=True)
        runner.start()

        def pings_during(seconds: float) -> list[float]:
            out, end = [], time.monotonic() + seconds
            while (left := end - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data = sock.recv(4096)
                except TimeoutError:
                    break
                if b"WATCHDOG=1" in data:
                    out.append(time.monotonic())
            return out

        sock.settimeout(WAIT_S)
        while b"READY=1" not in sock.recv(4096):
            pass
        idle_pings = pings_during(0.8)  # nothing to process: the loop waits on the queue
        assert len(idle_pings) >= 6 and np.diff(idle_pings).max() < 0.2
        idle.set()
        assert stuck.wait(WAIT_S)
        sock.settimeout(0.05)
        with contextlib.suppress(TimeoutError):
            while True:
                sock.recv(4096)  # drop what was queued before the model got stuck
        assert pings_during(0.6) == [], "a stuck pipeline must not keep the watchdog happy"
        release.set()
        assert pings_during(0.5), "pings resume once the pipeline moves again"
        runner.join(WAIT_S)
        assert not runner.is_alive()


def test_a_live_device_stuck_in_a_read_withholds_the_watchdog(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A driver that blocks in read() forever raises nothing to reopen on; the loop notices no
    audio for STALL_S and stops pinging, so systemd's watchdog restarts the service."""
    from agent.daemon.sdnotify import Notifier

    monkeypatch.setattr(service, "STALL_S", 0.4)
    x, sr = sf.read(str(demo_audio()), dtype="float32", always_2d=True)
    blocks = [AudioBlock(x[i:i + sr // 10], sr) for i in range(0, sr, sr // 10)]
    stop, delivered, unblock = threading.Event(), threading.Event(), threading.Event()

    class HangingMic(FakeMic):
        def __iter__(self) -> Iterator[AudioBlock]:
            yield from blocks
            delivered.set()
            unblock.wait(WAIT_S)  # the read that never returns
            stop.set()

    with tempfile.TemporaryDirectory(prefix="eva") as d, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(os.path.join(d, "notify"))
        notifier = Notifier(env={"NOTIFY_SOCKET": os.path.join(d, "notify"),
                                 "WATCHDOG_USEC": "200000"})
        cfg = Config()
        cfg.agent.state_dir = str(tmp_path / "state")
        cfg.output.decisions = str(tmp_path / "d.jsonl")
        runner = threading.Thread(target=service.run, args=(cfg, stop), kwargs=dict(
            notifier=notifier, opener=lambda: HangingMic([]), live=True), daemon=True)
        with caplog.at_level(logging.INFO):
            runner.start()
            assert delivered.wait(WAIT_S)
            t_last = time.monotonic()
            pings = []
            sock.settimeout(0.1)
            while time.monotonic() < t_last + 1.2:
                with contextlib.suppress(TimeoutError):
                    if b"WATCHDOG=1" in sock.recv(4096):
                        pings.append(time.monotonic() - t_last)
            unblock.set()
            runner.join(WAIT_S)
    assert not runner.is_alive()
    assert pings and min(pings) < 0.3  # healthy while audio was recent
    assert not [p for p in pings if p > 0.6], pings  # then silent: systemd would restart it
    stalled = [r for r in caplog.records if "capture stalled" in r.getMessage()]
    assert len(stalled) == 1 and stalled[0].levelno == logging.ERROR


# --- SIGHUP -------------------------------------------------------------------------------------
def _config(path: Path, threshold: float, extra: str = "") -> Path:
    path.write_text(f"[decision]\nmode = \"partial\"\nthreshold = {threshold}\n{extra}")
    return path


def test_sighup_applies_a_new_threshold_between_blocks(tmp_path: Path, clip: Path,
                                                       agents: list[Agent]) -> None:
    cfg = _config(tmp_path / "config.toml", 0.0)
    a = Agent(["--config", str(cfg), *common_args(tmp_path, clip, speed=4)], tmp_path)
    agents.append(a)
    a.until("READY=1")
    first = a.decision()
    assert first is not None and first["accepted"] is True  # threshold 0: everything acts

    _config(cfg, 1.0, "[audio]\nblock_ms = 50\n")
    a.proc.send_signal(signal.SIGHUP)
    reload_fields = [f for _, fs in a.until("READY=1") for f in fs]
    assert "RELOADING=1" in reload_fields
    assert any(f.startswith("MONOTONIC_USEC=") for f in reload_fields)
    line = a.log_line("reloaded at audio")
    at = float(line.split("reloaded at audio ")[1].split(" s")[0])
    assert "threshold 1.000" in line
    restart = a.log_line("need a restart")
    assert "audio.block_ms" in restart and "decision" not in restart
    assert a.finish() == 0

    before = [d for d in a.decisions if d["decided_at"] <= at]
    after = [d for d in a.decisions if d["decided_at"] > at]
    assert before and all(d["accepted"] for d in before if d["label"] != "unknown")
    assert len(after) >= 2, a.decisions
    assert all(not d["accepted"] for d in after if d["confidence"] < 1.0)
    assert any(d["confidence"] < 1.0 for d in after)


def test_sighup_with_a_broken_config_is_refused_and_the_old_one_keeps_running(
        tmp_path: Path, clip: Path, agents: list[Agent]) -> None:
    cfg = _config(tmp_path / "config.toml", 0.0)
    a = Agent(["--config", str(cfg), *common_args(tmp_path, clip, speed=4)], tmp_path)
    agents.append(a)
    a.until("READY=1")
    assert a.decision() is not None

    cfg.write_text('[decision]\nthreshold = "high"\n')
    a.proc.send_signal(signal.SIGHUP)
    fields = [f for _, fs in a.until("READY=1") for f in fs]
    assert "RELOADING=1" in fields
    refused = a.log_line("reload refused")
    assert "decision.threshold" in refused and "previous configuration keeps running" in refused
    n_before = len(a.decisions)
    assert a.finish() == 0
    assert len(a.decisions) >= n_before + 2, "decisions must continue after the refusal"
    # still threshold 0: every digit decision acts (the rejector's "unknown" never does)
    assert all(d["accepted"] for d in a.decisions if d["label"] != "unknown")
    assert any(d["accepted"] for d in a.decisions)
    assert sum("reload refused" in x for x in a.log) == 1
    assert not any("Traceback" in x for x in a.log)

    alarms = [m["payload"] for m in telemetry(tmp_path / "telemetry.jsonl")
              if m["topic"].endswith("/alarm")]
    (alarm,) = [p for p in alarms if p["metric"] == "config_reload_ok"]
    assert alarm["stage"] == "system" and alarm["state"] == "raised"
    assert "decision.threshold" in alarm["reason"]
    assert not list(ALARM.iter_errors(alarm))


def test_reload_parts_refuse_a_tampered_model(tmp_path: Path) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(default_model_dir(), model)
    with open(model / "embedding_model.onnx", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    cfg = Config()
    cfg.model.path = str(model)
    cfg.decision.threshold = 0.5
    with pytest.raises(AgentError, match="embedding_model.onnx .*sha256") as e:
        service.build_live_parts(cfg, 16000)
    assert "\n" not in str(e.value)
    cfg.model.path = ""
    parts = service.build_live_parts(cfg, 16000)  # the bundled model builds completely
    assert parts.policy.threshold == 0.5 and parts.rules
    with pytest.raises(AgentError, match="another rate needs a restart"):
        service.build_live_parts(cfg, 8000)


def test_restart_needed_names_only_settings_a_reload_cannot_apply() -> None:
    old, new = Config(), Config()
    new.decision.threshold = 0.7
    new.alarms = {"snr_db": {"on": "drift", "threshold": 0.5}}
    new.monitoring.k = 5
    assert service.restart_needed(old, new) == []
    new.audio.source = "mic:USB"
    new.agent.state_dir = "/elsewhere"
    new.monitoring.window_s = 30.0
    assert service.restart_needed(old, new) == ["agent.state_dir", "audio.source",
                                                "monitoring.window_s"]
    merged = service.merge_live(old, new)
    assert merged.decision.threshold == 0.7 and merged.monitoring.k == 5
    assert merged.audio.source == "mic" and merged.monitoring.window_s == 60.0


# --- device loss ------------------------------------------------------------------------------
class FakeMic:
    """A live source over prepared blocks that raises like an unplugged device after `fail_at`
    blocks; with `then` set, it calls it after its last block (the test's stop)."""

    live = True

    def __init__(self, blocks: list[AudioBlock], fail_at: int | None = None,
                 then=None) -> None:
        self.blocks, self.fail_at, self.then = blocks, fail_at, then

    def __iter__(self) -> Iterator[AudioBlock]:
        for i, b in enumerate(self.blocks):
            if i == self.fail_at:
                raise AgentError("microphone 'Fake USB Mic' failed while reading "
                                 "(Unanticipated host error); is it still connected?")
            yield b
        if self.then is not None:
            self.then()

    def describe(self) -> str:
        return "microphone 'Fake USB Mic' (8000 Hz, 1 ch)"


class FlakyOpener:
    """Open 1 works and fails after `first` blocks; the next `failures` opens fail (device
    gone); then one works through the remaining blocks and stops the run."""

    def __init__(self, blocks: list[AudioBlock], first: int, failures: int,
                 stop: threading.Event) -> None:
        self.blocks, self.first, self.failures, self.stop = blocks, first, failures, stop
        self.opens = 0

    def __call__(self) -> FakeMic:
        self.opens += 1
        if self.opens == 1:
            return FakeMic(self.blocks[: self.first + 1], fail_at=self.first)
        if self.opens <= 1 + self.failures:
            raise AgentError("no input device matches 'Fake USB Mic'; available: none")
        return FakeMic(self.blocks[self.first:], then=self.stop.set)


def test_a_source_that_fails_and_recovers(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                          ) -> None:
    x, sr = sf.read(str(demo_audio()), dtype="float32", always_2d=True)
    x = x[: 12 * sr]
    step = sr // 10
    blocks = [AudioBlock(x[i:i + step], sr) for i in range(0, len(x), step)]
    first = 60  # unplugged after 6.0 s of audio, between the 4th and 5th digit
    stop = threading.Event()
    opener = FlakyOpener(blocks, first, failures=3, stop=stop)
    retry = service.Retry(first_s=0.03, max_s=0.1, tick_s=0.02)  # waits .03 .06 .1 .1

    cfg = Config()
    cfg.agent.state_dir = str(tmp_path / "state")
    cfg.agent.device_id = "dev-test"
    cfg.telemetry.sink = f"file:{tmp_path / 'telemetry.jsonl'}"
    cfg.monitoring.window_s = 2.0
    cfg.output.decisions = str(tmp_path / "decisions.jsonl")
    cfg.audio.queue_blocks = 10_000  # the fake delivers faster than real time: keep every block
    cfg.decision.mode = "full"
    with caplog.at_level(logging.INFO):
        summary = service.run(cfg, stop, opener=opener, live=True, retry=retry)

    assert opener.opens == 5
    assert summary.stopped and summary.drained
    assert summary.audio_seconds == pytest.approx(len(x) / sr, abs=0.05)
    assert 0.29 <= summary.outage_s < 2.0  # at least the back-off waits, all of it on the clock
    assert summary.clock_s == pytest.approx(summary.audio_seconds + summary.outage_s, abs=0.01)

    lost = [r for r in caplog.records if "lost" in r.getMessage()]
    assert len(lost) == 1 and lost[0].levelno == logging.WARNING  # once, not once per retry
    assert "Unanticipated host error" in lost[0].getMessage()
    assert any("audio source back after" in r.getMessage() for r in caplog.records)

    msgs = telemetry(tmp_path / "telemetry.jsonl")
    alarms = [m["payload"] for m in msgs if m["topic"].endswith("/alarm")]
    outage = [p for p in alarms if p["metric"] == "audio_outage_s"]
    assert [p["state"] for p in outage] == ["raised", "cleared"]
    assert all(p["stage"] == "audio" for p in outage)
    assert "Unanticipated host error" in outage[0]["reason"]
    assert outage[1]["value"] == pytest.approx(summary.outage_s, abs=0.05)
    assert outage[1]["window_end_s"] - outage[0]["window_end_s"] == \
        pytest.approx(summary.outage_s, abs=0.01)
    assert all(not list(ALARM.iter_errors(p)) for p in alarms)

    stats = [m["payload"] for m in msgs if m["topic"].endswith("/stats")]
    assert all(not list(STATS.iter_errors(p)) for p in stats)
    assert sum(p["metrics"]["audio_outage_s"]["count"] for p in stats) == 1
    ends = [p["window"]["end_s"] for p in stats]
    assert ends[:-1] == pytest.approx([2.0 * (i + 1) for i in range(len(ends) - 1)])
    assert ends[-1] == pytest.approx(summary.clock_s, abs=0.01)
    assert sum(p["counts"]["dropped_frames"] for p in stats) == summary.dropped_frames > 0
    # While the device was away, the stats showed the alarm in the drift state.
    raised_at = outage[0]["window_end_s"]
    during = [p for p in stats if p["window"]["start_s"] >= raised_at and
              p["window"]["end_s"] <= outage[1]["window_end_s"]]
    assert all(p["drift"]["audio_outage_s"]["state"] == "alarm" for p in during)

    decisions = [json.loads(line) for line in
                 (tmp_path / "decisions.jsonl").read_text().splitlines()]
    t_lost = outage[0]["window_end_s"]
    assert t_lost == pytest.approx(6.0, abs=0.15)
    assert len([d for d in decisions if d["decided_at"] < t_lost]) >= 4
    after = [d for d in decisions if d["start"] > outage[1]["window_end_s"]]
    assert len(after) >= 2, "decisions continue after the device returns"
    # Decisions are never logged: no label or confidence in any record at INFO or above.
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    assert "confidence" not in text and '"label"' not in text


def test_first_open_failing_starts_in_the_lost_state(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """No microphone at boot: the service still comes up (READY), alarms and waits for it,
    rather than crash-looping into systemd's start limit."""
    x, sr = sf.read(str(demo_audio()), dtype="float32", always_2d=True)
    blocks = [AudioBlock(x[i:i + sr // 10], sr) for i in range(0, 3 * sr, sr // 10)]
    stop = threading.Event()
    opens: list[int] = []

    def opener() -> FakeMic:
        opens.append(1)
        if len(opens) < 3:
            raise AgentError("no audio input device found; connect a microphone")
        return FakeMic(blocks, then=stop.set)

    cfg = Config()
    cfg.agent.state_dir = str(tmp_path / "state")
    cfg.telemetry.sink = f"file:{tmp_path / 't.jsonl'}"
    cfg.agent.device_id = "dev-test"
    cfg.output.decisions = str(tmp_path / "d.jsonl")
    cfg.audio.queue_blocks = 1000
    with caplog.at_level(logging.INFO):
        summary = service.run(cfg, stop, opener=opener, live=True,
                              retry=service.Retry(0.02, 0.05, 0.02))
    assert len(opens) == 3
    assert summary.audio_seconds == pytest.approx(3.0, abs=0.05)
    alarms = [m["payload"] for m in telemetry(tmp_path / "t.jsonl")
              if m["topic"].endswith("/alarm")]
    assert [(p["metric"], p["state"]) for p in alarms] == [("audio_outage_s", "raised"),
                                                            ("audio_outage_s", "cleared")]
    assert alarms[0]["window_end_s"] == 0.0


def test_retry_backoff_is_exponential_and_bounded() -> None:
    r = service.Retry(first_s=0.5, max_s=30.0)
    assert [r.delay(i) for i in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert r.delay(10_000) == 30.0


def test_stable_device_names_survive_a_replug() -> None:
    from agent.audio.sources import stable_device_name

    assert stable_device_name("USB PnP Sound Device: Audio (hw:2,0)") == \
        "USB PnP Sound Device: Audio"
    assert stable_device_name("USB PnP Sound Device: Audio (hw:3,0)") == \
        stable_device_name("USB PnP Sound Device: Audio (hw:2,0)")
    assert stable_device_name("pulse") == "pulse"


def test_mic_opener_reopens_by_name_not_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a replug the device has another index and card number; it is found by name."""
    import agent.audio.sources as sources

    listings = [[(0, "default"), (2, "USB Mic: Audio (hw:1,0)")],
                [(0, "default"), (1, "HDMI (hw:0,3)"), (5, "USB Mic: Audio (hw:2,0)")]]
    rescans: list[int] = []
    opened: list[object] = []

    class FakeMicSource:
        def __init__(self, device, rate, channels, block_ms, stop) -> None:
            self.device_index = sources.find_input_device(device)
            self.device_name = dict(listings[0])[self.device_index]
            self.rate, self.channels = rate or 48000, channels or 1
            opened.append(device)

    monkeypatch.setattr(sources, "MicSource", FakeMicSource)
    monkeypatch.setattr(sources, "input_devices", lambda: listings[0])
    monkeypatch.setattr(sources, "rescan_devices", lambda: (rescans.append(1),
                                                           listings.pop(0)))
    monkeypatch.setattr(sources, "_sounddevice", lambda: None)
    opener = sources.MicOpener("usb", 0, 0, 100)
    first = opener()
    assert first.device_index == 2 and opener.name == "USB Mic: Audio"
    second = opener()
    assert rescans == [1]
    assert second.device_index == 5 and second.rate == 48000  # same device, same rate
    assert opened == ["usb", "USB Mic: Audio"]


# --- logging ------------------------------------------------------------------------------------
def test_log_records_are_one_line_with_journal_priorities(tmp_path: Path) -> None:
    """journald splits on newlines and reads "<N>" as the priority when stderr is its stream."""
    from agent.daemon import logs

    with open(tmp_path / "stderr", "w+") as f:
        st = os.fstat(f.fileno())
        assert logs.stderr_is_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not logs.stderr_is_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not logs.stderr_is_journal(f, {})
        handler = logging.StreamHandler(f)
        handler.setFormatter(logs.OneLineFormatter(journal=True))
        logger = logging.getLogger("eva-test-journal")
        logger.propagate = False
        logger.addHandler(handler)
        logger.warning("device lost\nsecond line")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("reload failed")
        logger.removeHandler(handler)
        f.seek(0)
        lines = f.read().splitlines()
    assert len(lines) == 2
    assert lines[0] == "<4>eva-test-journal: device lost | second line"
    assert lines[1].startswith("<3>eva-test-journal: reload failed | Traceback")
    assert "RuntimeError: boom" in lines[1]
    plain = logs.OneLineFormatter(journal=False).format(
        logging.LogRecord("x", logging.INFO, __file__, 1, "a\nb", None, None))
    assert plain.endswith("INFO x: a | b") and "\n" not in plain
