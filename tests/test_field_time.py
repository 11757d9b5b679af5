"""Issue 10, time: wall-clock steps and unsynchronised clocks (docs/faults.md).

Clocks are injected (NOTES: libfaketime breaks Python's time.sleep here); the outbox, the
window stamps and the step detector each take a wall and a monotonic clock.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from jsonschema import Draft202012Validator

from agent.audio.vad import VadBlockStats
from agent.config import Config
from agent.daemon import service
from agent.daemon.clock import SYNC_FLOOR, ClockWatch, UtcStamper
from agent.monitoring.monitor import Monitor
from agent.monitoring.payloads import iso_utc
from agent.resources import demo_audio
from agent.telemetry.message import Message
from agent.telemetry.outbox import Outbox, OutboxLimits
from tests.conftest import ROOT

DAY = 86400.0
MODEL = {"name": "m", "version": "1", "sha256": "0" * 64, "mode": "full", "threshold": 0.5}
SYNCED = SYNC_FLOOR.timestamp() + 30 * DAY    # a plausible, synchronised wall time
RTC_1970 = 1_000.0                            # a board without a real-time clock, at boot
STATS = Draft202012Validator(json.loads((ROOT / "docs" / "stats.schema.json").read_text()))


class Clocks:
    """A wall and a monotonic clock the test moves by hand."""

    def __init__(self, wall: float, mono: float = 100.0) -> None:
        self.w, self.m = wall, mono

    def wall(self) -> float:
        return self.w

    def mono(self) -> float:
        return self.m

    def advance(self, s: float) -> None:
        self.w += s
        self.m += s


def msg(seq: int) -> Message:
    return Message("eva/dev/stats", {"seq": seq})


def seqs(ob: Outbox) -> list[int]:
    return [json.loads(r.payload)["seq"] for r in ob.peek(limit=1000)]


# --- outbox ages ---------------------------------------------------------------------------------
def test_wall_clock_step_forward_expires_nothing(tmp_path: Path) -> None:
    """A device boots at 1970, queues 30 windows with the broker away, then NTP steps the clock
    56 years forward: the old code expired the whole queue (ages were wall time)."""
    c = Clocks(RTC_1970)
    with Outbox(tmp_path / "ob.sqlite3", OutboxLimits(max_age_s=7 * DAY), clock=c.mono,
                wall=c.wall) as ob:
        for i in range(30):
            ob.append(msg(i))
            c.advance(60.0)
        c.w = SYNCED  # the step
        assert ob.expire() == 0 and ob.append(msg(30)) > 0
        assert seqs(ob) == list(range(31))
        assert "outbox_dropped" not in json.loads(ob.peek(limit=100)[-1].payload)
        c.advance(7 * DAY)  # real age still expires: the first rows are now past 7 days
        assert ob.expire() > 0


def test_restart_bridges_downtime_only_with_plausible_wall_clocks(tmp_path: Path) -> None:
    path = tmp_path / "ob.sqlite3"
    limits = OutboxLimits(max_age_s=7 * DAY)

    def run(c: Clocks, seq: int) -> list[int]:
        with Outbox(path, limits, clock=c.mono, wall=c.wall) as ob:
            ob.expire()
            ob.append(msg(seq))
            return seqs(ob)

    assert run(Clocks(RTC_1970), 0) == [0]
    # Restart with a synchronised clock: "56 years of downtime" is not believed.
    assert run(Clocks(SYNCED, mono=5.0), 1) == [0, 1]
    # Restart with the clock behind the previous run (RTC lost): no negative ages, nothing lost.
    assert run(Clocks(SYNCED - 3 * DAY, mono=7.0), 2) == [0, 1, 2]
    # A real, plausible downtime of 8 days (both readings synchronised) does expire.
    assert run(Clocks(SYNCED + 8 * DAY, mono=9.0), 3) == [3]


# --- window stamps -------------------------------------------------------------------------------
def test_clock_watch_logs_a_step_once(caplog: pytest.LogCaptureFixture) -> None:
    c = Clocks(RTC_1970)
    watch = ClockWatch(c.wall, c.mono)
    with caplog.at_level(logging.INFO):
        c.advance(10.0)
        assert watch.check() == 0.0
        c.w += 1e9
        assert watch.check() == pytest.approx(1e9)
        c.advance(10.0)
        assert watch.check() == 0.0  # the same step is not reported twice
    lines = [r.getMessage() for r in caplog.records if "wall clock stepped" in r.getMessage()]
    assert len(lines) == 1 and "nothing dropped" in lines[0]


def _monitor(stamper: UtcStamper, out: list[dict]) -> Monitor:
    return Monitor(emit=lambda m: out.append(m.payload), device_id="dev", model_info=MODEL,
                   rate=16000, window_s=10.0, stamper=stamper)


def _feed(mon: Monitor, t0: float, seconds: float) -> None:
    frames = int(seconds / 0.03)
    stats = VadBlockStats(start=int(t0 * 16000), frame=480,
                          frame_db=np.full(frames, -60.0), speech=np.zeros(frames, bool),
                          noise_floor_db=-60.0)
    mon.on_block(t0 + frames * 0.03, stats, 0)


def test_live_windows_reanchor_on_a_wall_clock_step() -> None:
    """The UTC anchor used to be fixed at start: after NTP stepped a 1970 clock, every window of
    the boot stayed labelled 1970. Now the label follows the step at the next window."""
    c = Clocks(RTC_1970)
    out: list[dict] = []
    mon = _monitor(UtcStamper("wall", wall=c.wall, mono=c.mono, synced=lambda w: w > 1e9),
                   out)
    _feed(mon, 0.0, 10.5)
    c.advance(10.5)
    c.w += SYNCED - c.w  # NTP steps the clock
    _feed(mon, 10.5, 10.5)
    first, second = (p["window"] for p in out if "window" in p)
    assert first["start_utc"] == iso_utc(RTC_1970) and first["utc_synced"] is False
    assert second["end_utc"] == iso_utc(SYNCED - 10.5 + 20.0)
    assert second["utc_source"] == "wall" and second["utc_synced"] is True
    for p in out:
        assert not list(STATS.iter_errors(p))


def test_replayed_file_is_stamped_by_its_audio_clock_not_as_live(tmp_path: Path) -> None:
    """A file decoded at full speed: 20 s of audio in a fraction of a second. Its windows are
    labelled start-of-processing + audio time and say so (utc_source "file")."""
    cfg = Config()
    cfg.audio.source = str(demo_audio())
    cfg.agent.state_dir = str(tmp_path / "state")
    cfg.telemetry.sink = f"file:{tmp_path / 'telemetry.jsonl'}"
    cfg.agent.device_id = "dev-file"
    cfg.monitoring.window_s = 10.0
    summary = service.run(cfg)
    msgs = [json.loads(x) for x in (tmp_path / "telemetry.jsonl").read_text().splitlines()]
    windows = [m["payload"]["window"] for m in msgs if m["topic"].endswith("/stats")]
    assert len(windows) == summary.windows >= 2
    assert {w["utc_source"] for w in windows} == {"file"}
    assert all(isinstance(w["utc_synced"], bool) for w in windows)
    # labels follow the file's audio clock exactly: consecutive windows are window_s apart
    assert windows[1]["start_utc"] == windows[0]["end_utc"]


def test_schema_describes_the_stamp_source() -> None:
    window = json.loads((ROOT / "docs" / "stats.schema.json").read_text())[
        "properties"]["window"]["properties"]
    assert window["utc_source"]["enum"] == list(UtcStamper.SOURCES)
    assert window["utc_synced"]["type"] == ["boolean", "null"]
