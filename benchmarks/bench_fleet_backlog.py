"""How fast one `fleet serve` replica drains a backlog of stats from a real broker, on one core.

`bench_fleet.py` measures ingest while publishers send, and on a 2-core machine the publishers
and the broker share the other core, so the replica waits for input (it used ~70 % of its core)
and the wall rate understates it. Here the input is waiting: the replica subscribes with a
persistent session (`--replica NAME --session-expiry`), is stopped, every device's windows are
published and queued by mosquitto, and the replica is started again (pinned to one core with
`taskset`) to drain them, as after a replica restart or an outage. Reported: stats messages per
second of wall time and per CPU-second of the replica, from the first to the last message it
ingested (polled on /api/ingest.json every 50 ms), and the RSS.

    python benchmarks/bench_fleet_backlog.py                        # 10,000 devices x 3 windows
    python benchmarks/bench_fleet_backlog.py --share bench
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fleet import (  # noqa: E402
    EVA,
    PUBLISHER,
    _get,
    _proc_times,
    _status_kb,
    bench_broker,
    stop_process,
)

from tests.fleet_sim import SimFleet  # noqa: E402
from tests.mqtt_fixtures import free_port  # noqa: E402


def _ingested(base: str) -> int:
    return int(json.loads(_get(base + "/api/ingest.json", 10))["outcomes"].get("stats", 0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--windows", type=int, default=3, help="stats windows per device")
    ap.add_argument("--mqtt-version", choices=("5",), default="5")
    ap.add_argument("--share", default="", help="subscribe through $share/GROUP/...")
    ap.add_argument("--core", type=int, default=0, help="CPU the replica is pinned to")
    ap.add_argument("--no-births", action="store_true",
                    help="publish no births (only the stats backlog reaches the replica)")
    args = ap.parse_args()

    d = Path(tempfile.mkdtemp(prefix="bench-backlog-"))
    broker = bench_broker(d, args.core)
    port = broker.port

    sim = SimFleet(devices=args.devices, windows=args.windows)
    msgs = [(t, b, t.endswith("/birth")) for t, b in sim.messages()
            if not (args.no_births and t.endswith("/birth"))]
    n_stats = sum(1 for t, _, r in msgs if not r)
    mean = sum(len(b) for _, b, r in msgs if not r) / n_stats
    (d / "msgs.pickle").write_bytes(pickle.dumps(msgs))
    del msgs
    print(f"fleet: {args.devices} devices x {args.windows} windows = {n_stats} stats messages, "
          f"mean {mean:.0f} B; subscription "
          f"{'$share/' + args.share + '/...' if args.share else 'plain'}, MQTT {args.mqtt_version}")

    http_port = free_port()
    base = f"http://127.0.0.1:{http_port}"
    cmd = ["taskset", "-c", str(args.core), *EVA, "fleet", "serve", "--broker", broker.url,
           "--listen", f"127.0.0.1:{http_port}", "--replica", "backlog",
           "--session-expiry", "3600", "--history", "none", "--mqtt-version",
           args.mqtt_version, "--log-level", "WARNING"]
    if args.share:
        cmd += ["--share", args.share]
    if shutil.which("taskset") is None:
        cmd = cmd[3:]

    def start() -> subprocess.Popen:
        p = subprocess.Popen(cmd, cwd=d, stderr=open(d / "serve.log", "ab"))
        deadline = time.monotonic() + 30
        while True:
            try:
                _get(base + "/healthz", 1)
                return p
            except OSError:
                if p.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit((d / "serve.log").read_text()) from None
                time.sleep(0.05)

    serve = start()  # makes the persistent session (and its subscriptions) on the broker
    stop_process(serve)
    pub = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(port), str(d / "msgs.pickle")],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert pub.stdout is not None and pub.stdin is not None
        assert pub.stdout.readline().strip() == "ready"
        for _ in range(2):  # births, then the stats windows: all queued for the session
            pub.stdin.write("go\n")
            pub.stdin.flush()
            assert pub.stdout.readline().strip() == "sent"
        pub.stdin.write("go\n")
        pub.stdin.flush()
        pub.wait(60)
        print(f"queued in the broker: {n_stats} stats messages; replica started again")
        serve = start()
        first = None
        n, last_change = 0, time.perf_counter()
        while n < n_stats and time.perf_counter() - last_change < 30:
            now_n = _ingested(base)
            now, cpu = time.perf_counter(), _proc_times(serve.pid)
            if now_n and first is None:
                first = (now, cpu, now_n)
            if now_n != n:
                n, last_change, last = now_n, now, (now, cpu, now_n)
            time.sleep(0.05)
        if first is None or n < n_stats:
            print(f"drained only {n}/{n_stats}; serve log: {(d / 'serve.log').read_text()[-800:]}")
            return 1
        wall, cpu, count = last[0] - first[0], last[1] - first[1], last[2] - first[2]
        j = json.loads(_get(base + "/api/ingest.json", 10))
        r = j.get("stats_reader", {})
        print(f"drained {count} stats messages (of {n_stats}; the first {first[2]} before the "
              f"first poll) in {wall:.2f} s = {count / wall:,.0f} msg/s wall; replica CPU "
              f"{cpu:.2f} s = {count / cpu:,.0f} msg per CPU-second "
              f"({cpu / wall:.0%} of its core); {r.get('connections', 0)} stats connection(s); "
              f"births "
              f"received meanwhile (retained and queued, on the control connection): "
              f"{j['outcomes'].get('birth', 0)}")
        print(f"replica RSS: {_status_kb(serve.pid, 'VmRSS') / 1024:.0f} MiB (peak "
              f"{_status_kb(serve.pid, 'VmHWM') / 1024:.0f} MiB); load average after: "
              f"{os.getloadavg()}")
    finally:
        stop_process(serve)
        if pub.poll() is None:
            pub.kill()
        broker.kill()
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
