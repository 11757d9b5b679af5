"""Durable outbox: order, ack-delete, bounds with drop-oldest and the dropped count, restarts."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.telemetry import Message, Outbox, OutboxLimits
from agent.telemetry.outbox import OutboxLocked
from tests.fs_fixtures import FailingInserts

ROOT = Path(__file__).resolve().parents[1]


def msg(seq: int, pad: int = 0) -> Message:
    return Message("eva/d1/stats", {"seq": seq, "historical": False, "pad": "x" * pad})


def payloads(ob: Outbox) -> list[dict]:
    return [json.loads(r.payload) for r in ob.peek(0, 100_000)]


def test_order_and_ack_delete(tmp_path: Path) -> None:
    with Outbox(tmp_path / "ob.sqlite3") as ob:
        ids = [ob.append(msg(i)) for i in range(5)]
        assert ids == sorted(ids) and len(ob) == 5
        rows = ob.peek(0, 10)
        assert [json.loads(r.payload)["seq"] for r in rows] == [0, 1, 2, 3, 4]
        assert rows[0].topic == "eva/d1/stats" and rows[0].qos == 1 and not rows[0].retain
        assert [json.loads(r.payload)["seq"] for r in ob.peek(ids[2], 10)] == [3, 4]
        assert ob.ack([ids[1], ids[3], 999_999]) == 2  # unknown ids are ignored
        assert [p["seq"] for p in payloads(ob)] == [0, 2, 4]
        assert ob.ack([ids[1]]) == 0  # a duplicate PUBACK deletes nothing more
        assert len(ob) == 3 and not any(r.historical for r in ob.peek())


def test_wal_mode(tmp_path: Path) -> None:
    p = tmp_path / "ob.sqlite3"
    with Outbox(p) as ob:
        ob.append(msg(0))
        mode = sqlite3.connect(p).execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"


def test_count_bound_drops_oldest_and_reports_every_drop(tmp_path: Path) -> None:
    with Outbox(tmp_path / "ob.sqlite3", OutboxLimits(max_messages=3)) as ob:
        for i in range(10):
            ob.append(msg(i))
        ps = payloads(ob)
        assert [p["seq"] for p in ps] == [7, 8, 9]  # the newest survive
        assert len(ob) == 3 and ob.stats()["dropped"] == 7
        # every drop is reported, including counts carried by rows that were dropped later
        assert sum(p.get("outbox_dropped", 0) for p in ps) == 7
        assert [p["outbox_dropped"] for p in ps] == [2, 2, 3]
        assert ob.pending_dropped() == 0


def test_first_message_after_a_drop_carries_the_count(tmp_path: Path) -> None:
    with Outbox(tmp_path / "ob.sqlite3", OutboxLimits(max_messages=2)) as ob:
        ob.append(msg(0))
        ob.append(msg(1))
        assert "outbox_dropped" not in payloads(ob)[1]
        ob.append(msg(2))
        assert payloads(ob)[-1] == {"seq": 2, "historical": False, "pad": "",
                                    "outbox_dropped": 1}


def test_byte_bound(tmp_path: Path) -> None:
    with Outbox(tmp_path / "ob.sqlite3", OutboxLimits(max_bytes=2000)) as ob:
        for i in range(20):
            ob.append(msg(i, pad=300))
        assert ob.size_bytes <= 2000
        ps = payloads(ob)
        assert ps[-1]["seq"] == 19 and [p["seq"] for p in ps] == list(range(20 - len(ps), 20))
        assert sum(p.get("outbox_dropped", 0) for p in ps) == 20 - len(ps)


def test_message_larger_than_the_bound_is_dropped_and_counted(tmp_path: Path) -> None:
    with Outbox(tmp_path / "ob.sqlite3", OutboxLimits(max_bytes=500)) as ob:
        ob.append(msg(0))
        assert ob.append(msg(1, pad=1000)) == -1
        ob.append(msg(2))
        ps = payloads(ob)
        assert [p["seq"] for p in ps] == [0, 2] and ps[1]["outbox_dropped"] == 1


def test_age_bound(tmp_path: Path) -> None:
    now = [1000.0]
    with Outbox(tmp_path / "ob.sqlite3", OutboxLimits(max_age_s=60), clock=lambda: now[0]) as ob:
        ob.append(msg(0))
        now[0] += 30
        ob.append(msg(1))
        now[0] += 45  # msg 0 is 75 s old, msg 1 is 45 s old
        assert ob.expire() == 1
        assert [p["seq"] for p in payloads(ob)] == [1]
        now[0] += 100
        ob.append(msg(2))  # append expires too; the count rides on this message
        ps = payloads(ob)
        assert [p["seq"] for p in ps] == [2] and ps[0]["outbox_dropped"] == 2


def test_restart_replays_in_order_marked_historical(tmp_path: Path) -> None:
    p = tmp_path / "ob.sqlite3"
    with Outbox(p, OutboxLimits(max_messages=4)) as ob:
        ids = [ob.append(msg(i)) for i in range(5)]  # seq 0 dropped → pending on seq 4
        ob.ack([ids[1]])
    with Outbox(p, OutboxLimits(max_messages=4)) as ob2:
        ob2.append(msg(100))
        rows = ob2.peek()
        ps = [json.loads(r.payload) for r in rows]
        assert [p["seq"] for p in ps] == [2, 3, 4, 100]
        assert [r.historical for r in rows] == [True, True, True, False]
        assert [p["historical"] for p in ps] == [True, True, True, False]
        assert ps[2]["outbox_dropped"] == 1


def test_live_since_marks_older_rows_historical(tmp_path: Path) -> None:
    now = [100.0]
    with Outbox(tmp_path / "ob.sqlite3", clock=lambda: now[0]) as ob:
        ob.append(msg(0))  # committed during an outage
        now[0] = 150.0
        reconnect = ob.now()
        now[0] = 200.0
        ob.append(msg(1))  # committed after the reconnect at t=150
        rows = ob.peek(live_since=reconnect)
        assert [r.historical for r in rows] == [True, False]
        assert [json.loads(r.payload)["historical"] for r in rows] == [True, False]
        assert not any(r.historical for r in ob.peek())


def test_pending_drop_count_survives_restart(tmp_path: Path) -> None:
    p = tmp_path / "ob.sqlite3"
    now = [0.0]
    with Outbox(p, OutboxLimits(max_age_s=10), clock=lambda: now[0]) as ob:
        ob.append(msg(0))
        now[0] = 100.0
        assert ob.expire() == 1 and len(ob) == 0
    with Outbox(p, OutboxLimits(max_age_s=10), clock=lambda: now[0]) as ob2:
        ob2.append(msg(1))
        assert payloads(ob2)[0]["outbox_dropped"] == 1


def test_survives_kill_9(tmp_path: Path) -> None:
    p = tmp_path / "ob.sqlite3"
    code = (
        "import os, signal, sys\n"
        "from agent.telemetry import Message, Outbox\n"
        "ob = Outbox(sys.argv[1])\n"
        "for i in range(50): ob.append(Message('eva/d1/stats', {'seq': i}))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(p)], cwd=ROOT, timeout=30)
    assert r.returncode == -9
    with Outbox(p) as ob:  # the flock died with the process
        rows = ob.peek(0, 100)
        assert [json.loads(r.payload)["seq"] for r in rows] == list(range(50))
        assert all(r.historical for r in rows)


def test_second_process_cannot_open_the_same_outbox(tmp_path: Path) -> None:
    with Outbox(tmp_path / "ob.sqlite3"), pytest.raises(OutboxLocked, match="state-dir"):
        Outbox(tmp_path / "ob.sqlite3")


def test_one_producer_one_publisher_thread(tmp_path: Path) -> None:
    n = 2000
    with Outbox(tmp_path / "ob.sqlite3") as ob:
        seen: list[int] = []
        done = threading.Event()
        errors: list[BaseException] = []

        def producer() -> None:
            try:
                for i in range(n):
                    ob.append(msg(i))
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
            finally:
                done.set()

        def publisher() -> None:
            try:
                while not (done.is_set() and len(ob) == 0):
                    rows = ob.peek(0, 50)
                    seen.extend(json.loads(r.payload)["seq"] for r in rows)
                    ob.ack(r.id for r in rows)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=producer), threading.Thread(target=publisher)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors
        assert seen == list(range(n)) and len(ob) == 0 and ob.size_bytes == 0


def test_an_append_that_fails_after_expiring_rows_leaves_them_to_the_next(tmp_path: Path) -> None:
    """The outbox keeps what it knows of the disk in memory (the stored drop count, the age of
    the oldest row) so appends do not read it back; a rolled-back append must not leave those
    out of step: the rows it expired are back on disk, and the next append expires and counts
    them again."""
    now = [1000.0]

    with Outbox(tmp_path / "ob.sqlite3", OutboxLimits(max_age_s=60),
                clock=lambda: now[0]) as ob:
        ob.append(msg(0))
        ob.append(msg(1))
        now[0] += 100  # both expire with the next append
        real = ob._db
        ob._db = FailingInserts(real, "disk I/O error")  # type: ignore[assignment]
        assert ob.append(msg(2)) == -1
        ob._db = real
        assert len(ob) == 2  # the expiry was rolled back with the failed insert
        assert ob.append(msg(3)) > 0
        ps = payloads(ob)
        # two expired + the message the failed append lost, reported once, on the next one
        assert [p["seq"] for p in ps] == [3] and ps[0]["outbox_dropped"] == 3
        assert ob.pending_dropped() == 0
        now[0] += 30
        ob.append(msg(4))
        assert [p.get("outbox_dropped") for p in payloads(ob)] == [3, None]
