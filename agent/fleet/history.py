"""Local history for the page: per time bucket and group, sums that merge exactly.

One row per (bucket, model, model_version, rollout, cohort) holds the windows' counters, the
accuracy weights and, per catalogue metric, the drift-score sum and count; one row per (bucket,
group, metric) holds a metric's dense bin counts (JSON list of ints) and their sum/min/max, for
the metrics in `hist_metrics`. All of it adds, so any time range merges exactly (the page
re-buckets 14 days into plot points by adding rows, counters and drift in SQL).

Windows are bucketed by their own end time (the device's clock), so late or replayed windows
land where they belong; every counters row also keeps the server's clock when it last received
a window for it (`received`; its histogram rows go with it). Writes are batched: `add` (MQTT
thread) only sums in memory, `flush` (a maintenance thread) upserts the pending sums in one
transaction. Bounded by age (`--history-days`, default 14) and size (`--history-mb`), both on
a row's age, the older of its two times, MIN(bucket, received): a device whose clock runs
ahead cannot keep its buckets past `days` of the server's time (nor make the size bound evict
the real history first), and a late window is not kept past the range it is plotted in. A
prune deletes a slice at a time, the lock (which the page reads under) released in between.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import add
from pathlib import Path
from typing import Any

from msgspec.json import decode as _loads

from agent.fleet.bins import MetricSum
from agent.monitoring.metric_catalog import DRIFT_ONLY, METRICS

BUCKET_S = 300
GROUP_COLUMNS = ("model", "model_version", "rollout", "cohort")
COUNTS = ("windows", "utterances", "accepted", "abstained", "dropped_frames")
DRIFT = tuple(m.name for m in (*METRICS, *DRIFT_ONLY))
# Histograms kept over time (each costs one merge per message): what the page plots and what
# an operator compares between model versions. `--history-metrics all` keeps every metric.
HIST_METRICS = ("input_rms_dbfs", "snr_db", "noise_floor_dbfs", "utterance_length_s",
                "confidence", "digit_confidence", "compute_latency_ms")
_EDGES = {m.name: tuple(float(e) for e in m.edges) for m in METRICS}

SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
  bucket INTEGER NOT NULL, model TEXT NOT NULL, model_version TEXT NOT NULL,
  rollout TEXT NOT NULL, cohort TEXT NOT NULL,
  windows INTEGER NOT NULL, utterances INTEGER NOT NULL, accepted INTEGER NOT NULL,
  abstained INTEGER NOT NULL, dropped_frames INTEGER NOT NULL,
  acc_sum REAL NOT NULL, acc_n INTEGER NOT NULL, received INTEGER NOT NULL,
  PRIMARY KEY (bucket, model, model_version, rollout, cohort)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hists (
  bucket INTEGER NOT NULL, model TEXT NOT NULL, model_version TEXT NOT NULL,
  rollout TEXT NOT NULL, cohort TEXT NOT NULL, metric TEXT NOT NULL,
  counts TEXT NOT NULL, hsum REAL NOT NULL, hmin REAL NOT NULL, hmax REAL NOT NULL,
  PRIMARY KEY (metric, bucket, model, model_version, rollout, cohort)) WITHOUT ROWID;
"""
TABLES = ("windows", "hists")
AGE = "MIN(bucket, received)"  # a row's age: the older of its plotted and its received time
INDEX = f"CREATE INDEX IF NOT EXISTS windows_age ON windows ({AGE})"
SLICE_ROWS = 500  # a prune deletes at most this many counters rows (and their histograms) a
# hold of the lock: <= ~50 ms at load 12 here (14 days of history pruned: 20 holds)
_KEY = " AND ".join(f"{c}=?" for c in ("bucket", *GROUP_COLUMNS))


@dataclass
class _Pending:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    acc_sum: float = 0.0
    acc_n: int = 0
    metrics: dict[str, MetricSum] = field(default_factory=dict)
    drift: dict[str, list[float]] = field(default_factory=dict)
    received: float = 0.0  # the server's clock at the latest window (max)


@dataclass
class Point:
    """One plot point: sums over [start, end) for one group (or all groups)."""

    start: int
    end: int
    counts: dict[str, int]
    acc_sum: float
    acc_n: int
    metrics: dict[str, MetricSum]
    drift: dict[str, list[float]]

    @property
    def accuracy(self) -> float | None:
        return self.acc_sum / self.acc_n if self.acc_n else None

    @property
    def abstain_rate(self) -> float | None:
        d = self.counts["accepted"] + self.counts["abstained"]
        return self.counts["abstained"] / d if d else None

    def drift_mean(self, metric: str) -> float | None:
        s = self.drift.get(metric)
        return s[0] / s[1] if s and s[1] else None

    def quantiles(self, metric: str, qs: Sequence[float]) -> list[float | None]:
        m = self.metrics.get(metric)
        return m.quantiles(qs) if m is not None else [None for _ in qs]


CLAMP = 2**62  # a stored sum stops here (SQLite integers are 64-bit; Python's are not)


class History:
    """The SQLite store; `add` from the MQTT thread, `flush`/`prune`/queries from others."""

    def __init__(self, path: str | Path, *, days: float = 14.0, max_mb: float = 512.0,
                 bucket_s: int = BUCKET_S, hist_metrics: Sequence[str] = HIST_METRICS,
                 clock: Callable[[], float] = time.time) -> None:
        self.hist_metrics = tuple(m for m in hist_metrics if m in _EDGES)
        self.path = str(path)
        self.days = days
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.bucket_s = bucket_s
        self.clock = clock  # the server's clock: a window's receive time unless given
        self._pending: dict[tuple, _Pending] = {}
        self._plock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._dblock = threading.Lock()
        with self._dblock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            self._migrate()
            self._db.execute(INDEX)
            have = {r[1] for r in self._db.execute("PRAGMA table_info(windows)")}
            for name in DRIFT:  # per-metric drift sums; a newer catalogue adds columns
                if f"d_{name}" not in have:
                    self._db.execute(f"ALTER TABLE windows ADD COLUMN d_{name} REAL NOT NULL "
                                     "DEFAULT 0")
                    self._db.execute(f"ALTER TABLE windows ADD COLUMN n_{name} INTEGER NOT "
                                     "NULL DEFAULT 0")
        self.rows_written = 0
        self.pruned = 0
        self.clamped = 0  # stored sums that reached CLAMP (flagged: eva_fleet_capped_total)

    def _migrate(self) -> None:
        """A file of the version before `received`: its rows take the time of the upgrade (a
        column default, no rewrite), so they age by their buckets as they did, and a bucket
        from a clock that ran ahead goes `days` after the upgrade."""
        have = {r[1] for r in self._db.execute("PRAGMA table_info(windows)")}
        if "received" not in have:
            self._db.execute("ALTER TABLE windows ADD COLUMN received INTEGER NOT NULL "
                             f"DEFAULT {int(self.clock())}")

    def close(self) -> None:
        self.flush()
        with self._dblock:
            self._db.close()

    # --- input (MQTT thread) ---------------------------------------------------------------
    def add(self, end_epoch: float, group: tuple[str, str, str, str],
            p: Mapping[str, Any], *, received: float | None = None) -> None:
        """One window, bucketed by its end; `received`: the server's clock when it came."""
        if not math.isfinite(end_epoch):
            return
        bucket = int(end_epoch // self.bucket_s * self.bucket_s)
        with self._plock:
            acc = self._pending_at(bucket, group, received, 1, p["counts"])
            a = p["estimated_accuracy"]
            if a.get("value") is not None and a["n"] > 0:
                acc.acc_sum += a["value"] * a["n"]
                acc.acc_n += a["n"]
            metrics = p["metrics"]
            for name in self.hist_metrics:
                entry = metrics.get(name)
                if entry is None or not entry["hist"]:
                    continue
                m = acc.metrics.get(name)
                if m is None:
                    m = acc.metrics[name] = MetricSum(_EDGES[name])  # type: ignore[arg-type]
                m.add(entry)
            drift = p.get("drift")
            if isinstance(drift, dict):
                for name, d in drift.items():
                    s = d.get("score") if isinstance(d, dict) else None
                    if type(s) in (int, float) and math.isfinite(s):
                        t = acc.drift.setdefault(name, [0.0, 0])
                        t[0] += s
                        t[1] += 1

    def add_totals(self, bucket: int, group: tuple[str, str, str, str], totals: Any,
                   drift: Sequence[Sequence[float]], *, received: float | None = None) -> None:
        """Add sums already merged by the caller (agent.fleet.ingest: one bucket and group's
        windows, with `windows`, `counts`, `acc_sum`, `acc_n`, `metrics` like FleetState's
        totals) and the drift score [sums, counts] in DRIFT order; `received`: the server's
        clock at the latest of those windows (now unless given)."""
        with self._plock:
            acc = self._pending_at(bucket, group, received, totals.windows, totals.counts)
            acc.acc_sum += totals.acc_sum
            acc.acc_n += totals.acc_n
            for name in self.hist_metrics:
                m = totals.metrics.get(name)
                if m is None or not m.counts:
                    continue
                mine = acc.metrics.get(name)
                if mine is None:
                    mine = acc.metrics[name] = MetricSum(_EDGES[name])  # type: ignore[arg-type]
                mine.merge_in(m)
            if drift and len(drift[0]) == len(DRIFT):
                for name, dsum, dn in zip(DRIFT, drift[0], drift[1], strict=True):
                    if dn:
                        t = acc.drift.setdefault(name, [0.0, 0])
                        t[0] += dsum
                        t[1] += dn

    def _pending_at(self, bucket: int, group: tuple[str, str, str, str],
                    received: float | None, windows: int, counts: Mapping[str, int]
                    ) -> _Pending:
        """The pending sums of (bucket, group), with `windows` windows and their `counts`
        added and the receive time moved on; under `_plock`."""
        received = self.clock() if received is None else received
        key = (bucket, *group)
        acc = self._pending.get(key)
        if acc is None:
            acc = self._pending[key] = _Pending()
        acc.received = max(acc.received, received)
        acc.counts["windows"] += windows
        for k in COUNTS[1:]:
            acc.counts[k] += counts.get(k, 0)
        return acc

    # --- writing -----------------------------------------------------------------------------
    def flush(self) -> int:
        """Upsert everything pending in one transaction; returns the rows written."""
        with self._plock:
            pending, self._pending = self._pending, {}
        if not pending:
            return 0
        n = 0
        with self._dblock:
            db = self._db
            db.execute("BEGIN")
            try:
                for key, acc in pending.items():
                    n += self._upsert(db, key, acc)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        self.rows_written += n
        return n

    def _upsert(self, db: sqlite3.Connection, key: tuple, acc: _Pending) -> int:
        c = acc.counts
        cols = ["windows", "utterances", "accepted", "abstained", "dropped_frames", "acc_sum",
                "acc_n"]
        vals: list[Any] = [*(self._clamp(c[k]) for k in COUNTS), acc.acc_sum,
                           self._clamp(acc.acc_n)]
        for name, (dsum, dn) in acc.drift.items():
            if name in DRIFT:
                cols += [f"d_{name}", f"n_{name}"]
                vals += [dsum, self._clamp(dn)]
        received = int(acc.received)
        db.execute(
            f"INSERT INTO windows (bucket, {', '.join(GROUP_COLUMNS)}, {', '.join(cols)}, "
            f"received) VALUES ({', '.join('?' * (6 + len(cols)))}) ON CONFLICT DO UPDATE SET "
            + ", ".join(f"{col}=MIN({col}+excluded.{col}, {CLAMP})" for col in cols)
            + ", received=MAX(received, excluded.received)",
            (*key, *vals, received))
        n = 1
        for name, m in acc.metrics.items():
            if not m.counts:
                continue
            old = db.execute(
                "SELECT counts, hsum, hmin, hmax FROM hists WHERE metric=? AND bucket=? AND "
                "model=? AND model_version=? AND rollout=? AND cohort=?",
                (name, *key)).fetchone()
            counts, hsum, hmin, hmax = list(m.counts), m.sum, m.min, m.max
            if old is not None:
                counts = [a + b for a, b in zip(json.loads(old[0]), counts, strict=True)]
                hsum, hmin, hmax = hsum + old[1], min(hmin, old[2]), max(hmax, old[3])
            if hsum != hsum:  # inf - inf from two absurd windows: NULL would fail the flush
                hsum = 0.0
            db.execute("INSERT OR REPLACE INTO hists VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (*key, name, json.dumps(counts, separators=(",", ":")), hsum, hmin,
                        hmax))
            n += 1
        return n

    def _clamp(self, v: int) -> int:
        if v < CLAMP:
            return v
        self.clamped += 1
        return CLAMP

    def prune(self, now: float) -> int:
        """Drop the rows older than `days` by the server's clock `now`, then the oldest until
        the file fits `max_mb`; a row's age is MIN(bucket, received) (module docstring), its
        histograms go with it. SLICE_ROWS counters rows at a time, with the lock released in
        between (the page reads under it). Deleted pages are reused (the size counts pages in
        use): no VACUUM, which rewrote the whole file under the lock, once per slice."""
        cutoff = int(now - self.days * 86400)
        step = max(self.bucket_s, int(self.days * 86.4))  # a size slice: 0.1 % of `days`
        removed = 0
        with self._dblock:
            names = self._hist_names(self._db)
        while True:
            with self._dblock:
                db = self._db
                first = db.execute(f"SELECT MIN({AGE}) FROM windows").fetchone()[0]
                if first is None:
                    break
                old = first < cutoff
                if not old and self._size(db) <= self.max_bytes:
                    break
                keys = db.execute(
                    f"SELECT bucket, {', '.join(GROUP_COLUMNS)} FROM windows WHERE {AGE} < ? "
                    f"ORDER BY {AGE} LIMIT {SLICE_ROWS}",
                    (cutoff if old else first + step,)).fetchall()
                db.execute("BEGIN")
                try:
                    removed += db.executemany(f"DELETE FROM windows WHERE {_KEY}", keys).rowcount
                    removed += db.executemany(  # by primary key: the metrics in the file
                        f"DELETE FROM hists WHERE metric=? AND {_KEY}",
                        [(m, *k) for k in keys for m in names]).rowcount
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
        with self._dblock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.pruned += removed
        return removed

    @staticmethod
    def _hist_names(db: sqlite3.Connection) -> list[str]:
        """The metrics with histogram rows (the primary key's first column: a seek each)."""
        names: list[str] = []
        while row := db.execute("SELECT metric FROM hists WHERE metric > ? ORDER BY metric "
                                "LIMIT 1", (names[-1] if names else "",)).fetchone():
            names.append(row[0])
        return names

    @staticmethod
    def _size(db: sqlite3.Connection) -> int:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * db.execute("PRAGMA page_size").fetchone()[0]

    def size_bytes(self) -> int:
        with self._dblock:
            return self._size(self._db)

    # --- queries -----------------------------------------------------------------------------
    def grid(self, start: float, end: float, points: int) -> tuple[int, int, int]:
        """(first bucket, step, n): [start, end) cut into at most ~`points` aligned steps."""
        step = max(self.bucket_s, math.ceil((end - start) / points / self.bucket_s)
                   * self.bucket_s)
        first = int(start // step * step)
        return first, step, max(1, math.ceil((end - first) / step))

    def series(self, start: float, end: float, points: int, *,
               metrics: Iterable[str] = (), by_group: bool = False, drift: bool = False
               ) -> dict[tuple[str, ...], list[Point]]:
        """Sums over [start, end) cut into steps (see `grid`), per group (or all groups as key
        ()): counters and accuracy weights always, drift sums if asked, histograms of the named
        metrics (merged exactly: integer bin counts). Counters and drift are added by SQL."""
        first, step, n = self.grid(start, end, points)
        out: dict[tuple[str, ...], list[Point]] = {}

        def point(key: tuple[str, ...], i: int) -> Point | None:
            if not 0 <= i < n:
                return None
            pts = out.get(key)
            if pts is None:
                pts = out[key] = [Point(first + j * step, first + (j + 1) * step,
                                        dict.fromkeys(COUNTS, 0), 0.0, 0, {}, {})
                                  for j in range(n)]
            return pts[i]

        g = ", ".join(GROUP_COLUMNS) if by_group else "''"
        k = 4 if by_group else 1
        lim = (first, step, first, first + n * step)
        # TOTAL, not SUM: SUM raises on integer overflow (and the page answered 500 for as long
        # as the row stayed); TOTAL is a float, exact below 2^53
        dcols = "".join(f", TOTAL(d_{m}), TOTAL(n_{m})" for m in DRIFT) if drift else ""
        names = [m for m in metrics if m in _EDGES]
        with self._dblock:
            db = self._db
            rows = db.execute(
                f"SELECT (bucket - ?) / ?, {g}, TOTAL(windows), TOTAL(utterances), "
                f"TOTAL(accepted), TOTAL(abstained), TOTAL(dropped_frames), TOTAL(acc_sum), "
                f"TOTAL(acc_n){dcols} "
                f"FROM windows WHERE bucket >= ? AND bucket < ? GROUP BY 1, {g}",
                lim).fetchall()
            mrows = []
            for name in names:
                mrows += db.execute(
                    f"SELECT (bucket - ?) / ?, {g}, metric, counts, hsum, hmin, hmax FROM hists "
                    "WHERE metric = ? AND bucket >= ? AND bucket < ?",
                    (first, step, name, first, first + n * step)).fetchall()
        for r in rows:
            pt = point(tuple(r[1:1 + k]) if by_group else (), r[0])
            if pt is None:
                continue
            for name, v in zip(COUNTS, r[1 + k:6 + k], strict=True):
                pt.counts[name] += int(v)
            pt.acc_sum += r[6 + k]
            pt.acc_n += int(r[7 + k])
            if drift:
                base = 8 + k
                for i, name in enumerate(DRIFT):
                    dn = int(r[base + 2 * i + 1])
                    if dn:
                        t = pt.drift.setdefault(name, [0.0, 0])
                        t[0] += r[base + 2 * i]
                        t[1] += dn
        for r in mrows:
            pt = point(tuple(r[1:1 + k]) if by_group else (), r[0])
            name = r[1 + k]
            if pt is None:
                continue
            m = pt.metrics.get(name)
            if m is None:
                m = pt.metrics[name] = MetricSum(_EDGES[name])  # type: ignore[arg-type]
            counts = _loads(r[2 + k])
            if m.counts is None:
                m.counts = counts
            else:
                m.counts[:] = map(add, m.counts, counts)
            m.sum += r[3 + k]
            m.min = min(m.min, r[4 + k])
            m.max = max(m.max, r[5 + k])
        return out
