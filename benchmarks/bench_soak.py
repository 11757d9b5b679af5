#!/usr/bin/env python3
"""Days of uptime in a minute: is the agent's memory flat over 24 h of audio?

    python benchmarks/bench_soak.py [--hours 24] [--window 60] [--json]

Runs the whole daemon in this process (`agent.daemon.service.run`: capture thread, pipeline, VAD,
model, monitoring windows, hourly and daily roll-ups, device baseline, drift, alarms, telemetry
payloads to a file sink) on generated audio as fast as it goes: each minute of audio is the
bundled demo recording (real spoken digits, about ten utterances) at a gain that varies from
minute to minute, then quiet noise. The source reads the process's resident memory with every
block it hands over and keeps each audio hour's largest reading.

Targets (issue 10): peak RSS <= 100 MiB, and flat: the last hour's RSS within 2 MiB of the
second hour's (the first hour still fills caches), each hour's figure being the largest RSS read
while it was processed. Before roll-ups merged as they went, 24 h at 60 s windows peaked at
126.5 MiB and grew ~25 KB per window.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import config as config_mod  # noqa: E402
from agent import service  # noqa: E402
from agent.audio.sources import AudioBlock  # noqa: E402
from agent.monitoring.monitor import rss_mb  # noqa: E402
from agent.resources import demo_audio  # noqa: E402

BLOCK_S = 2.0  # the unpaced file source's block length


class GeneratedSource:
    """`hours` of audio: per minute, the demo recording at a varying gain, then noise."""

    live = False

    def __init__(self, hours: float, seed: int = 0) -> None:
        import soundfile as sf

        speech, self.rate = sf.read(str(demo_audio()), dtype="float32")
        self.speech = speech.astype(np.float32)
        self.minute = 60 * self.rate
        self.total = int(hours * 3600 * self.rate)
        self.rng = np.random.default_rng(seed)
        self.rss_by_hour: list[float] = []  # the largest RSS seen in each audio hour

    def _minute(self) -> np.ndarray:
        x = (self.rng.standard_normal(self.minute) * 10 ** (-55 / 20)).astype(np.float32)
        gain = np.float32(10 ** (self.rng.uniform(-6, 0) / 20))
        x[:len(self.speech)] += self.speech * gain
        return x

    def __iter__(self) -> Iterator[AudioBlock]:
        step = int(BLOCK_S * self.rate)
        hour = 3600 * self.rate
        done = 0
        buf = np.zeros(0, np.float32)
        while done < self.total:
            # RSS at one instant swings with the capture queue and the allocator, so each
            # hour reports its largest reading (one /proc read per 2 s block, ~10 µs)
            if done % hour < step:
                self.rss_by_hour.append(0.0)
            self.rss_by_hour[-1] = max(self.rss_by_hour[-1], rss_mb())
            while len(buf) < step:
                buf = np.concatenate([buf, self._minute()])
            n = min(step, self.total - done)
            block, buf = buf[:n].copy(), buf[n:]  # its own array, as a file read gives
            done += n
            yield AudioBlock(block[:, None], self.rate)

    def describe(self) -> str:
        return f"generated ({self.total / self.rate / 3600:g} h at {self.rate} Hz)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--window", type=float, default=60.0, help="stats window, audio seconds")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="eva-soak-"))
    cfg = config_mod.load(None, {
        "agent.state_dir": str(tmp), "agent.device_id": "soak",
        "output.decisions": str(tmp / "decisions.jsonl"),
        "telemetry.sink": f"file:{tmp / 'telemetry.jsonl'}",
        "monitoring.window_s": a.window})
    src = GeneratedSource(a.hours)
    t0 = time.perf_counter()
    summary = service.run(cfg, threading.Event(), opener=lambda: src, live=False)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss = src.rss_by_hour
    second, last = rss[min(1, len(rss) - 1)], rss[-1]  # the second and the last audio hour
    res = {"audio_hours": a.hours, "window_s": a.window, "wall_s": round(wall, 1),
           "realtime_factor": round(a.hours * 3600 / wall), "decisions": summary.decisions,
           "windows": summary.windows, "peak_rss_mib": round(peak, 1),
           "rss_second_hour_mib": round(second, 1), "rss_last_hour_mib": round(last, 1),
           "rss_by_hour_mib": [round(x, 1) for x in rss]}
    res["targets_met"] = peak <= 100 and abs(last - second) <= 2
    if a.json:
        print(json.dumps(res))
        return
    print(f"{a.hours:g} h of audio ({summary.decisions} decisions, {summary.windows} windows of "
          f"{a.window:g} s) in {wall:.1f} s = {res['realtime_factor']}x real time")
    print("largest RSS in each audio hour (MiB): " + " ".join(f"{x:.1f}" for x in rss))
    print(f"peak RSS {res['peak_rss_mib']} MiB (target <= 100); hour 2 {second:.1f} MiB, last "
          f"hour {last:.1f} MiB (target: within 2 MiB)")
    print("targets met" if res["targets_met"] else "TARGETS MISSED")


if __name__ == "__main__":
    main()
