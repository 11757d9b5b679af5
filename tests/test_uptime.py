"""Days of uptime: memory that stays flat, and the same windows at any pacing.

The 24-hour figure itself is a benchmark (benchmarks/bench_soak.py, README); these tests pin
the mechanisms: roll-ups and the device baseline merge each window as it arrives instead of
keeping it, and a paced file closes exactly the windows an unpaced one does.
"""

from __future__ import annotations

import json
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from agent import config as config_mod
from agent.daemon import service
from agent.monitoring.drift import DeviceBaselineLearner
from agent.monitoring.windows import (
    DAY_S,
    HOUR_S,
    RollUp,
    WindowAggregator,
    WindowSummary,
    merge_summaries,
)
from agent.resources import demo_audio


def windows(n: int, window_s: float = 60.0, seed: int = 0) -> list[WindowSummary]:
    """`n` closed windows with values in every per-utterance metric and a few decisions."""
    rng = np.random.default_rng(seed)
    agg = WindowAggregator(window_s)
    out: list[WindowSummary] = []
    for i in range(n):
        t = i * window_s + 1.0
        agg.count("frames", 100, t)
        agg.count("utterances", 3, t)
        agg.observe("input_rms_dbfs", rng.uniform(-60, -10, 3), t)
        agg.observe("snr_db", rng.uniform(0, 40, 3), t)
        agg.record_decision(str(i % 10), bool(i % 3), t, confidence=float(rng.uniform(0.3, 1)),
                            margin=float(rng.uniform(0, 0.9)))
        out += agg.advance((i + 1) * window_s)
    return out


def test_rollups_merge_as_they_go_and_equal_the_merge_of_all_windows() -> None:
    ws = windows(150)  # 2.5 hours of 60 s windows
    hourly = RollUp(HOUR_S)
    done = [r for w in ws for r in hourly.add(w)]
    done += hourly.finish()
    assert [(r.start_s, r.end_s, r.windows) for r in done] == \
        [(0.0, 3600.0, 60), (3600.0, 7200.0, 60), (7200.0, 9000.0, 30)]
    for r, part in zip(done, (ws[:60], ws[60:120], ws[120:]), strict=True):
        want = merge_summaries(part, nominal_s=HOUR_S)
        assert r.hists == want.hists and r.counts == want.counts and r.classes == want.classes
        assert r.nominal_s == HOUR_S
    # merging must not alias the windows it was fed: they are published and scored elsewhere
    assert ws[0].hists["snr_db"].count == 3


def held_bytes(feed, batches: int) -> list[int]:
    """Memory held after each batch fed by `feed(batch_index)`, counting only allocations
    made under this test's own call stack: threads left over by earlier tests in the same
    process (sinks, paho) allocate too, and made a process-wide figure flaky."""
    only_agent = [tracemalloc.Filter(True, __file__, all_frames=True)]
    tracemalloc.start(64)
    try:
        sizes = []
        for b in range(batches):
            feed(b)
            snap = tracemalloc.take_snapshot().filter_traces(only_agent)
            sizes.append(sum(s.size for s in snap.statistics("filename")))
        return sizes
    finally:
        tracemalloc.stop()


def test_day_rollup_and_unfrozen_device_baseline_hold_flat_memory() -> None:
    """A day-long roll-up and a device baseline that never freezes (too few utterances) keep
    one running merge: 400 more windows add no memory (they kept ~25 KB per window before)."""
    ws = windows(500)
    daily = RollUp(DAY_S)
    learner = DeviceBaselineLearner(60.0, min_utterances=10**9)  # never ready: keeps learning

    def feed(b: int) -> None:
        for w in ws[b * 100:(b + 1) * 100]:
            assert daily.add(w) == []
            assert learner.add(w) is None

    sizes = held_bytes(feed, 5)
    growth = sizes[-1] - sizes[0]
    assert growth < 64 * 1024, f"{growth} bytes held for 400 more windows"
    day = daily.finish()[0]
    assert day.windows == 500 and day.counts["utterances"] == 1500
    assert learner._acc is not None and learner._acc.windows == 500


def test_device_baseline_merged_as_it_goes_matches_the_merge_of_its_windows(tmp_path) -> None:
    ws = windows(5)
    learner = DeviceBaselineLearner(300.0, path=tmp_path / "b.json", min_utterances=1)
    got = [learner.add(w) for w in ws]
    assert got[:4] == [None] * 4 and got[4] is not None
    assert got[4].hists == merge_summaries(ws).hists
    assert got[4].meta["windows"] == 5 and got[4].meta["learned_s"] == 300.0


def run_windows(tmp: Path, wav: Path, speed: float) -> list[tuple[float, float]]:
    tel = tmp / f"telemetry-{speed:g}.jsonl"
    cfg = config_mod.load(None, {
        "agent.state_dir": str(tmp / f"state-{speed:g}"), "agent.device_id": "dev-1",
        "output.decisions": str(tmp / f"decisions-{speed:g}.jsonl"),
        "telemetry.sink": f"file:{tel}", "monitoring.window_s": 5.0,
        "audio.source": str(wav), "audio.speed": speed})
    service.run(cfg, threading.Event())
    stats = [json.loads(x)["payload"] for x in tel.read_text().splitlines()
             if json.loads(x)["topic"].endswith("/stats")]
    return [(p["window"]["start_s"], p["window"]["end_s"]) for p in stats]


@pytest.mark.parametrize("speed", [100.0, 1000.0])
def test_paced_file_publishes_the_same_windows_as_unpaced(tmp_path: Path, speed: float) -> None:
    """15 s of speech ending exactly on a VAD frame and a window boundary: paced, the final
    (empty) flush block used to record the queue depth at 15.0 s, which opened a fourth,
    zero-length window [15, 15]."""
    x, rate = sf.read(str(demo_audio()), dtype="float32")
    wav = tmp_path / "fifteen.wav"
    sf.write(str(wav), x[:15 * rate], rate)
    unpaced = run_windows(tmp_path, wav, 0.0)
    assert unpaced == [(0.0, 5.0), (5.0, 10.0), (10.0, 15.0)]
    assert run_windows(tmp_path, wav, speed) == unpaced
