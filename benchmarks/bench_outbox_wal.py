#!/usr/bin/env python3
"""Outbox file sizes and append cost when nothing drains it (issue 10: a 1 MB bound let the WAL
reach 54 MB).

    python benchmarks/bench_outbox_wal.py [--rows 3000] [--max-bytes 1048576] [--payload 1000]

The producer appends at full speed (a file replayed, the broker down) with the MQTT sink's
settings (autocheckpoint off) and no publisher thread checkpointing: the worst case for the WAL.
Reports the peak WAL size, the final database size and the per-append wall time.
Target: peak WAL within twice `OutboxLimits.wal_limit` (2 MiB at a 1 MiB bound).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.telemetry.message import Message  # noqa: E402
from agent.telemetry.outbox import Outbox, OutboxLimits  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--max-bytes", type=int, default=1024 * 1024)
    ap.add_argument("--payload", type=int, default=1000, help="padding bytes per message")
    a = ap.parse_args()
    limits = OutboxLimits(max_bytes=a.max_bytes)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "outbox.sqlite3"
        wal = Path(str(path) + "-wal")
        peak, times = 0, []
        with Outbox(path, limits, autocheckpoint=False) as ob:
            for i in range(a.rows):
                t0 = time.perf_counter()
                ob.append(Message("eva/bench/stats", {"seq": i, "pad": "x" * a.payload}))
                times.append(time.perf_counter() - t0)
                peak = max(peak, wal.stat().st_size if wal.exists() else 0)
            rows, data = len(ob), ob.size_bytes
        db = os.stat(path).st_size
    times.sort()
    mib = 2 ** 20
    print(f"{a.rows} appends of ~{a.payload} B, bound {a.max_bytes / mib:.1f} MiB, no checkpoint "
          "from a publisher")
    print(f"kept {rows} rows ({data / mib:.2f} MiB of payload); database file {db / mib:.2f} MiB")
    print(f"peak WAL {peak / mib:.2f} MiB (target <= {2 * limits.wal_limit / mib:.1f} MiB): "
          f"{'OK' if peak <= 2 * limits.wal_limit + 64 * 1024 else 'NOT MET'}")
    print(f"append ms: p50 {statistics.median(times) * 1000:.3f}, "
          f"p95 {times[int(0.95 * len(times))] * 1000:.3f}, max {times[-1] * 1000:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
