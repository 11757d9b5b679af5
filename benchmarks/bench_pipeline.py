#!/usr/bin/env python3
"""Speed and memory of the whole agent on a long stream, against a floor.

    python benchmarks/bench_pipeline.py [--minutes 30] [--shared ../shared] [--json]

Builds a stream with ../shared/eval/make_stream.py, then times, as separate processes pinned to
one core (taskset), each run three times keeping the fastest:
  agent: `edge-voice-agent run --source STREAM --telemetry none` (imports, model load, all)
  floor: reading the same file and running webrtcvad alone over every 30 ms frame
and prints their real-time factors (audio seconds per wall second), the ratio agent/floor,
the agent's peak RSS, and per-utterance compute latency p50/p95 from the decisions.
Targets (issue 2): ratio <= 6, agent >= 1000x real time, RSS <= 100 MiB, p95 <= 2 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FLOOR = """
import sys, soundfile as sf, webrtcvad
x, sr = sf.read(sys.argv[1], dtype='int16')
v = webrtcvad.Vad(2); b = x.tobytes(); n = sr * 30 // 1000 * 2
print(sum(v.is_speech(b[i:i + n], sr) for i in range(0, len(b) - n + 1, n)))
"""


def timed(cmd: list[str], runs: int = 3, before=lambda: None) -> tuple[float, int]:
    """Fastest wall time over `runs`, and the peak RSS (KiB) of the child process."""
    best, rss = float("inf"), 0
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    for _ in range(runs):
        before()
        t0 = time.perf_counter()
        p = subprocess.Popen(pin + cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        err = p.stderr.read().decode() if p.stderr else ""
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"benchmark command failed: {' '.join(cmd)}\n{err}")
        best, rss = min(best, wall), max(rss, usage.ru_maxrss)
    return best, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="eva-bench-"))
    stream = tmp / "stream"
    subprocess.run([sys.executable, str(a.shared / "eval" / "make_stream.py"), "--clips",
                    str(a.shared / "data" / "fsdd" / "recordings"), "--seconds",
                    str(a.minutes * 60), "--seed", "3", "--out", str(stream)], check=True,
                   capture_output=True)
    wav = stream.with_suffix(".wav")
    audio_s = a.minutes * 60
    decisions = tmp / "decisions.jsonl"
    agent_cmd = [sys.executable, "-m", "agent", "run", "--source", str(wav), "--decisions",
                 str(decisions), "--telemetry", "none", "--state-dir", str(tmp / "state"),
                 "--log-level", "WARNING"]
    floor_s, _ = timed([sys.executable, "-c", FLOOR, str(wav)])
    agent_s, rss_kib = timed(agent_cmd, before=lambda: decisions.unlink(missing_ok=True))
    lat = sorted(json.loads(x)["latency_ms"] for x in decisions.read_text().splitlines())
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]  # noqa: E731
    res = {
        "audio_minutes": a.minutes, "utterances": len(lat),
        "floor_seconds": round(floor_s, 3), "floor_rtf": round(audio_s / floor_s),
        "agent_seconds": round(agent_s, 3), "agent_rtf": round(audio_s / agent_s),
        "agent_over_floor": round(agent_s / floor_s, 2),
        "peak_rss_mib": round(rss_kib / 1024, 1),
        "latency_ms_p50": round(q(0.5), 3), "latency_ms_p95": round(q(0.95), 3),
    }
    res["targets_met"] = (res["agent_over_floor"] <= 6 and res["agent_rtf"] >= 1000
                          and res["peak_rss_mib"] <= 100 and res["latency_ms_p95"] <= 2)
    shutil.rmtree(tmp)
    if a.json:
        print(json.dumps(res))
        return
    print(f"stream: {a.minutes:g} min, {res['utterances']} utterances (one core, best of 3)")
    print(f"floor (read + webrtcvad): {floor_s:.3f} s = {res['floor_rtf']}x real time")
    print(f"agent (whole process):    {agent_s:.3f} s = {res['agent_rtf']}x real time, "
          f"{res['agent_over_floor']}x the floor (target <= 6)")
    print(f"peak RSS: {res['peak_rss_mib']} MiB (target <= 100)")
    print(f"compute latency per utterance: p50 {res['latency_ms_p50']} ms, "
          f"p95 {res['latency_ms_p95']} ms (target <= 2)")
    print("targets met" if res["targets_met"] else "TARGETS MISSED")


if __name__ == "__main__":
    main()
