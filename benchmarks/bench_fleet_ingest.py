"""`fleet serve`'s ingest without MQTT: FleetModel plus the history, in this process.

What the replica's MQTT thread does per message once paho has handed it over (decode, validate,
merge, exporter extras, history), on the real 4.8 KB stats payloads of tests/fleet_sim.py. It
prints a CPU calibration (a fixed pure-Python loop) so runs on a loaded machine compare; run two
checkouts alternately for an A/B (`cd OTHER && python /path/to/bench_fleet_ingest.py`, which
imports the code of the current directory). `--profile` prints cProfile's top functions (which
inflates many small calls: compare times only without it).

    python benchmarks/bench_fleet_ingest.py --devices 4000 --windows 3
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))


def main() -> int:
    from agent.fleet.history import History
    from agent.fleet.ingest import FleetModel, tune_gc
    from tests.fleet_sim import SimFleet

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=4000)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    tune_gc()  # as `fleet serve` does
    msgs = list(SimFleet(devices=args.devices, windows=args.windows).messages())
    with tempfile.TemporaryDirectory() as d:
        history = History(Path(d) / "history.sqlite")
        model = FleetModel(history=history)
        for t, b in msgs:
            if t.endswith("/birth"):
                model.ingest(t, b, True)
        stats = [(t, b) for t, b in msgs if t.endswith("/stats")]
        c = time.process_time()
        sum(range(10_000_000))
        calibration = time.process_time() - c
        prof = cProfile.Profile() if args.profile else None
        t0 = time.process_time()
        if prof:
            prof.enable()
        for i, (t, b) in enumerate(stats):
            model.ingest(t, b)
            if i % 5000 == 4999:  # `fleet serve` flushes every 5 s
                model.settle()
                history.flush()
        model.settle()
        history.flush()
        if prof:
            prof.disable()
        cpu = time.process_time() - t0
        history.close()
    print(f"CPU calibration: sum(range(10**7)) took {calibration:.3f} CPU-s; "
          f"{len(stats)} stats messages in {cpu:.2f} CPU-s = {len(stats) / cpu:,.0f} msg per "
          f"CPU-second; outcomes {model.outcomes}")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
