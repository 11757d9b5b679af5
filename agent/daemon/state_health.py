"""Faults of the state directory, reported the same way by every part that owns a file there.

Why one place: the decisions file, the device baseline and the telemetry outbox each degrade on
their own when the disk is full, read-only or corrupt (they keep working in memory, drop and
count what they cannot keep), but an operator needs ONE picture: one log line per part and
cause (not one per failed write), a per-window count (`counts.state_write_errors` in the stats
payload) and a `state_write_errors` system alarm raised at the first failure and cleared when
every part writes again. A corrupt file moved aside raises `state_files_quarantined`.

Parts report from any thread; the monitor collects counts and alarm transitions on the pipeline
thread (`take()`), so reporting never publishes anything itself (a failing outbox would
otherwise report into itself).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("edge-voice-agent")

WRITE_ERRORS = "state_write_errors"
QUARANTINED = "state_files_quarantined"


@dataclass(frozen=True)
class HealthEvent:
    """An alarm transition for the monitor to publish (stage "system")."""

    metric: str
    state: str  # raised | cleared
    value: float
    reason: str


def describe_error(e: BaseException) -> str:
    """The real cause in a few words: strerror for OS errors, SQLite's message otherwise."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    sqlite3 = sys.modules.get("sqlite3")  # not imported here: file/none sinks never load it
    if sqlite3 is not None and isinstance(e, sqlite3.Error):
        return str(e) or type(e).__name__
    return " ".join(str(e).split()) or type(e).__name__


class StateHealth:
    """Counts and once-per-cause log lines for state-directory writes; see the module doc."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.errors: dict[str, int] = {}         # failed writes per part, since start
        self.quarantined: list[tuple[Path, Path]] = []
        self._failing: dict[str, str] = {}        # part -> cause of its current failure
        self._new_errors = 0
        self._new_quarantined = 0
        self._events: list[HealthEvent] = []

    @property
    def failing(self) -> dict[str, str]:
        with self._lock:
            return dict(self._failing)

    def write_failed(self, part: str, path: str | os.PathLike[str], error: BaseException,
                     consequence: str) -> None:
        """One failed write of `part` (decisions, baseline, outbox) to `path`.

        Logs only when the part starts failing or its cause changes; `consequence` says what
        the agent does meanwhile (e.g. "the window is dropped and counted").
        """
        cause = describe_error(error)
        with self._lock:
            self.errors[part] = self.errors.get(part, 0) + 1
            self._new_errors += 1
            new = self._failing.get(part) != cause
            if part not in self._failing and not self._failing:
                self._events.append(HealthEvent(
                    WRITE_ERRORS, "raised", float(sum(self.errors.values())),
                    f"{part} {Path(path).name}: {cause}"[:200]))
            self._failing[part] = cause
        if new:
            log.error("state write failed: %s %s (%s); %s; counted in state_write_errors, "
                      "logged again only when the cause changes or it recovers",
                      part, path, cause, consequence)

    def write_ok(self, part: str, path: str | os.PathLike[str]) -> None:
        """A write of `part` worked; cheap when nothing was failing (called on every write)."""
        if part not in self._failing:
            return
        with self._lock:
            if self._failing.pop(part, None) is None:
                return
            n = self.errors.get(part, 0)
            if not self._failing:
                self._events.append(HealthEvent(WRITE_ERRORS, "cleared", 0.0,
                                                f"{part} writes again"))
        log.info("state writes work again: %s %s (%d failed writes so far)", part, path, n)

    def quarantine(self, path: Path, moved_to: Path, reason: str, consequence: str) -> None:
        """A corrupt state file was moved aside (kept for inspection)."""
        with self._lock:
            self.quarantined.append((path, moved_to))
            self._new_quarantined += 1
            self._events.append(HealthEvent(
                QUARANTINED, "raised", float(len(self.quarantined)),
                f"{path.name} corrupt ({reason}), moved to {moved_to.name}"[:200]))
        log.error("corrupt state file %s (%s) moved aside to %s; %s", path, reason, moved_to,
                  consequence)

    def take(self) -> tuple[int, int, list[HealthEvent]]:
        """(new write errors, new quarantined files, alarm transitions) since the last call."""
        with self._lock:
            out = (self._new_errors, self._new_quarantined, self._events)
            self._new_errors = self._new_quarantined = 0
            self._events = []
        return out
