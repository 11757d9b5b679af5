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
- Field conditions (a full, read-only or corrupt state disk; see docs/faults.md): a file that
  is not a sound SQLite database (or fails `PRAGMA quick_check`) is moved aside to
  `NAME.corrupt-<UTC>` and a fresh outbox started; a read-only outbox or directory refuses to
  start (`OutboxUnusable`, one line naming the path and the fix); a write that fails (disk
  full, I/O error) never raises to the caller: the message is dropped and counted (in memory,
  then carried by the next message that fits), the failure is reported once to `StateHealth`,
  and appends resume when space returns. `close()` never raises.
- Free space: besides its own bounds the outbox keeps `reserve_bytes` (at most a tenth of the
  file system, at least 64 KiB) free; below that, the oldest rows make room instead of the file
  growing. The WAL file is bounded too (`journal_size_limit`, and a truncating checkpoint when
  it is over its bound, or over a quarter of the room left when space runs short).
- Ages use the outbox clock: monotonic within a process (a wall-clock step expires nothing);
  across a restart it continues from the last stored value plus the downtime the wall clock
  reports, trusted only when both readings are plausible (after `agent.daemon.clock.SYNC_FLOOR`) and
  bounded by `[0, 2 × max_age_s]` (a clock behind the last run's counts as no downtime).
- One process at a time: an exclusive `flock` on `PATH.lock`; a second opener gets an error
  instead of publishing the same rows twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.daemon.clock import plausible
from agent.daemon.state_health import StateHealth, describe_error
from agent.errors import AgentError
from agent.telemetry.message import Message, json_bytes

log = logging.getLogger(__name__)

OUTBOX_FILENAME = "telemetry-outbox.sqlite3"
PART = "outbox"          # the part name in StateHealth reports
REOPEN_EVERY_S = 5.0     # a database that could not be opened (disk full) is retried this often
CLOCK_STORE_S = 60.0     # the outbox clock is stored with an append at most this often
# The free-space reserve is at most a tenth of the file system but never below this: room for
# one append's WAL frames and a checkpoint, so a full disk cannot wedge the outbox.
MIN_RESERVE_BYTES = 64 * 1024

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
    # Free space left on the state file system for everything else (capped at a tenth of it).
    reserve_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_messages < 1 or self.max_bytes < 1 or self.max_age_s <= 0:
            raise ValueError("outbox bounds must be positive")
        if self.reserve_bytes < 0:
            raise ValueError("outbox reserve must not be negative")
        if self.sync not in ("normal", "full"):
            raise ValueError(f"invalid outbox sync {self.sync!r}: expected normal or full")

    @property
    def wal_limit(self) -> int:
        """Largest WAL file kept between checkpoints: the data bound, within 256 KiB..4 MiB."""
        return max(256 * 1024, min(self.max_bytes, 4 * 1024 * 1024))


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


class OutboxUnusable(AgentError):
    """The outbox cannot be written at all (read-only file or directory): nothing to degrade
    to that would not lose or re-send telemetry silently, so the agent refuses to start."""


def _kind(e: sqlite3.Error) -> str:
    """readonly | full | corrupt | other, from SQLite's error (its codes are not exposed in
    Python 3.11's exceptions, its messages are stable)."""
    msg = str(e).lower()
    if "readonly" in msg or "read-only" in msg:
        return "readonly"
    if "full" in msg or "i/o error" in msg:
        return "full"
    if isinstance(e, sqlite3.OperationalError):
        return "other"
    return "corrupt"  # file is not a database, disk image is malformed, quick_check failed


class Outbox:
    """See the module docstring for the delivery, bound, drop-count and fault contract."""

    def __init__(self, path: str | os.PathLike[str], limits: OutboxLimits | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, autocheckpoint: bool = True,
                 health: StateHealth | None = None) -> None:
        """`clock` is monotonic (ages), `wall` only bridges restarts. `autocheckpoint=False`
        leaves WAL checkpoints to `checkpoint()` (called from the publisher thread), so the
        producer's commit never pays for copying the WAL (unless the WAL outgrows its bound)."""
        self.path = Path(path)
        self._dir, self._wal_path = str(self.path.parent), str(self.path) + "-wal"
        self.limits = limits or OutboxLimits()
        self.health = health or StateHealth()
        self._clock, self._wall = clock, wall
        self._autocheckpoint = autocheckpoint
        self._boot = uuid.uuid4().hex  # marks rows of this process; others are historical
        self._lock = threading.Lock()
        self._ckpt_lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lockfile = open(str(self.path) + ".lock", "a+b")  # held open: the lock
        except OSError as e:
            raise OutboxUnusable(
                f"telemetry outbox directory {self.path.parent} is not writable ({e.strerror});"
                " remount it read-write, fix its owner, or set agent.state_dir") from None
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lockfile.close()
            raise OutboxLocked(f"telemetry outbox {self.path} is in use by another process; "
                               "give each agent its own --state-dir") from None
        self._db: sqlite3.Connection | None = None
        self._ckpt_db: sqlite3.Connection | None = None
        self._count = self._bytes = 0
        # Mirrors of what is on disk, so an append need not read it back (None/-inf: unknown,
        # read on next use): the stored pending_dropped, and a lower bound on `created` of the
        # rows (nothing younger than it can have expired). Reset whenever a write fails.
        self._pending_disk: int | None = None
        self._oldest_lb = -math.inf
        self._mem_dropped = 0      # lost while the database could not be written: not on disk
        self._unacked: set[int] = set()  # acknowledged, but the DELETE failed: retried
        self.dropped_total = 0  # dropped by this process (for stats)
        self.appended_total = 0
        self.acked_total = 0
        self._closed = False
        self._reopen_at = 0.0
        self._wal_cap = 2 * self.limits.wal_limit
        self._clock_stored = -1e18
        self._open_error: BaseException = OSError("not opened yet")
        self._mono0 = clock()
        self._base = wall()
        try:
            self._open_db(at_start=True)
        except BaseException:
            self._lockfile.close()
            raise

    # -- opening, quarantine and recovery -------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False,
                             timeout=5.0)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.limits.sync.upper()}")
            db.execute(f"PRAGMA journal_size_limit={self.limits.wal_limit}")
            db.executescript(_SCHEMA)
            if not self._autocheckpoint:
                db.execute("PRAGMA wal_autocheckpoint=0")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check}")
        except BaseException:
            db.close()
            raise
        return db

    def _open_db(self, at_start: bool = False) -> bool:
        """Open (quarantining a corrupt file once); False while the disk is full. Called at
        start and, after a failure, again at most every REOPEN_EVERY_S from `append`."""
        for attempt in (0, 1):
            try:
                db = self._connect()
                self._resume_clock(db)
                self._probe_write(db)
            except sqlite3.Error as e:
                if "db" in locals():
                    db.close()
                kind = _kind(e)
                if kind == "readonly":
                    raise OutboxUnusable(
                        f"telemetry outbox {self.path} is read-only ({describe_error(e)}); make "
                        "it writable (owner, mode, mount) or move it aside so a fresh one is "
                        "created") from None
                if kind == "corrupt" and attempt == 0:
                    self._quarantine(describe_error(e), lost="its unsent rows")
                    continue
                if kind == "full":
                    self._reopen_at = self._clock() + REOPEN_EVERY_S
                    self._open_error = e
                    if at_start:
                        self.health.write_failed(
                            PART, self.path, e, "telemetry windows are dropped and counted "
                            "until it can be opened (retried every "
                            f"{REOPEN_EVERY_S:g} s)")
                    return False
                raise OutboxUnusable(f"telemetry outbox {self.path} cannot be opened "
                                     f"({describe_error(e)}); check the state directory or "
                                     "set agent.state_dir") from None
            self._db = db
            self._forget_mirrors()
            self._recount()
            return True
        return False  # pragma: no cover - the loop returns or raises

    def _resume_clock(self, db: sqlite3.Connection) -> None:
        """Continue the outbox clock from the last process (see the module docstring)."""
        meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN "
                               "('clock_last_ms', 'wall_last_ms')").fetchall())
        newest = db.execute("SELECT max(created) FROM outbox").fetchone()[0]
        if "clock_last_ms" in meta:
            # stored with appends at most every CLOCK_STORE_S: never behind the newest row
            last, wall_last = meta["clock_last_ms"] / 1000, meta.get("wall_last_ms", 0) / 1000
            if newest is not None and newest > last:
                wall_last += newest - last
                last = float(newest)
        elif newest is None:
            return  # nothing to continue from: the clock starts at wall time
        else:  # rows stamped with wall time by an older version
            last = wall_last = float(newest)
        wall_now = self._wall()
        down = wall_now - wall_last if plausible(wall_now) and plausible(wall_last) else 0.0
        # beyond max_age_s every row expires anyway; the bound only keeps absurd values out
        self._base = last + min(max(down, 0.0), 2 * self.limits.max_age_s)
        self._mono0 = self._clock()

    def _probe_write(self, db: sqlite3.Connection) -> None:
        """A read-only file opens without complaint: prove it takes a write before relying on
        it (and store the clock, so the next process continues from here)."""
        db.execute("BEGIN IMMEDIATE")
        try:
            self._store_clock(db)
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise

    def _quarantine(self, reason: str, lost: str) -> None:
        """Move the damaged file (and its -wal/-shm) aside, kept for inspection."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        dest = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while dest.exists():
            n += 1
            dest = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        try:
            os.replace(self.path, dest)
            for suffix in ("-wal", "-shm"):
                side = Path(str(self.path) + suffix)
                if side.exists():
                    os.replace(side, str(dest) + suffix)
        except OSError as e:
            raise OutboxUnusable(
                f"telemetry outbox {self.path} is corrupt ({reason}) and cannot be moved aside "
                f"({e.strerror}); move or delete it") from None
        self.health.quarantine(self.path, dest, reason,
                               f"a fresh outbox is started ({lost} are lost to telemetry)")

    def _recover_locked(self, e: sqlite3.Error) -> None:
        """Corruption found while running: quarantine, count the rows as dropped, start fresh."""
        lost = self._count
        self._close_connections()
        self._mem_dropped += lost
        self.dropped_total += lost
        self._count = self._bytes = 0
        try:
            self._quarantine(describe_error(e), lost=f"{lost} unsent message(s)")
        except AgentError as stuck:  # cannot even be moved: telemetry stays off, counted
            self._open_error = stuck
            self._reopen_at = self._clock() + REOPEN_EVERY_S
            self.health.write_failed(PART, self.path, stuck, "telemetry windows are dropped "
                                     "and counted")
            return
        self._try_reopen_locked()

    def _try_reopen_locked(self) -> bool:
        if self._clock() < self._reopen_at:
            return False
        try:
            return self._open_db()
        except (AgentError, sqlite3.Error, OSError) as e:  # the pipeline must not die of it
            self._open_error = e
            self._reopen_at = self._clock() + REOPEN_EVERY_S
            return False

    def _close_connections(self) -> None:
        with self._ckpt_lock:
            for db in (self._ckpt_db, self._db):
                if db is not None:
                    with contextlib.suppress(sqlite3.Error):
                        db.close()
            self._ckpt_db = self._db = None

    def _failed_locked(self, e: BaseException, consequence: str) -> None:
        """A write failed: roll back, resync the counters, report (and recover if corrupt)."""
        self._forget_mirrors()
        if self._db is not None:
            _rollback(self._db)
        if isinstance(e, sqlite3.Error) and _kind(e) == "corrupt" and self._db is not None:
            self._recover_locked(e)
            return
        self.health.write_failed(PART, self.path, e, consequence)
        try:
            if self._db is not None:
                self._recount()
        except sqlite3.Error:
            pass

    # -- the outbox clock -------------------------------------------------------------------
    def now(self) -> float:
        """The outbox clock (seconds): what `created` and `live_since` are measured in."""
        return self._base + (self._clock() - self._mono0)

    def _store_clock(self, db: sqlite3.Connection) -> None:
        self._clock_stored = self.now()
        for key, value in (("clock_last_ms", self.now()), ("wall_last_ms", self._wall())):
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) "
                       "DO UPDATE SET value = excluded.value", (key, int(value * 1000)))

    # -- producer side -------------------------------------------------------------------
    def append(self, msg: Message) -> int:
        """Commit `msg` (dropping the oldest rows first if a bound requires); return its id,
        or -1 when it was dropped (too big, or the disk refused it: counted, never raised)."""
        now = self.now()
        base = json_bytes(msg.payload)
        with self._lock:
            self._check_open()
            if self._db is None and not self._try_reopen_locked():
                self._mem_dropped += 1
                self.dropped_total += 1
                self.health.write_failed(PART, self.path, self._open_error,
                                         "the message is dropped and counted")
                return -1
            db = self._db
            assert db is not None
            dropped_before = self.dropped_total  # rows dropped in a rolled-back txn stay
            try:
                db.execute("BEGIN IMMEDIATE")
                pending = (self._pending_get() + self._mem_dropped
                           + self._expire_locked(now))
                incoming = len(base) + 32
                if incoming > self.limits.max_bytes:
                    # Can never fit: drop the newest itself and report it with the next one.
                    self._pending_set(pending + 1)
                    db.execute("COMMIT")
                    self._mem_dropped = 0
                    self.dropped_total += 1
                    return -1
                pending += self._make_room_locked(incoming, self._byte_budget())
                data = json_bytes({**msg.payload, "outbox_dropped": pending}) if pending \
                    else base
                cur = db.execute(
                    "INSERT INTO outbox (topic, payload, qos, retain, created, boot, size, carried)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (msg.topic, data, msg.qos, int(msg.retain), now, self._boot, len(data),
                     pending))
                if self._pending_disk:  # the count now rides in this row
                    self._pending_set(0)
                self._oldest_lb = min(self._oldest_lb, now)
                if now - self._clock_stored >= CLOCK_STORE_S:
                    self._store_clock(db)
                db.execute("COMMIT")
            except (sqlite3.Error, OSError) as e:
                self._mem_dropped += 1
                self.dropped_total = dropped_before + 1
                self._failed_locked(e, "the message is dropped and counted in outbox_dropped "
                                       "on the next one that fits; appends resume when space "
                                       "returns")
                return -1
            self._mem_dropped = 0
            self._count += 1
            self._bytes += len(data)
            self.appended_total += 1
            self.health.write_ok(PART, self.path)
            self._bound_wal_locked()
            return int(cur.lastrowid or 0)

    def _byte_budget(self) -> int:
        """max_bytes, lowered so that the file system keeps its reserve free."""
        try:
            st = os.statvfs(self._dir)
        except OSError:
            return self.limits.max_bytes
        reserve = min(self.limits.reserve_bytes,
                      max(st.f_blocks * st.f_frsize // 10, MIN_RESERVE_BYTES))
        room = st.f_bavail * st.f_frsize - reserve
        # Short of space the WAL is kept to a fraction of what is left (down to truncating it
        # after every append): a WAL that fills the disk cannot even be checkpointed.
        self._wal_cap = 2 * self.limits.wal_limit if room >= 8 * self.limits.wal_limit \
            else max(0, room) // 4
        # At the reserve a new row replaces old ones of about its size (their pages are
        # reused, the file does not grow); the slack covers its outbox_dropped field.
        return min(self.limits.max_bytes, self._bytes + max(256, room // 2))

    def _wal_size(self) -> int:
        try:
            return os.stat(self._wal_path).st_size
        except OSError:
            return 0

    def _bound_wal_locked(self) -> None:
        """The producer's own safety net: when no checkpoint kept up (publisher stalled, file
        replayed at full speed) the WAL is copied back and truncated here."""
        if self._db is None or self._wal_size() <= self._wal_cap:
            return
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as e:
            self.health.write_failed(PART, self.path, e, "the WAL checkpoint is retried")

    # -- publisher side ------------------------------------------------------------------
    def peek(self, after_id: int = 0, limit: int = 100,
             live_since: float | None = None) -> list[OutboxRow]:
        """The oldest rows with id > after_id, in order; earlier processes' rows marked.

        With `live_since` (an outbox clock value, see `now()`), rows committed before it are
        marked historical too: the MQTT sink passes its connect time when replays after a
        reconnect should be marked.
        """
        with self._lock:
            self._check_open()
            if self._db is None:
                return []
            try:
                rows = self._db.execute(
                    "SELECT id, topic, payload, qos, retain, created, boot FROM outbox "
                    "WHERE id > ? ORDER BY id LIMIT ?",
                    (after_id, limit + len(self._unacked))).fetchall()
            except sqlite3.Error as e:
                self._failed_locked(e, "telemetry is read again on the next attempt")
                return []
        out = []
        for rid, topic_, payload, qos, retain, created, boot in rows:
            if rid in self._unacked:
                continue  # delivered; only its DELETE is pending
            historical = boot != self._boot or (live_since is not None and created < live_since)
            if historical:
                payload = _mark_historical(payload)
            out.append(OutboxRow(rid, topic_, bytes(payload), qos, bool(retain), created,
                                 historical))
        return out[:limit]

    def ack(self, ids: Iterable[int]) -> int:
        """Delete acknowledged rows (unknown or already dropped ids are ignored). When the
        delete fails (disk full) the ids are kept and retried, and not sent again meanwhile."""
        ids = list(ids)
        if not ids:
            return 0
        with self._lock:
            self._check_open()
            ids += [i for i in self._unacked if i not in ids]
            if self._db is None:
                self._unacked.update(ids)
                return 0
            n = size = 0
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for rid in ids:
                    row = self._db.execute("DELETE FROM outbox WHERE id = ? RETURNING size",
                                           (rid,)).fetchone()
                    if row is not None:
                        n += 1
                        size += int(row[0])
                self._db.execute("COMMIT")
            except (sqlite3.Error, OSError) as e:
                self._unacked.update(ids)
                self._failed_locked(e, "delivered rows are deleted later, not sent again")
                return 0
            self._unacked.clear()
            self._count -= n
            self._bytes -= size
            self.acked_total += n
            return n

    def expire(self) -> int:
        """Drop rows older than max_age_s now (the publisher calls this periodically)."""
        with self._lock:
            self._check_open()
            if self._db is None:
                return 0
            dropped_before = self.dropped_total
            try:
                self._db.execute("BEGIN IMMEDIATE")
                n = self._expire_locked(self.now())
                if n:
                    self._pending_set(self._pending_get() + n)
                self._db.execute("COMMIT")
            except (sqlite3.Error, OSError) as e:
                self.dropped_total = dropped_before
                self._failed_locked(e, "expiry is retried later")
                return 0
            return n

    def checkpoint(self) -> None:
        """Copy the WAL into the database on a separate connection (PASSIVE: the producer's
        appends proceed meanwhile; TRUNCATE when the WAL is over its bound). Call from one
        thread only. Never raises: a failure is reported and the checkpoint retried later."""
        with self._ckpt_lock:
            if self._closed or self._db is None:
                return
            try:
                if self._ckpt_db is None:
                    self._ckpt_db = sqlite3.connect(str(self.path), isolation_level=None,
                                                    check_same_thread=False, timeout=5.0)
                mode = "TRUNCATE" if self._wal_size() > self.limits.wal_limit else "PASSIVE"
                self._ckpt_db.execute(f"PRAGMA wal_checkpoint({mode})")
            except sqlite3.Error as e:
                self.health.write_failed(PART, self.path, e, "the WAL checkpoint is retried")

    # -- introspection -------------------------------------------------------------------
    def __len__(self) -> int:
        return self._count

    @property
    def size_bytes(self) -> int:
        return self._bytes

    @property
    def available(self) -> bool:
        """False while the database could not be opened (e.g. the disk was full at start)."""
        return self._db is not None

    def pending_dropped(self) -> int:
        with self._lock:
            self._check_open()
            on_disk = self._meta_get("pending_dropped") if self._db is not None else 0
            return on_disk + self._mem_dropped

    def stats(self) -> dict[str, Any]:
        return {"queued": self._count, "queued_bytes": self._bytes,
                "dropped": self.dropped_total, "appended": self.appended_total,
                "acked": self.acked_total}

    def close(self) -> None:
        """Record what is pending, checkpoint, release the lock. Never raises: at exit there
        is nobody left to handle it; committed rows stay for the next start either way."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            db = self._db
            if db is None and self._mem_dropped:
                log.warning("telemetry outbox %s could not be opened (%s): %d dropped "
                            "message(s) not recorded", self.path,
                            describe_error(self._open_error), self._mem_dropped)
            try:
                if db is not None:
                    db.execute("BEGIN IMMEDIATE")
                    if self._mem_dropped:
                        self._pending_set(self._pending_get() + self._mem_dropped)
                    self._store_clock(db)
                    db.execute("COMMIT")
                    self._mem_dropped = 0
                    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except (sqlite3.Error, OSError) as e:
                if db is not None:
                    _rollback(db)
                log.warning("telemetry outbox %s not finished cleanly at exit (%s); committed "
                            "messages stay for the next start%s", self.path, describe_error(e),
                            f", {self._mem_dropped} dropped message(s) not recorded"
                            if self._mem_dropped else "")
            finally:
                self._close_connections()
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
        assert self._db is not None
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _meta_set(self, key: str, value: int) -> None:
        assert self._db is not None
        self._db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) "
                         "DO UPDATE SET value = excluded.value", (key, value))

    def _pending_get(self) -> int:
        if self._pending_disk is None:
            self._pending_disk = self._meta_get("pending_dropped")
        return self._pending_disk

    def _pending_set(self, value: int) -> None:
        self._meta_set("pending_dropped", value)
        self._pending_disk = value

    def _forget_mirrors(self) -> None:
        """After a failed (rolled back) write or a reopen the disk is the truth again."""
        self._pending_disk = None
        self._oldest_lb = -math.inf

    def _drop_rows(self, rows: list[tuple[int, int, int]]) -> int:
        """Delete (id, size, carried) rows; return how many messages that loses in total."""
        assert self._db is not None
        lost = 0
        for rid, size, carried in rows:
            self._db.execute("DELETE FROM outbox WHERE id = ?", (rid,))
            self._count -= 1
            self._bytes -= size
            lost += 1 + carried  # a dropped row's own report must not vanish with it
        self.dropped_total += len(rows)
        return lost

    def _recount(self) -> None:
        assert self._db is not None
        row = self._db.execute("SELECT count(*), total(size) FROM outbox").fetchone()
        self._count, self._bytes = int(row[0]), int(row[1])

    def _expire_locked(self, now: float) -> int:
        if not self._count:
            return 0
        assert self._db is not None
        # Walk from the oldest row and stop at the first young one: O(expired), not O(rows),
        # because this runs on every append (the caller's thread). Rows are in `created`
        # order, so the first young one bounds the rest: until the cutoff passes it, no walk.
        cutoff = now - self.limits.max_age_s
        if cutoff <= self._oldest_lb:
            return 0
        rows = []
        oldest = math.inf  # every row expired: the next append sets the bound
        cur = self._db.execute("SELECT id, size, carried, created FROM outbox ORDER BY id")
        for rid, size, carried, created in cur:
            if created >= cutoff:
                oldest = created
                break
            rows.append((rid, size, carried))
        cur.close()
        self._oldest_lb = oldest
        return self._drop_rows(rows) if rows else 0

    def _make_room_locked(self, incoming: int, budget: int) -> int:
        over_n = self._count + 1 - self.limits.max_messages
        over_b = self._bytes + incoming - budget
        if over_n <= 0 and over_b <= 0:
            return 0
        assert self._db is not None
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


def _rollback(db: sqlite3.Connection) -> None:
    """Roll back if a transaction is open. SQLite may already have rolled back by itself (on a
    full disk): a second ROLLBACK would raise "no transaction is active" and hide the cause."""
    try:
        if db.in_transaction:
            db.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def _mark_historical(payload: bytes) -> bytes:
    try:
        obj = json.loads(payload)
    except ValueError:
        return payload
    if not isinstance(obj, dict):
        return payload
    obj["historical"] = True
    return json_bytes(obj)
