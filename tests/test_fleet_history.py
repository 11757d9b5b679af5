"""The SQLite history of `fleet serve`: exact merges over any range, bounded by age and size,
and the command's one-line refusals."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from agent.fleet.history import HIST_METRICS, History
from agent.fleet.options import parse_broker  # noqa: F401 - the module the command lives beside
from agent.fleet.state import group_key
from agent.monitoring.metric_catalog import BY_NAME
from agent.monitoring.windows import Histogram
from tests.fleet_sim import SimFleet, utc_epoch_of

END = 1_800_000_000.0


def _fill(h: History, sim: SimFleet, flush_every: int = 7) -> list[dict]:
    payloads = [p for i in range(sim.devices) for p in sim.stats_payloads(i)]
    for n, p in enumerate(payloads, 1):
        h.add(utc_epoch_of(p), group_key(p), p, received=utc_epoch_of(p))  # on time
        if n % flush_every == 0:  # partial flushes: rows are upserted (added to) repeatedly
            h.flush()
    h.flush()
    return payloads


def _hist_sum(payloads: list[dict], metric: str) -> np.ndarray:
    total = Histogram(BY_NAME[metric].edges)
    for p in payloads:
        e = p["metrics"][metric]
        if e["hist"]:
            total.merge_in(Histogram.from_compact(BY_NAME[metric].edges, e["hist"]))
    return total.counts


def test_any_range_merges_exactly(tmp_path: Path) -> None:
    h = History(tmp_path / "h.sqlite")
    sim = SimFleet(devices=10, windows=36, window_s=600.0, end_epoch=END)  # 6 hours
    payloads = _fill(h, sim)
    start = END - 6 * 3600
    metric = HIST_METRICS[0]
    for points in (1, 5, 72):
        by_group = h.series(start, END + 1, points, metrics=[metric], by_group=True)
        assert {k[1] for k in by_group} == {"1.0.0", "2.0.0"}
        for key, pts in by_group.items():
            mine = [p for p in payloads if group_key(p) == key]
            assert sum(pt.counts["utterances"] for pt in pts) == \
                sum(p["counts"]["utterances"] for p in mine)
            assert sum(pt.counts["windows"] for pt in pts) == len(mine)
            merged = np.zeros(len(BY_NAME[metric].edges) + 1, dtype=np.int64)
            for pt in pts:
                if metric in pt.metrics:
                    merged += np.asarray(pt.metrics[metric].counts)
            assert np.array_equal(merged, _hist_sum(mine, metric)), (points, key)
    # a sub-range holds exactly the windows that ended in it (bucketed by their own end time;
    # ranges are widened to whole steps, aligned to multiples of the step: these are)
    lo, hi = END - 4 * 3600, END - 2 * 3600
    (pts,) = h.series(lo, hi, 1).values()
    inside = [p for p in payloads if lo <= utc_epoch_of(p) < hi]
    assert sum(pt.counts["windows"] for pt in pts) == len(inside)
    drift = [p for p in h.series(start, END + 1, 1, drift=True)[()] if p.drift]
    assert drift and all(n > 0 for p in drift for _, n in p.drift.values())
    h.close()


def test_served_model_feeds_the_history_exactly_what_each_window_would(tmp_path: Path) -> None:
    """`fleet serve` merges each window once, into (time bucket, group) pending sums that
    settle into both the group totals and the history. Settled at arbitrary points (reads,
    flushes), the history holds exactly what adding every window on its own gives: counters,
    accuracy weights, every kept histogram and the drift sums, bucket by bucket."""
    from agent.fleet.ingest import FleetModel

    sim = SimFleet(devices=8, windows=24, window_s=120.0, end_epoch=END)  # 48 min, ~10 buckets
    ref = History(tmp_path / "ref.sqlite")
    _fill(ref, sim)
    msgs = sim.messages()
    start = END - 3600

    def check(settle_every: int, read_every: int, name: str) -> FleetModel:
        served = History(tmp_path / f"{name}.sqlite")
        model = FleetModel(history=served, clock=lambda: END)
        for n, (t, b) in enumerate(msgs, 1):
            model.ingest(t, b, t.endswith("/birth"))
            if n % read_every == 0:
                with model.reading():  # a page or a scrape: settles mid-stream
                    pass
            if n % settle_every == 0:
                model.settle()
                served.flush()
        model.settle()
        served.flush()
        for points in (1, 60):
            a = ref.series(start, END + 1, points, metrics=HIST_METRICS, by_group=True,
                           drift=True)
            b = served.series(start, END + 1, points, metrics=HIST_METRICS, by_group=True,
                              drift=True)
            assert set(a) == set(b) and len(a) == 2
            for key in a:
                for pa, pb in zip(a[key], b[key], strict=True):
                    assert pa.counts == pb.counts and pa.acc_n == pb.acc_n, (name, points)
                    assert abs(pa.acc_sum - pb.acc_sum) < 1e-9
                    assert {m: x.counts for m, x in pa.metrics.items()} == \
                        {m: x.counts for m, x in pb.metrics.items()}
                    assert set(pa.drift) == set(pb.drift)
                    for m, (dsum, dn) in pa.drift.items():
                        assert pb.drift[m][1] == dn and abs(pb.drift[m][0] - dsum) < 1e-9
        served.close()
        return model

    check(10**9, 10**9, "once")  # every bucket of every group settled in one go
    model = check(29, 13, "interleaved")
    with model.reading():
        groups = {k: g.counts["utterances"] for k, g in model.state.groups.items()}
    whole = ref.series(start, END + 1, 1, by_group=True)
    assert groups == {k: sum(p.counts["utterances"] for p in pts) for k, pts in whole.items()}
    ref.close()


def test_bounded_by_age_and_by_size(tmp_path: Path) -> None:
    h = History(tmp_path / "h.sqlite", days=1.0)
    sim = SimFleet(devices=4, windows=96, window_s=1800.0, end_epoch=END)  # 2 days
    payloads = _fill(h, sim, flush_every=50)
    assert h.prune(END) > 0
    (pts,) = h.series(END - 3 * 86400, END + 1, 1).values()
    last_day = [p for p in payloads if utc_epoch_of(p) >= END - 86400]
    assert 0 < len(last_day) < len(payloads)
    assert sum(p.counts["windows"] for p in pts) == len(last_day)  # only the last day's left
    small = History(tmp_path / "small.sqlite", days=30.0, max_mb=0.15)
    many = _fill(small, SimFleet(devices=4, windows=400, window_s=300.0, end_epoch=END), 200)
    before = small.size_bytes()
    assert before > 0.15 * 2**20
    assert small.prune(END) > 0
    assert small.size_bytes() <= 0.15 * 2**20
    (pts,) = small.series(END - 2 * 86400, END + 1, 1).values()
    assert 0 < sum(p.counts["windows"] for p in pts) < 4 * 400  # the oldest went first
    newest = sum(p.counts["windows"] for p in small.series(END - 3600, END + 1, 1)[()])
    first, _, _ = small.grid(END - 3600, END + 1, 1)
    assert newest == sum(1 for p in many if utc_epoch_of(p) >= first)  # the newest stayed
    h.close()
    small.close()


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "fleet", "serve", *args],
                          capture_output=True, text=True, timeout=60)


def test_serve_refuses_bad_options_and_a_busy_port_in_one_line(tmp_path: Path) -> None:
    r = _serve("--broker", "mqtt://127.0.0.1:1", "--listen", "nowhere")
    assert r.returncode == 2 and "--listen" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _serve("--broker", "mqtt://127.0.0.1:1", "--share", "a/b")
    assert r.returncode == 2 and "--share" in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _serve("--broker", "mqtt://127.0.0.1:1", "--listen", f"127.0.0.1:{port}",
                   "--history", "none")
    assert r.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _serve("--broker", "mqtt://127.0.0.1:1", "--listen", "127.0.0.1:0", "--history",
               str(tmp_path / "no" / "such" / "dir" / "h.sqlite"))
    assert r.returncode == 1 and "--history" in r.stderr, r.stderr
    assert json.dumps(r.stderr)  # printable


OLD_SCHEMA = """
CREATE TABLE windows (
  bucket INTEGER NOT NULL, model TEXT NOT NULL, model_version TEXT NOT NULL,
  rollout TEXT NOT NULL, cohort TEXT NOT NULL,
  windows INTEGER NOT NULL, utterances INTEGER NOT NULL, accepted INTEGER NOT NULL,
  abstained INTEGER NOT NULL, dropped_frames INTEGER NOT NULL,
  acc_sum REAL NOT NULL, acc_n INTEGER NOT NULL,
  PRIMARY KEY (bucket, model, model_version, rollout, cohort)) WITHOUT ROWID;
CREATE TABLE hists (
  bucket INTEGER NOT NULL, model TEXT NOT NULL, model_version TEXT NOT NULL,
  rollout TEXT NOT NULL, cohort TEXT NOT NULL, metric TEXT NOT NULL,
  counts TEXT NOT NULL, hsum REAL NOT NULL, hmin REAL NOT NULL, hmax REAL NOT NULL,
  PRIMARY KEY (metric, bucket, model, model_version, rollout, cohort)) WITHOUT ROWID;
"""


def test_a_history_of_the_previous_version_is_kept_and_its_future_buckets_age_out(
        tmp_path: Path) -> None:
    """The file of a version that bucketed and pruned by the devices' clocks only (and had no
    plausibility window: a bucket 3 days ahead could be in it): opened, nothing is lost, new
    windows add to its rows, and its future bucket goes `days` after the upgrade."""
    import sqlite3
    import time

    now = float(int(time.time()))
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    group = ("fsdd-digits", "1.0.0", "", "")
    counts = json.dumps([1] * (len(BY_NAME["snr_db"].edges) + 1))
    for bucket, n in ((now - 2 * 86400, 5), (now - 300, 7), (now + 3 * 86400, 11)):
        db.execute("INSERT INTO windows VALUES (?,?,?,?,?,?,?,0,0,0,0.0,0)",
                   (int(bucket) // 300 * 300, *group, n, 10 * n))
        db.execute("INSERT INTO hists VALUES (?,?,?,?,?,'snr_db',?,3.0,1.0,2.0)",
                   (int(bucket) // 300 * 300, *group, counts))
    db.commit()
    db.close()

    h = History(path, days=14.0)
    assert h.prune(now) == 0  # nothing is old yet
    sim = SimFleet(devices=1, windows=2, window_s=120.0, end_epoch=now)
    payloads = list(sim.stats_payloads(0))
    for p in payloads:
        h.add(utc_epoch_of(p), group, p)
    h.flush()
    (pts,) = h.series(now - 3 * 86400, now + 4 * 86400, 1, metrics=["snr_db"]).values()
    assert sum(pt.counts["windows"] for pt in pts) == 5 + 7 + 11 + len(payloads)
    merged = sum(np.asarray(pt.metrics["snr_db"].counts) for pt in pts if "snr_db" in pt.metrics)
    assert np.array_equal(merged, 3 + _hist_sum(payloads, "snr_db"))  # the old rows' [1, 1, ...]
    h.close()

    h = History(path, days=14.0)  # opened again: no second migration
    later = now + 14 * 86400 + 3600  # 14 days after the upgrade, by the server's clock
    assert h.prune(later) > 0
    with h._dblock:
        left = h._db.execute("SELECT bucket, windows FROM windows").fetchall()
        hists = h._db.execute("SELECT COUNT(*) FROM hists").fetchone()[0]
    assert left == [] and hists == 0  # the future bucket went with the rest, 14 days on
    h.close()
