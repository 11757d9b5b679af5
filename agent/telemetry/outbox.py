"""Durable SQLite outbox: a telemetry message is on disk before any send is tried.

Why: devices sit on flaky networks and may be killed or lose power at any time. Each message
is committed here before the publisher thread sees it and is deleted only when the broker has
acknowledged it (QoS 1 PUBACK), so outages and `kill -9` lose nothing that fits the bounds.

Contract:
- Order: rows replay in append order (`id`), oldest first, after a reconnect or a restart.
- Historical: rows appended by an earlier process (another `Outbox` instance) come out of
  `peek()` with `"historical": true` set in their JSON payload (optionally also rows older
  than a given time, see `peek(live_since=...)`).
- Bounds (`OutboxLimits`): message count, total payload bytes and age. When a bound is hit the
  OLDEST rows are dropped. The number dropped (including any count a dropped row was itself
  carrying) is added as a top-level payload field `"outbox_dropped": N` to the next message
  appended, so the total reported over delivered messages equals the total dropped. The field
  is absent when nothing was dropped. The pending count is stored in the database, so it
  survives restarts. A dropped row may still arrive if it was already in flight.
- Threads: one connection guarded by a lock; meant for one producer and one publisher thread.
  WAL mode; `sync="normal"` survives process crashes (kill -9) but may lose the last commits
  on power loss, `sync="full"` survives power loss at the cost of an fsync per message.
- One process at a time: an exclusive `flock` on `PATH.lock`; a second opener gets an error
  instead of publishing the same rows twice.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from agent.telemetry.message import Message, json_bytes

OUTBOX_FILENAME = "telemetry-outbox.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    created REAL NOT NULL,
    boot TEXT NOT NULL,
    size INTEGER NOT NULL,
    carried INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class OutboxLimits:
    """Bounds: a device must not fill its disk however long the broker stays away."""

    max_messages: int = 10_000
    max_bytes: int = 16 * 1024 * 1024
    max_age_s: float = 7 * 86400.0
    sync: str = "normal"

    def __post_init__(self) -> None:
        if self.max_messages < 1 or self.max_bytes < 1 or self.max_age_s <= 0:
            raise ValueError("outbox bounds must be positive")
        if self.sync not in ("normal", "full"):
            raise ValueError(f"invalid outbox sync {self.sync!r}: expected normal or full")


@dataclass(frozen=True)
class OutboxRow:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created: float
    historical: bool


class OutboxLocked(AgentError):
    """Another process holds the outbox."""


class Outbox:
    """See the module docstring for the delivery, bound and drop-count contract."""

    def __init__(self, path: str | os.PathLike[str], limits: OutboxLimits | None = None, *,
                 clock: Callable[[], float] = time.time, autocheckpoint: bool = True) -> None:
        """`autocheckpoint=False` leaves WAL checkpoints to `checkpoint()` (called from the
        publisher thread), so the producer's commit never pays for copying the WAL."""
        self.path = Path(path)
        self.limits = limits or OutboxLimits()
        self._clock = clock
        self._boot = uuid.uuid4().hex  # marks rows of this process; others are historical
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lockfile = open(str(self.path) + ".lock", "a+b")  # held open: the lock
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lockfile.close()
            raise OutboxLocked(f"telemetry outbox {self.path} is in use by another process; "
                               "give each agent its own --state-dir") from None
        self._db = sqlite3.connect(str(self.path), isolation_level=None,
                                   check_same_thread=False, timeout=5.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={self.limits.sync.upper()}")
        self._db.executescript(_SCHEMA)
        if not autocheckpoint:
            self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._ckpt_db: sqlite3.Connection | None = None
        self._count = self._bytes = 0
        self._recount()
        self.dropped_total = 0  # dropped by this process (for stats)
        self.appended_total = 0
        self.acked_total = 0
        self._closed = False

    # -- producer side -------------------------------------------------------------------
    def append(self, msg: Message) -> int:
        """Commit `msg` (dropping the oldest rows first if a bound requires); return its id."""
        now = self._clock()
        base = json_bytes(msg.payload)
        with self._lock:
            self._check_open()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                pending = self._meta_get("pending_dropped") + self._expire_locked(now)
                if len(base) + 32 > self.limits.max_bytes:
                    # Can never fit: drop the newest itself and report it with the next one.
                    self._meta_set("pending_dropped", pending + 1)
                    self._db.execute("COMMIT")
                    self.dropped_total += 1
                    return -1
                pending += self._make_room_locked(len(base) + 32)
                data = json_bytes({**msg.payload, "outbox_dropped": pending}) if pending \
                    else base
                cur = self._db.execute(
                    "INSERT INTO outbox (topic, payload, qos, retain, created, boot, size, carried)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (msg.topic, data, msg.qos, int(msg.retain), now, self._boot, len(data),
                     pending))
                self._meta_set("pending_dropped", 0)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._recount()
                raise
            self._count += 1
            self._bytes += len(data)
            self.appended_total += 1
            return int(cur.lastrowid or 0)

    # -- publisher side ------------------------------------------------------------------
    def peek(self, after_id: int = 0, limit: int = 100,
             live_since: float | None = None) -> list[OutboxRow]:
        """The oldest rows with id > after_id, in order; earlier processes' rows marked.

        With `live_since` (a clock value), rows committed before it are marked historical too:
        the MQTT sink passes its connect time when replays after a reconnect should be marked.
        """
        with self._lock:
            self._check_open()
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, retain, created, boot FROM outbox "
                "WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)).fetchall()
        out = []
        for rid, topic_, payload, qos, retain, created, boot in rows:
            historical = boot != self._boot or (live_since is not None and created < live_since)
            if historical:
                payload = _mark_historical(payload)
            out.append(OutboxRow(rid, topic_, bytes(payload), qos, bool(retain), created,
                                 historical))
        return out

    def ack(self, ids: Iterable[int]) -> int:
        """Delete acknowledged rows (unknown or already dropped ids are ignored)."""
        ids = list(ids)
        if not ids:
            return 0
        with self._lock:
            self._check_open()
            self._db.execute("BEGIN IMMEDIATE")
            n = size = 0
            try:
                for rid in ids:
                    row = self._db.execute("DELETE FROM outbox WHERE id = ? RETURNING size",
                                           (rid,)).fetchone()
                    if row is not None:
                        n += 1
                        size += int(row[0])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._count -= n
            self._bytes -= size
            self.acked_total += n
            return n

    def expire(self) -> int:
        """Drop rows older than max_age_s now (the publisher calls this periodically)."""
        with self._lock:
            self._check_open()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                n = self._expire_locked(self._clock())
                if n:
                    self._meta_set("pending_dropped", self._meta_get("pending_dropped") + n)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._recount()
                raise
            return n

    def checkpoint(self) -> None:
        """Copy the WAL into the database on a separate connection (PASSIVE: the producer's
        appends proceed meanwhile). Call from one thread only."""
        if self._closed:
            return
        if self._ckpt_db is None:
            self._ckpt_db = sqlite3.connect(str(self.path), isolation_level=None,
                                            check_same_thread=False, timeout=5.0)
        self._ckpt_db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    # -- introspection -------------------------------------------------------------------
    def __len__(self) -> int:
        return self._count

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def pending_dropped(self) -> int:
        with self._lock:
            self._check_open()
            return self._meta_get("pending_dropped")

    def stats(self) -> dict[str, Any]:
        return {"queued": self._count, "queued_bytes": self._bytes,
                "dropped": self.dropped_total, "appended": self.appended_total,
                "acked": self.acked_total}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._ckpt_db is not None:
                    self._ckpt_db.close()
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._db.close()
                self._lockfile.close()  # releases the flock

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals (caller holds self._lock inside a transaction) -------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("outbox is closed")

    def _meta_get(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _meta_set(self, key: str, value: int) -> None:
        self._db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) "
                         "DO UPDATE SET value = excluded.value", (key, value))

    def _drop_rows(self, rows: list[tuple[int, int, int]]) -> int:
        """Delete (id, size, carried) rows; return how many messages that loses in total."""
        lost = 0
        for rid, size, carried in rows:
            self._db.execute("DELETE FROM outbox WHERE id = ?", (rid,))
            self._count -= 1
            self._bytes -= size
            lost += 1 + carried  # a dropped row's own report must not vanish with it
        self.dropped_total += len(rows)
        return lost

    def _recount(self) -> None:
        row = self._db.execute("SELECT count(*), total(size) FROM outbox").fetchone()
        self._count, self._bytes = int(row[0]), int(row[1])

    def _expire_locked(self, now: float) -> int:
        if not self._count:
            return 0
        # Walk from the oldest row and stop at the first young one: O(expired), not O(rows),
        # because this runs on every append (the caller's thread).
        cutoff = now - self.limits.max_age_s
        rows = []
        cur = self._db.execute("SELECT id, size, carried, created FROM outbox ORDER BY id")
        for rid, size, carried, created in cur:
            if created >= cutoff:
                break
            rows.append((rid, size, carried))
        cur.close()
        return self._drop_rows(rows) if rows else 0

    def _make_room_locked(self, incoming: int) -> int:
        over_n = self._count + 1 - self.limits.max_messages
        over_b = self._bytes + incoming - self.limits.max_bytes
        if over_n <= 0 and over_b <= 0:
            return 0
        victims: list[tuple[int, int, int]] = []
        freed = 0
        cur = self._db.execute("SELECT id, size, carried FROM outbox ORDER BY id")
        for rid, size, carried in cur:
            if len(victims) >= over_n and freed >= over_b:
                break
            victims.append((rid, size, carried))
            freed += size
        cur.close()
        return self._drop_rows(victims)


def _mark_historical(payload: bytes) -> bytes:
    try:
        obj = json.loads(payload)
    except ValueError:
        return payload
    if not isinstance(obj, dict):
        return payload
    obj["historical"] = True
    return json_bytes(obj)
