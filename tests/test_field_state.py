"""Issue 10, state directory and outbox: corrupt, full and read-only state (docs/faults.md).

Full disks are a real 200 kB tmpfs and read-only ones real bind mounts (root, as in CI; the
tests skip and say why elsewhere); the injected-error tests below run everywhere.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sqlite3
import threading
from pathlib import Path

import pytest

from agent.actions.decision_log import DecisionWriter
from agent.config import Config
from agent.daemon import service
from agent.daemon.state_health import QUARANTINED, WRITE_ERRORS, StateHealth
from agent.errors import AgentError
from agent.monitoring.drift import DeviceBaselineLearner
from agent.monitoring.windows import WindowAggregator
from agent.recognition.decision import Decision
from agent.resources import demo_audio
from agent.telemetry.message import Message
from agent.telemetry.outbox import OUTBOX_FILENAME, Outbox, OutboxLimits, OutboxUnusable
from tests.fs_fixtures import FailingInserts, fill, read_only, tiny_fs
from tests.mqtt_fixtures import BrokerFactory, Subscriber, mosquitto

__all__ = ["mosquitto"]  # the real-broker fixture


def msg(seq: int, pad: int = 300) -> Message:
    return Message("eva/dev/stats", {"seq": seq, "pad": "x" * pad})


def payloads(ob: Outbox) -> list[dict]:
    return [json.loads(r.payload) for r in ob.peek(limit=10_000)]


def state_lines(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


# --- corrupt outbox ----------------------------------------------------------------------------
def _damage(path: Path, kind: str) -> None:
    rng = random.Random(kind)
    if kind == "random_bytes":
        path.write_bytes(rng.randbytes(20_000))
        return
    if kind == "text_file":
        path.write_text("this is not a database\n" * 100)
        return
    with Outbox(path) as ob:  # a real outbox with 300 unsent rows (~48 pages)
        for i in range(300):
            ob.append(msg(i, 500))
    data = bytearray(path.read_bytes())
    if kind == "truncated":
        path.write_bytes(bytes(data[: len(data) // 3]))
    else:  # overwritten pages (a torn or bit-rotted SD card)
        data[4096 * 3:4096 * 6] = rng.randbytes(4096 * 3)
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["random_bytes", "text_file", "truncated", "overwritten_pages"])
def test_corrupt_outbox_is_moved_aside_and_a_fresh_one_starts(
        tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / OUTBOX_FILENAME
    _damage(path, kind)
    damaged = path.read_bytes()
    health = StateHealth()
    with caplog.at_level(logging.INFO), Outbox(path, health=health) as ob:
        assert len(ob) == 0 and ob.append(msg(1)) > 0  # a fresh outbox that works
        assert [p["seq"] for p in payloads(ob)] == [1]
    ((orig, moved),) = health.quarantined
    assert orig == path and moved.name.startswith(OUTBOX_FILENAME + ".corrupt-")
    assert moved.read_bytes() == damaged  # kept for inspection, byte for byte
    (line,) = state_lines(caplog, "corrupt state file")  # one line naming both files
    assert str(path) in line and str(moved) in line
    _, quarantined, events = health.take()
    assert quarantined == 1 and [(e.metric, e.state) for e in events] == [(QUARANTINED, "raised")]


def test_service_starts_with_a_corrupt_outbox_and_raises_the_alarm(
        tmp_path: Path, clip: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The daemon used to die at start with `file is not a database` (and under the unit's start
    limit stop listening for good). Now it moves the file aside, listens, and says so."""
    state = tmp_path / "state"
    state.mkdir()
    (state / OUTBOX_FILENAME).write_text("not a database\n")
    cfg = _cfg(tmp_path, clip, state)
    cfg.telemetry.sink = "mqtt://127.0.0.1:9"  # no broker: everything stays in the outbox
    cfg.telemetry.drain_timeout_s = 0.0
    with caplog.at_level(logging.INFO):
        summary = service.run(cfg)
    assert summary.decisions >= 5
    assert len(list(state.glob(OUTBOX_FILENAME + ".corrupt-*"))) == 1
    with sqlite3.connect(state / OUTBOX_FILENAME) as db:
        sent = [json.loads(p) for (p,) in db.execute("SELECT payload FROM outbox ORDER BY id")]
    alarms = [p for p in sent if p.get("metric") == QUARANTINED]
    assert [a["state"] for a in alarms] == ["raised"] and "moved to" in alarms[0]["reason"]
    stats = [p for p in sent if "window" in p]
    assert stats and stats[-1]["drift"][QUARANTINED]["state"] == "alarm"
    assert sum(p["metrics"][QUARANTINED]["count"] for p in stats) == 1


# --- full state disk ---------------------------------------------------------------------------
def test_full_disk_outbox_drops_counts_and_resumes_on_a_200k_tmpfs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with tiny_fs(tmp_path / "state") as state, caplog.at_level(logging.INFO):
        health = StateHealth()
        ob = Outbox(state / OUTBOX_FILENAME, health=health, autocheckpoint=False)
        assert all(ob.append(msg(i)) > 0 for i in range(5))
        filler = fill(state)
        assert [ob.append(msg(100 + i)) for i in range(40)] == [-1] * 40  # never raises
        ob.checkpoint()       # the publisher's housekeeping neither raises nor wedges
        assert ob.expire() == 0
        ob.ack([1, 2])  # deleted now, or (if the disk refuses) retried later ...
        assert [p["seq"] for p in payloads(ob)] == [2, 3, 4]  # ... never sent again
        assert health.errors["outbox"] >= 40 and ob.stats()["dropped"] == 40
        filler.unlink()       # space returns
        assert ob.append(msg(999)) > 0
        last = payloads(ob)[-1]
        assert last["seq"] == 999 and last["outbox_dropped"] == 40  # every lost window
        ob.ack([5])
        assert [p["seq"] for p in payloads(ob)] == [2, 3, 999] and len(ob) == 3
        fill(state)
        ob.close()            # never raises, even on a full disk
    failed = state_lines(caplog, "state write failed: outbox")
    assert len(failed) == 1 and "database or disk is full" in failed[0]  # the real cause
    assert not state_lines(caplog, "cannot rollback")
    assert len(state_lines(caplog, "state writes work again: outbox")) == 1
    errors, _, events = health.take()
    assert errors == health.errors["outbox"] >= 40
    assert [(e.metric, e.state) for e in events] == [(WRITE_ERRORS, "raised"),
                                                     (WRITE_ERRORS, "cleared")]


def test_outbox_keeps_a_free_space_reserve_instead_of_filling_the_disk(tmp_path: Path) -> None:
    """A 1 MB file system and a 16 MB bound: the outbox stops growing at the reserve (a tenth
    of the file system here) and drops, counted, the oldest rows instead of failing."""
    with tiny_fs(tmp_path / "state", "1m") as state:
        with Outbox(state / OUTBOX_FILENAME) as ob:
            ids = [ob.append(msg(i, 1000)) for i in range(1500)]
            st = os.statvfs(state)
            free = st.f_bavail * st.f_frsize
            ps = payloads(ob)
        assert min(ids) > 0  # no append failed
        assert free >= 50 * 1024  # most of the 100 kB reserve is still free
        dropped = sum(p.get("outbox_dropped", 0) for p in ps)
        assert dropped == 1500 - len(ps) > 0  # every dropped window is counted


def test_outbox_bounds_its_wal_file(tmp_path: Path) -> None:
    """1 MB bound, producer at full speed, no checkpoint from the publisher (broker down or a
    stalled thread): the WAL used to grow to tens of MB; now it stays within twice its bound."""
    limits = OutboxLimits(max_bytes=1024 * 1024)
    wal = tmp_path / (OUTBOX_FILENAME + "-wal")
    biggest = 0
    with Outbox(tmp_path / OUTBOX_FILENAME, limits, autocheckpoint=False) as ob:
        for i in range(1500):  # the old outbox's WAL passed 20 MB here
            ob.append(msg(i, 1000))
            biggest = max(biggest, wal.stat().st_size)
        assert ob.size_bytes <= limits.max_bytes
    assert biggest <= 2 * limits.wal_limit + 64 * 1024


def test_decisions_file_on_a_full_disk_degrades_and_resumes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = Decision(start=0.0, end=0.5, decided_at=0.74, label="3", confidence=0.9, margin=0.5,
                 accepted=True, latency_ms=1.0, model="m@1")
    with tiny_fs(tmp_path / "state") as state, caplog.at_level(logging.INFO):
        health = StateHealth()
        w = DecisionWriter(str(state / "decisions.jsonl"), health)
        w.write([d])
        filler = fill(state)
        for _ in range(3):
            w.write([d] * 200)  # never raises
        assert w.lost >= 400 and health.failing == {"decisions": "No space left on device"}
        filler.unlink()
        w.write([d, d])
        w.close()
        lines = (state / "decisions.jsonl").read_text().splitlines()
    assert all(json.loads(line)["label"] == "3" for line in lines if line)  # no half line
    assert len([x for x in lines if x]) == w.count - w.lost
    assert len(state_lines(caplog, "state write failed: decisions")) == 1
    assert len(state_lines(caplog, "state writes work again: decisions")) == 1


def test_decisions_to_dev_full_is_one_line_and_listening_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    d = Decision(start=0.0, end=0.5, decided_at=0.74, label="3", confidence=0.9, margin=0.5,
                 accepted=True, latency_ms=1.0, model="m@1")
    health = StateHealth()
    with caplog.at_level(logging.INFO):
        w = DecisionWriter("/dev/full", health)
        for _ in range(5):
            w.write([d])
        w.close()
    assert w.lost == 5 and health.errors["decisions"] >= 5
    (line,) = state_lines(caplog, "state write failed")
    assert "/dev/full" in line and "No space left on device" in line


def test_device_baseline_save_on_a_full_disk_stays_in_memory_and_retries(tmp_path: Path) -> None:
    agg = WindowAggregator(1.0)
    for t in range(4):
        agg.count("frames", 10, t + 0.5)
        agg.count("utterances", 1, t + 0.5)
    windows = agg.finish(4.0)
    with tiny_fs(tmp_path / "state") as state:
        health = StateHealth()
        learner = DeviceBaselineLearner(2.0, path=state / "device-baseline.json", health=health)
        filler = fill(state)
        learned = [learner.add(w) for w in windows[:2]]
        assert learned[1] is not None and learner.frozen and learner.unsaved
        assert not (state / "device-baseline.json").exists()
        assert not (state / "device-baseline.json.tmp").exists()  # no half file left behind
        assert health.failing == {"baseline": "No space left on device"}
        filler.unlink()
        learner.add(windows[2])  # the next window retries the save
        assert not learner.unsaved and (state / "device-baseline.json").is_file()
        assert health.failing == {}


def _cfg(tmp_path: Path, clip: Path, state: Path) -> Config:
    cfg = Config()
    cfg.audio.source = str(clip)
    cfg.agent.state_dir = str(state)
    cfg.agent.device_id = "dev-field"
    cfg.telemetry.sink = f"file:{tmp_path / 'telemetry.jsonl'}"
    cfg.monitoring.window_s = 1.0
    cfg.monitoring.device_baseline_s = 2.0
    cfg.monitoring.device_baseline_min_utterances = 0
    cfg.decision.mode = "full"
    return cfg


def test_pipeline_survives_a_full_state_disk_and_says_so(
        tmp_path: Path, clip: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Decisions and the device baseline live on a full 200 kB state disk: the run goes on,
    each part says so once, and the windows count the failures and carry the alarm."""
    with tiny_fs(tmp_path / "state") as state, caplog.at_level(logging.INFO):
        cfg = _cfg(tmp_path, clip, state)
        (state / "decisions.jsonl").touch()
        fill(state)
        summary = service.run(cfg)
    assert summary.decisions >= 5 and summary.windows >= 10
    failed = state_lines(caplog, "state write failed")
    assert sorted(line.split()[3] for line in failed) == ["baseline", "decisions"]
    msgs = [json.loads(x) for x in (tmp_path / "telemetry.jsonl").read_text().splitlines()]
    stats = [m["payload"] for m in msgs if m["topic"].endswith("/stats")]
    alarms = [m["payload"] for m in msgs if m["topic"].endswith("/alarm")]
    assert sum(p["counts"][WRITE_ERRORS] for p in stats) >= summary.decisions
    assert [(a["metric"], a["state"]) for a in alarms if a["metric"] == WRITE_ERRORS] == [
        (WRITE_ERRORS, "raised")]
    assert stats[-1]["drift"][WRITE_ERRORS]["state"] == "alarm"


# --- read-only state ---------------------------------------------------------------------------
def test_read_only_state_dir_is_refused_at_start_in_one_line(tmp_path: Path, clip: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    cfg = _cfg(tmp_path, clip, state)
    cfg.output.decisions = str(tmp_path / "decisions.jsonl")
    cfg.telemetry.sink = "mqtt://127.0.0.1:9"
    with read_only(state), pytest.raises(AgentError) as e:
        service.run(cfg, threading.Event())
    text = str(e.value)
    assert "\n" not in text and str(state) in text and "Read-only file system" in text
    assert "agent.state_dir" in text  # the fix


def test_read_only_outbox_file_is_refused_not_silently_lost(tmp_path: Path) -> None:
    """A read-only outbox used to open, lose every new window silently and re-send its old
    rows at every start (duplicates), blaming the broker."""
    path = tmp_path / OUTBOX_FILENAME
    with Outbox(path) as ob:
        for i in range(30):
            ob.append(msg(i))
    with read_only(path), pytest.raises(OutboxUnusable) as e:
        Outbox(path)
    text = str(e.value)
    assert str(path) in text and "read-only" in text and "writable" in text
    assert "\n" not in text and "broker" not in text


# --- telemetry end to end: full disk, broker away, then both come back ---------------------------
def test_mqtt_telemetry_resumes_when_space_returns_with_every_lost_window_counted(
        mosquitto: BrokerFactory, tmp_path: Path) -> None:
    """The old publisher loop raised from its failing checkpoint on every pass, so nothing was
    sent even after the broker returned, and windows that failed to append were not counted."""
    from agent.telemetry.mqtt import MqttOptions, MqttSink  # paho only where it is tested

    broker = mosquitto(persistence=True)
    sub = Subscriber(broker, "eva/devf/stats", client_id="operator-f", persistent=True)
    with tiny_fs(tmp_path / "state") as state:
        sink = MqttSink("127.0.0.1", broker.port, device_id="devf",
                        outbox_path=state / OUTBOX_FILENAME,
                        options=MqttOptions(reconnect_min_s=0.05, reconnect_max_s=0.3))
        try:
            assert sink.wait_connected(10)
            for i in range(3):
                sink.publish(Message("eva/devf/stats", {"seq": i}))
            assert sink.wait_drained(10)
            broker.stop()
            filler = fill(state)
            for i in range(3, 13):  # full disk, broker away: lost or kept, never raised
                sink.publish(Message("eva/devf/stats", {"seq": i, "pad": "x" * 20_000}))
            filler.unlink()         # space returns ...
            broker.start()          # ... and the broker
            sink.publish(Message("eva/devf/stats", {"seq": 13}))
            got: dict[int, dict] = {}
            while 13 not in got:
                p = sub.get(10).json()
                got[p["seq"]] = p
            assert sink.wait_drained(10)
        finally:
            assert sink.close(2) in (True, False)  # never raises
            sub.close()
    assert {0, 1, 2, 13} <= set(got) and len(got) < 14  # the disk really refused some
    # every window the full disk cost is counted on a message that arrived
    assert sum(p.get("outbox_dropped", 0) for p in got.values()) == 14 - len(got)


def test_injected_enospc_without_root_degrades_the_same_way(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no tmpfs can be mounted: ENOSPC injected at the write calls (os.write for the
    decisions file, the sqlite connection for the outbox)."""
    d = Decision(start=0.0, end=0.5, decided_at=0.74, label="3", confidence=0.9, margin=0.5,
                 accepted=True, latency_ms=1.0, model="m@1")
    health = StateHealth()
    w = DecisionWriter(str(tmp_path / "decisions.jsonl"), health)
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, b: (_ for _ in ()).throw(
        OSError(28, "No space left on device")))
    w.write([d])
    monkeypatch.setattr(os, "write", real_write)
    w.write([d])
    w.close()
    assert w.lost == 1 and len((tmp_path / "decisions.jsonl").read_text().splitlines()) == 1

    with Outbox(tmp_path / OUTBOX_FILENAME, health=health) as ob:
        real = ob._db
        ob._db = FailingInserts(real)  # type: ignore[assignment]
        assert [ob.append(msg(i)) for i in range(4)] == [-1] * 4
        ob._db = real
        assert ob.append(msg(4)) > 0 and payloads(ob)[-1]["outbox_dropped"] == 4
    assert health.errors == {"decisions": 1, "outbox": 4} and not health.failing


def test_read_only_state_dir_degrades_when_something_can_work(
        tmp_path: Path, clip: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Decisions and telemetry elsewhere: only the device baseline needs the state directory,
    so the run goes on and the failed save is counted and alarmed (it used to raise a
    traceback from device-baseline.json.tmp after 120 s)."""
    state = tmp_path / "state"
    state.mkdir()
    cfg = _cfg(tmp_path, clip, state)
    cfg.output.decisions = str(tmp_path / "decisions.jsonl")
    with read_only(state), caplog.at_level(logging.INFO):
        summary = service.run(cfg)
    assert summary.decisions >= 5
    (line,) = state_lines(caplog, "state write failed")
    assert "baseline" in line and "Read-only file system" in line
    msgs = [json.loads(x) for x in (tmp_path / "telemetry.jsonl").read_text().splitlines()]
    alarms = [m["payload"] for m in msgs if m["topic"].endswith("/alarm")]
    assert [a["state"] for a in alarms if a["metric"] == WRITE_ERRORS] == ["raised"]


def test_outbox_on_a_disk_full_at_start_opens_later(tmp_path: Path) -> None:
    """The agent starts on an already full state disk: the outbox cannot even be created. It
    does not stop the start; it counts the lost windows and opens once space returns."""
    now = [0.0]
    with tiny_fs(tmp_path / "state") as state:
        filler = fill(state)
        health = StateHealth()
        ob = Outbox(state / OUTBOX_FILENAME, health=health, clock=lambda: now[0])
        assert not ob.available
        assert [ob.append(msg(i)) for i in range(3)] == [-1] * 3
        filler.unlink()
        assert ob.append(msg(3)) == -1  # not retried before REOPEN_EVERY_S ...
        now[0] += 10.0
        assert ob.append(msg(4)) > 0 and ob.available  # ... then it opens
        (p,) = payloads(ob)
        assert p["seq"] == 4 and p["outbox_dropped"] == 4
        ob.close()
    assert health.errors["outbox"] >= 4 and not health.failing


def test_corrupt_outbox_that_cannot_be_moved_aside_is_refused_in_one_line(tmp_path: Path) -> None:
    """Corrupt and pinned (here: a read-only mount of the file itself): nothing to degrade to."""
    path = tmp_path / OUTBOX_FILENAME
    path.write_text("not a database\n")
    with read_only(path), pytest.raises(OutboxUnusable) as e:
        Outbox(path)
    text = str(e.value)
    assert "\n" not in text and str(path) in text and "corrupt" in text
    assert "cannot be moved aside" in text and "move or delete it" in text


class ReadOnlyDisk:
    """A sqlite connection on a file system the kernel remounted read-only."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, *a: object) -> sqlite3.Cursor:
        if sql.startswith(("INSERT", "DELETE")):
            raise sqlite3.OperationalError("attempt to write a readonly database")
        return self._db.execute(sql, *a)

    def __getattr__(self, name: str) -> object:
        return getattr(self._db, name)


def test_state_disk_turning_read_only_mid_run_is_counted_and_not_blamed_on_the_broker(
        tmp_path: Path, clip: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """SD cards remount read-only on errors (ext4 errors=remount-ro). Appends after that are
    dropped and counted, never raised; if the outbox then cannot drain, the run's last line
    names the disk, not "broker unreachable?"."""
    health = StateHealth()
    with Outbox(tmp_path / OUTBOX_FILENAME, health=health) as ob:
        assert ob.append(msg(0)) > 0
        # A read-only remount cannot be forced on a mount with files open for writing (the
        # kernel does it on errors); SQLite's own error is injected at the writes instead.
        ob._db = ReadOnlyDisk(ob._db)  # type: ignore[assignment,arg-type]
        assert [ob.append(msg(i)) for i in (1, 2)] == [-1, -1]
        assert ob.ack([1]) == 0 and payloads(ob) == []  # delivered: not sent again
    assert "readonly" in health.failing["outbox"]

    from agent import cli

    def fake_run(cfg: Config, *a: object, **kw: object) -> service.RunSummary:
        return service.RunSummary(3, 10.0, 0, str(clip), windows=1, drained=False,
                                  state_failing={"outbox": health.failing["outbox"]})

    monkeypatch.setattr(service, "run", fake_run)
    code = cli.main(["run", "--source", str(clip), "--state-dir", str(tmp_path / "s2"),
                     "--telemetry", "mqtt://127.0.0.1:9", "--drain-timeout", "0"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and "state disk refuses outbox writes" in err and "unreachable" not in err


def test_corruption_found_while_running_quarantines_and_carries_on(tmp_path: Path) -> None:
    """SQLite reports a malformed image in the middle of a run (injected: the page cache hides
    pages overwritten under a live connection): the file is moved aside, its unsent rows are
    counted as dropped, and the next window goes into a fresh outbox."""

    class Malformed(ReadOnlyDisk):
        def execute(self, sql: str, *a: object) -> sqlite3.Cursor:
            if sql.startswith("INSERT"):
                raise sqlite3.DatabaseError("database disk image is malformed")
            return self._db.execute(sql, *a)

    health = StateHealth()
    path = tmp_path / OUTBOX_FILENAME
    with Outbox(path, health=health) as ob:
        for i in range(3):
            ob.append(msg(i))
        ob._db = Malformed(ob._db)  # type: ignore[assignment,arg-type]
        assert ob.append(msg(3)) == -1  # never raised
        assert ob.append(msg(4)) > 0
        (p,) = payloads(ob)
        assert p["seq"] == 4 and p["outbox_dropped"] == 4  # 3 unsent rows + the failed one
    ((orig, moved),) = health.quarantined
    assert orig == path and moved.exists()


def test_daemon_on_a_200k_state_disk_with_the_broker_down_counts_every_lost_window(
        tmp_path: Path) -> None:
    """The issue's reproduction: the state directory on a 200 kB tmpfs, the broker down, the
    windows filling the disk. The run completes, the outbox keeps its free-space reserve, and
    every message missing from it is counted by `outbox_dropped` on a later one."""
    from tests.mqtt_fixtures import free_port

    with tiny_fs(tmp_path / "state") as state:
        cfg = _cfg(tmp_path, demo_audio(), state)
        cfg.telemetry.sink = f"mqtt://127.0.0.1:{free_port()}"
        cfg.telemetry.drain_timeout_s = 0.0
        summary = service.run(cfg)
        st = os.statvfs(state)
        free = st.f_bavail * st.f_frsize
        with Outbox(state / OUTBOX_FILENAME) as ob:
            rows = [json.loads(r.payload) for r in ob.peek(limit=10_000)]
            pending = ob.pending_dropped()
    assert summary.decisions >= 10 and summary.windows >= 21
    assert free >= 48 * 1024  # the outbox kept its reserve (64 kB here) free
    seqs = [p["seq"] for p in rows]
    assert seqs == sorted(seqs) and len(seqs) < summary.windows  # the disk did run out
    missing = (seqs[-1] + 1) - len(seqs)
    assert missing > 0 and sum(p.get("outbox_dropped", 0) for p in rows) == missing
    assert pending == 0  # nothing lost after the last row kept
