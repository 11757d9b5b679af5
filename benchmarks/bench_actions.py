#!/usr/bin/env python3
"""Acting on decisions: how fast an action starts and a socket reader hears, what it costs the
pipeline, and what a reader that never reads does to it.

    python benchmarks/bench_actions.py [--minutes 3] [--speed 10] [--flood-minutes 45]
                                       [--shared ../shared] [--json]

1. Latency. The agent (`agent.daemon.service.run`, in this process) plays a stream of FSDD speech
   (../shared/eval/make_stream.py, seed 3) paced at --speed times real time, threshold 0 so
   every digit is accepted, with an `[actions]` entry for every label and one reader process on
   the decision socket. Each decision is stamped (CLOCK_REALTIME, ns) when the service hands it
   out (before the decisions file); the reader stamps each line on arrival; the action, a
   tiny C program compiled here (or, without a compiler, /bin/sh running date), stamps its own
   start. Also the agent's own `action_latency_ms` (decision → program started).
   Targets: decision → action start p95 <= 20 ms, decision → socket reader p95 <= 5 ms.
2. The pipeline's own per-utterance compute (`latency_ms` of each decision) in the same paced
   run without socket and actions, then with them again (A/B/A/B): unchanged within noise.
3. Flood: `edge-voice-agent run` as fast as it can on --flood-minutes of speech (>= 1,000
   decisions), with and without a connected reader that never reads: wall time and peak RSS of
   the agent, and the drops it counted for that reader. Then 1,000 decisions published straight
   into a socket with such a reader: time per publish and the reader's buffer, bounded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_pipeline import make_bench_stream, stream_bench_args  # noqa: E402

# The action: stamps CLOCK_REALTIME first thing after exec, then appends "ns <stdin>" to argv[1].
STAMP_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct timespec t; clock_gettime(CLOCK_REALTIME, &t);
    char buf[8192];
    int n = snprintf(buf, 64, "%lld ", (long long)t.tv_sec * 1000000000LL + t.tv_nsec);
    ssize_t r;
    while (n < (int)sizeof buf - 1 && (r = read(0, buf + n, sizeof buf - 1 - n)) > 0) n += r;
    int fd = open(argv[1], O_WRONLY | O_APPEND | O_CREAT, 0644);
    return fd < 0 || write(fd, buf, n) != n;
}
"""


def stamp_program(tmp: Path) -> list[str] | None:
    """The compiled stamp action, or None without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    (tmp / "stamp.c").write_text(STAMP_C)
    r = subprocess.run([cc, "-O2", "-o", str(tmp / "stamp"), str(tmp / "stamp.c")],
                       capture_output=True)
    return [str(tmp / "stamp")] if r.returncode == 0 else None


READER = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
while True:  # started before the agent: connect as soon as it serves
    try:
        s.connect(sys.argv[1])
        break
    except OSError:
        time.sleep(0.005)
with open(sys.argv[2], "w") as out:
    for line in s.makefile("rb"):
        out.write(f"{time.time_ns()} {line.decode()}")
"""


def q(values: list[float], p: float) -> float:
    v = sorted(values)
    return round(v[min(len(v) - 1, int(p * len(v)))], 3) if v else float("nan")


def paced_run(wav: Path, speed: float, tmp: Path, outlets: bool,
              stamp: list[str] | None = None) -> dict:
    """One in-process paced run; with `outlets`, an action for every label and a reader."""
    from agent import config
    from agent.daemon import service

    state = tmp / ("on" if outlets else "off")
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    starts, heard = state / "starts.txt", state / "heard.txt"
    cfg = config.load(None, {"audio.source": str(wav), "audio.speed": speed,
                             "agent.state_dir": str(state / "s"),
                             "output.decisions": str(state / "decisions.jsonl"),
                             "decision.threshold": 0.0,
                             "output.socket": "" if outlets else "none",
                             "telemetry.sink": f"file:{state / 'telemetry.jsonl'}"})
    if outlets:
        cfg.actions.labels = {"*": [*stamp, str(starts)] if stamp else
                              ["/bin/sh", "-c", f'echo "$(date +%s%N) $(cat)" >> {starts}']}
    made: dict[float, int] = {}
    original = service.Service.decided

    def stamped(self, decisions):  # the moment the service hands the decisions out
        now = time.time_ns()
        for d in decisions:
            made[round(d.decided_at, 3)] = now
        original(self, decisions)

    service.Service.decided = stamped  # type: ignore[method-assign]
    reader = None
    try:
        if outlets:  # started first, so its interpreter is up when the first word is decided
            reader = subprocess.Popen([sys.executable, "-c", READER,
                                       str(state / "s" / "decisions.sock"), str(heard)])
        service.run(cfg)
    finally:
        service.Service.decided = original  # type: ignore[method-assign]
        if reader is not None:
            reader.wait(10)
    decisions = [json.loads(x) for x in (state / "decisions.jsonl").read_text().splitlines()]
    res = {"decisions": len(decisions),
           "compute_ms_p50": q([d["latency_ms"] for d in decisions], 0.5),
           "compute_ms_p95": q([d["latency_ms"] for d in decisions], 0.95)}
    if not outlets:
        return res
    to_reader = [(int(ns) - made[json.loads(rest)["decided_at"]]) / 1e6 for ns, rest in
                 (x.split(" ", 1) for x in heard.read_text().splitlines())] \
        if heard.exists() else []
    to_start = [(int(ns) - made[json.loads(rest)["decided_at"]]) / 1e6 for ns, rest in
                (x.split(" ", 1) for x in starts.read_text().splitlines())]
    stats = [json.loads(x)["payload"] for x in (state / "telemetry.jsonl").read_text()
             .splitlines() if json.loads(x)["topic"].endswith("/stats")]
    from agent.monitoring.metric_catalog import spec
    from agent.monitoring.windows import Histogram

    lat = Histogram(spec("action_latency_ms").edges)
    outcome = Histogram(spec("action_outcome").edges)
    for p in stats:
        for h, name in ((lat, "action_latency_ms"), (outcome, "action_outcome")):
            m = p["metrics"][name]
            if m["count"]:
                h.merge_in(Histogram.from_compact(h.edges, m["hist"], min=m["min"],
                                                  max=m["max"], mean=m["mean"]))
    res.update({"accepted": sum(d["accepted"] for d in decisions),
                "reader_lines": len(to_reader), "action_runs": len(to_start),
                "reader_ms_p50": q(to_reader, 0.5), "reader_ms_p95": q(to_reader, 0.95),
                "reader_ms_max": q(to_reader, 1.0),
                "action_start_ms_p50": q(to_start, 0.5), "action_start_ms_p95": q(to_start, 0.95),
                "action_start_ms_max": q(to_start, 1.0),
                "agent_action_latency_ms_p95": round(lat.quantile(0.95) or float("nan"), 3),
                "action_outcomes_not_ok": int(outcome.count - outcome.counts[0])})
    return res


def flood(wav: Path, tmp: Path, stuck_reader: bool) -> dict:
    """`run` as fast as possible; optionally a reader that connects and never reads."""
    state = tmp / ("flood-stuck" if stuck_reader else "flood-free")
    shutil.rmtree(state, ignore_errors=True)
    cmd = [sys.executable, "-m", "agent", "run", "--source", str(wav), "--state-dir",
           str(state), "--decisions", str(state / "decisions.jsonl"), "--telemetry", "none"]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    held = None
    if stuck_reader:
        import socket

        sock = state / "decisions.sock"
        while not sock.exists() and p.poll() is None:
            time.sleep(0.002)
        held = socket.socket(socket.AF_UNIX)
        held.connect(str(sock))  # and never reads
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read() if p.stderr else ""
    if held is not None:
        held.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"run failed: {err}")
    n = len((state / "decisions.jsonl").read_text().splitlines())
    m = re.search(r"(\d+) decisions sent, (\d+) dropped for it", err)
    return {"decisions": n, "wall_s": round(wall, 3), "peak_rss_mib":
            round(usage.ru_maxrss / 1024, 1),
            "reader_sent": int(m.group(1)) if m else None,
            "reader_dropped": int(m.group(2)) if m else None}


def publish_flood(tmp: Path, n: int = 1000) -> dict:
    """n decisions straight into a socket whose only reader never reads."""
    import socket

    from agent.actions.socket_server import DecisionSocket
    from agent.recognition.decision import Decision

    server = DecisionSocket(tmp / "pub.sock")
    held = socket.socket(socket.AF_UNIX)
    held.connect(str(tmp / "pub.sock"))
    while not server.readers:
        time.sleep(0.001)
    times = []
    for i in range(n):
        d = Decision(float(i), i + 0.4, i + 0.6, str(i % 10), 0.97, True, "fsdd-digits@2.0.0",
                     0.3, 0.9)
        t0 = time.perf_counter()
        server.publish([d])
        times.append((time.perf_counter() - t0) * 1e6)
        if i % 50 == 0:
            time.sleep(0.001)  # let the socket thread fill the kernel buffer
    r = server.readers[0]
    res = {"decisions": n, "publish_us_p50": q(times, 0.5), "publish_us_p99": q(times, 0.99),
           "publish_us_max": q(times, 1.0), "buffered": len(r.pending),
           "buffer_max": server.buffer_max, "dropped": r.dropped}
    server.close()
    held.close()
    return res


def main() -> None:
    a = stream_bench_args(__doc__, 3, speed=10, flood_minutes=45)
    tmp = Path(tempfile.mkdtemp(prefix="eva-bench-actions-"))
    try:
        for d in ("paced", "flood"):
            (tmp / d).mkdir()
        wav = make_bench_stream(a.shared, a.minutes, tmp / "paced")
        res: dict = {"load_average": os.getloadavg()[0]}
        stamp = stamp_program(tmp)
        res["action_program"] = "a C program stamping its start" if stamp else \
            "/bin/sh running date (no C compiler: sh and date startup included)"
        ab = [paced_run(wav, a.speed, tmp, outlets=o, stamp=stamp)
              for o in (False, True, False, True)]
        res["with_outlets"] = ab[3]
        res["first_with_outlets"] = ab[1]
        res["compute_ms"] = {"without": [(x["compute_ms_p50"], x["compute_ms_p95"])
                                         for x in ab[0::2]],
                             "with": [(x["compute_ms_p50"], x["compute_ms_p95"])
                                      for x in ab[1::2]]}
        big = make_bench_stream(a.shared, a.flood_minutes, tmp / "flood")
        res["flood_without_reader"] = flood(big, tmp, False)
        res["flood_stuck_reader"] = flood(big, tmp, True)
        res["publish_1000_stuck"] = publish_flood(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    w = res["with_outlets"]
    res["targets_met"] = (w["action_start_ms_p95"] <= 20 and w["reader_ms_p95"] <= 5)
    if a.json:
        print(json.dumps(res))
        return
    print(f"paced run: {a.minutes:g} min of speech at {a.speed:g}x real time, "
          f"{w['decisions']} decisions, {w['accepted']} accepted (threshold 0), "
          f"load average {res['load_average']:.1f}; action: {res['action_program']}")
    for name, x in (("run 2", res["first_with_outlets"]), ("run 4", w)):
        print(f"  {name}: decision -> socket reader p50 {x['reader_ms_p50']} ms, p95 "
              f"{x['reader_ms_p95']} ms, max {x['reader_ms_max']} ms ({x['reader_lines']} "
              f"lines; target p95 <= 5)")
        print(f"  {name}: decision -> action start (as the program saw it) p50 "
              f"{x['action_start_ms_p50']} "
              f"ms, p95 {x['action_start_ms_p95']} ms, max {x['action_start_ms_max']} ms "
              f"({x['action_runs']} runs; target p95 <= 20); agent's action_latency_ms p95 "
              f"{x['agent_action_latency_ms_p95']} ms; runs not ok: "
              f"{x['action_outcomes_not_ok']}")
    c = res["compute_ms"]
    print(f"pipeline compute per utterance (p50, p95 ms), A/B/A/B: without {c['without']}, "
          f"with socket + actions {c['with']}")
    f0, f1 = res["flood_without_reader"], res["flood_stuck_reader"]
    print(f"flood ({a.flood_minutes:g} min as fast as possible, {f0['decisions']} decisions): "
          f"no reader {f0['wall_s']} s, peak RSS {f0['peak_rss_mib']} MiB; a reader that never "
          f"reads {f1['wall_s']} s, peak RSS {f1['peak_rss_mib']} MiB, {f1['reader_sent']} "
          f"sent to it, {f1['reader_dropped']} dropped for it")
    p = res["publish_1000_stuck"]
    print(f"1,000 decisions published to a reader that never reads: publish p50 "
          f"{p['publish_us_p50']} us, p99 {p['publish_us_p99']} us, max {p['publish_us_max']} "
          f"us; its buffer {p['buffered']} of {p['buffer_max']}, {p['dropped']} dropped")
    print("targets met" if res["targets_met"] else "TARGETS MISSED")


if __name__ == "__main__":
    main()
