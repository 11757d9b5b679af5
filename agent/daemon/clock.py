"""Wall time, handled as the unreliable input it is on a device without a real-time clock.

Why: a Raspberry Pi boots at 1970 (or at fake-hwclock's last save) and NTP steps the clock
later, by years. Anything that measures an age or a duration uses the monotonic clock; wall time
only labels things for people, and then says how it was derived:

* `plausible(wall)`: after this release's date; an earlier reading cannot be a synchronised
  clock. Used to decide whether a wall-clock difference across a restart can be trusted.
* `kernel_synced()`: the kernel's own verdict (adjtimex: not TIME_ERROR, i.e. an NTP daemon
  keeps it disciplined), None where it cannot be asked.
* `ClockWatch`: notices a step of the wall clock against the monotonic one, so UTC labels
  re-anchor and the step is logged once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

log = logging.getLogger("edge-voice-agent")

# The wall clock must be past this release's date to be believed (raise it with each release).
SYNC_FLOOR = datetime(2026, 1, 1, tzinfo=UTC)
# Steps smaller than this are NTP slewing noise or scheduling jitter, not a step.
STEP_TOLERANCE_S = 2.0
_TIME_ERROR = 5


def plausible(wall: float) -> bool:
    """True when `wall` (epoch seconds) is after SYNC_FLOOR."""
    return wall >= SYNC_FLOOR.timestamp()


class _Timex(ctypes.Structure):
    # struct timex (Linux): modes, then longs; only the return value matters, the kernel
    # needs room for the whole struct (it is well under 256 bytes).
    _fields_ = [("modes", ctypes.c_uint), ("_rest", ctypes.c_byte * 252)]


_libc: ctypes.CDLL | None = None


def kernel_synced() -> bool | None:
    """Whether the kernel considers the clock synchronised (None when unknown)."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        state = _libc.adjtimex(ctypes.byref(_Timex()))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return state != _TIME_ERROR


def wall_synced(wall: float) -> bool:
    """The best verdict on whether a UTC label taken now is right."""
    return plausible(wall) and kernel_synced() is not False


class ClockWatch:
    """Detects steps of the wall clock relative to the monotonic clock.

    `check()` returns the step in seconds (0.0 when none) and logs one line per step; the
    offset it tracks (wall - monotonic) is what a UTC anchor must move by.
    """

    def __init__(self, wall: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic,
                 tolerance_s: float = STEP_TOLERANCE_S) -> None:
        self.wall, self.mono, self.tolerance_s = wall, mono, tolerance_s
        self._offset = wall() - mono()
        self.steps = 0

    def check(self) -> float:
        offset = self.wall() - self.mono()
        step = offset - self._offset
        if abs(step) < self.tolerance_s:
            return 0.0
        self._offset = offset
        self.steps += 1
        now = self.wall()
        log.warning("wall clock stepped by %+.1f s (now %s UTC): UTC labels of windows "
                    "re-anchored; ages and durations use the monotonic clock, nothing dropped",
                    step, datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
        return step


class UtcStamper:
    """Labels audio time with UTC and says how (`source`, `synced()`).

    * `wall` (live sources): audio time 0 is the wall time when listening started; the anchor
      moves with every detected wall-clock step, so labels are right again at once after NTP
      steps a clock that booted at 1970.
    * `file` (a recording replayed, at any speed): labels follow the file's own audio clock
      from the wall time processing started. They are not live: a file processed faster than
      real time gets labels ahead of the wall clock, and a step is not applied.
    """

    SOURCES = ("wall", "file")

    def __init__(self, source: str = "wall", *, wall: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic,
                 synced: Callable[[float], bool] | None = None,
                 anchor: float | None = None) -> None:
        if source not in self.SOURCES:
            raise ValueError(f"UTC stamp source {source!r}: expected one of {self.SOURCES}")
        self.source = source
        self._wall = wall
        self._synced = synced or wall_synced
        self.anchor = wall() if anchor is None else anchor
        self.anchor_synced = self._synced(self.anchor)
        self.watch = ClockWatch(wall, mono) if source == "wall" and anchor is None else None

    def current(self) -> tuple[float, bool]:
        """(wall time of audio time 0, whether labels from it are synchronised wall time)."""
        if self.watch is None:
            return self.anchor, self.anchor_synced
        self.anchor += self.watch.check()
        return self.anchor, self._synced(self._wall())
