"""Local history for the page: per time bucket and group, sums that merge exactly.

One row per (bucket, model, model_version, rollout, cohort) holds the windows' counters and the
accuracy weights; one row per (bucket, group, metric) holds the metric's dense bin counts (JSON
list of ints), their sum/min/max and the drift-score sum over windows. All of it adds, so any
time range merges exactly (the page re-buckets 14 days into plot points by adding rows).

Windows are bucketed by their own end time (the device's clock), so late or replayed windows
land where they belong. Writes are batched: `add` (MQTT thread) only sums in memory, `flush`
(a maintenance thread) upserts the pending sums in one transaction. Bounded by age (`--history-
days`, default 14) and size (`--history-mb`; the oldest buckets go first).
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.fleet.bins import MetricSum
from agent.metric_catalog import METRICS

BUCKET_S = 300
GROUP_COLUMNS = ("model", "model_version", "rollout", "cohort")
COUNTS = ("windows", "utterances", "accepted", "abstained", "dropped_frames")
_EDGES = {m.name: tuple(float(e) for e in m.edges) for m in METRICS}

SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
  bucket INTEGER NOT NULL, model TEXT NOT NULL, model_version TEXT NOT NULL,
  rollout TEXT NOT NULL, cohort TEXT NOT NULL,
  windows INTEGER NOT NULL, utterances INTEGER NOT NULL, accepted INTEGER NOT NULL,
  abstained INTEGER NOT NULL, dropped_frames INTEGER NOT NULL,
  acc_sum REAL NOT NULL, acc_n INTEGER NOT NULL,
  PRIMARY KEY (bucket, model, model_version, rollout, cohort)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS metrics (
  bucket INTEGER NOT NULL, model TEXT NOT NULL, model_version TEXT NOT NULL,
  rollout TEXT NOT NULL, cohort TEXT NOT NULL, metric TEXT NOT NULL,
  counts TEXT, hsum REAL NOT NULL, hmin REAL, hmax REAL,
  drift_sum REAL NOT NULL, drift_n INTEGER NOT NULL,
  PRIMARY KEY (bucket, metric, model, model_version, rollout, cohort)) WITHOUT ROWID;
"""


@dataclass
class _Pending:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    acc_sum: float = 0.0
    acc_n: int = 0
    metrics: dict[str, MetricSum] = field(default_factory=dict)
    drift: dict[str, list[float]] = field(default_factory=dict)


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


class History:
    """The SQLite store; `add` from the MQTT thread, `flush`/`prune`/queries from others."""

    def __init__(self, path: str | Path, *, days: float = 14.0, max_mb: float = 512.0,
                 bucket_s: int = BUCKET_S) -> None:
        self.path = str(path)
        self.days = days
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.bucket_s = bucket_s
        self._pending: dict[tuple, _Pending] = {}
        self._plock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._dblock = threading.Lock()
        with self._dblock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        self.rows_written = 0
        self.pruned = 0

    def close(self) -> None:
        self.flush()
        with self._dblock:
            self._db.close()

    # --- input (MQTT thread) ---------------------------------------------------------------
    def add(self, end_epoch: float, group: tuple[str, str, str, str],
            p: Mapping[str, Any]) -> None:
        if not math.isfinite(end_epoch):
            return
        bucket = int(end_epoch // self.bucket_s * self.bucket_s)
        with self._plock:
            key = (bucket, *group)
            acc = self._pending.get(key)
            if acc is None:
                acc = self._pending[key] = _Pending()
            c = p["counts"]
            acc.counts["windows"] += 1
            for k in COUNTS[1:]:
                acc.counts[k] += c.get(k, 0)
            a = p["estimated_accuracy"]
            if a.get("value") is not None and a["n"] > 0:
                acc.acc_sum += a["value"] * a["n"]
                acc.acc_n += a["n"]
            for name, entry in p["metrics"].items():
                if name not in _EDGES or not entry["hist"]:
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
        db.execute(
            "INSERT INTO windows VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET "
            "windows=windows+excluded.windows, utterances=utterances+excluded.utterances, "
            "accepted=accepted+excluded.accepted, abstained=abstained+excluded.abstained, "
            "dropped_frames=dropped_frames+excluded.dropped_frames, "
            "acc_sum=acc_sum+excluded.acc_sum, acc_n=acc_n+excluded.acc_n",
            (*key, *(c[k] for k in COUNTS), acc.acc_sum, acc.acc_n))
        n = 1
        for name in set(acc.metrics) | set(acc.drift):
            m = acc.metrics.get(name)
            d = acc.drift.get(name, [0.0, 0])
            old = db.execute(
                "SELECT counts, hsum, hmin, hmax, drift_sum, drift_n FROM metrics WHERE "
                "bucket=? AND model=? AND model_version=? AND rollout=? AND cohort=? AND "
                "metric=?", (*key, name)).fetchone()
            counts = list(m.counts) if m is not None and m.counts else None
            hsum = m.sum if m is not None else 0.0
            hmin = m.min if m is not None and m.counts else None
            hmax = m.max if m is not None and m.counts else None
            dsum, dn = d
            if old is not None:
                if old[0]:
                    prev = json.loads(old[0])
                    counts = prev if counts is None else [a + b for a, b in
                                                          zip(prev, counts, strict=True)]
                hsum += old[1]
                hmin = _opt(min, hmin, old[2])
                hmax = _opt(max, hmax, old[3])
                dsum += old[4]
                dn += old[5]
            db.execute("INSERT OR REPLACE INTO metrics VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                       (*key, name, json.dumps(counts, separators=(",", ":"))
                        if counts else None, hsum, hmin, hmax, dsum, dn))
            n += 1
        return n

    def prune(self, now: float) -> int:
        """Drop buckets older than `days`, then the oldest until the file fits `max_mb`."""
        cutoff = int(now - self.days * 86400)
        removed = 0
        with self._dblock:
            db = self._db
            for table in ("windows", "metrics"):
                removed += db.execute(f"DELETE FROM {table} WHERE bucket < ?",
                                      (cutoff,)).rowcount
            while self._size(db) > self.max_bytes:
                first = db.execute("SELECT MIN(bucket) FROM windows").fetchone()[0]
                if first is None:
                    break
                upto = first + max(self.bucket_s, int(self.days * 86400 / 100))
                for table in ("windows", "metrics"):
                    removed += db.execute(f"DELETE FROM {table} WHERE bucket < ?",
                                          (upto,)).rowcount
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                db.execute("VACUUM")
        self.pruned += removed
        return removed

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
               metrics: Iterable[str] = (), by_group: bool = False
               ) -> dict[tuple[str, ...], list[Point]]:
        """Sums over [start, end) cut into steps (see `grid`), per group (or all groups as key
        ()). Counters and drift sums are added by SQL; only the named metrics' histograms are
        read and merged here (exactly: integer bin counts)."""
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

        g = "model, model_version, rollout, cohort" if by_group else "''"
        lim = (first, step, first, first + n * step)
        names = list(metrics)
        with self._dblock:
            db = self._db
            rows = db.execute(
                f"SELECT (bucket - ?) / ?, {g}, SUM(windows), SUM(utterances), SUM(accepted), "
                "SUM(abstained), SUM(dropped_frames), SUM(acc_sum), SUM(acc_n) FROM windows "
                f"WHERE bucket >= ? AND bucket < ? GROUP BY 1, {g}", lim).fetchall()
            drows = db.execute(
                f"SELECT (bucket - ?) / ?, {g}, metric, SUM(drift_sum), SUM(drift_n) "
                f"FROM metrics WHERE bucket >= ? AND bucket < ? AND drift_n > 0 "
                f"GROUP BY 1, {g}, metric", lim).fetchall()
            mrows = db.execute(
                f"SELECT (bucket - ?) / ?, {g}, metric, counts, hsum, hmin, hmax FROM metrics "
                f"WHERE bucket >= ? AND bucket < ? AND counts IS NOT NULL "
                f"AND metric IN ({','.join('?' * len(names))})",
                (*lim, *names)).fetchall() if names else []
        k = 4 if by_group else 1
        for r in rows:
            pt = point(tuple(r[1:1 + k]) if by_group else (), r[0])
            if pt is not None:
                for name, v in zip(COUNTS, r[1 + k:6 + k], strict=True):
                    pt.counts[name] += v
                pt.acc_sum += r[6 + k]
                pt.acc_n += r[7 + k]
        for r in drows:
            pt = point(tuple(r[1:1 + k]) if by_group else (), r[0])
            if pt is not None:
                t = pt.drift.setdefault(r[1 + k], [0.0, 0])
                t[0] += r[2 + k]
                t[1] += r[3 + k]
        for r in mrows:
            pt = point(tuple(r[1:1 + k]) if by_group else (), r[0])
            name = r[1 + k]
            if pt is None or name not in _EDGES:
                continue
            m = pt.metrics.get(name)
            if m is None:
                m = pt.metrics[name] = MetricSum(_EDGES[name])  # type: ignore[arg-type]
            counts = json.loads(r[2 + k])
            if m.counts is None:
                m.counts = counts
            else:
                m.counts[:] = [a + b for a, b in zip(m.counts, counts, strict=True)]
            m.sum += r[3 + k]
            m.min = min(m.min, r[4 + k])
            m.max = max(m.max, r[5 + k])
        return out


def _opt(f: Any, a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return f(a, b)


