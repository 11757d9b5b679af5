"""Decisions as JSON Lines: a local file (appended, one write per batch) or stdout.

Why its own module: the decisions file lives on the device's state disk, which fills up, turns
read-only or fails. Listening must go on regardless (the decisions are also acted on, and the
monitoring windows still count them), so a write that fails is one log line per cause, a
`state_write_errors` count and alarm (through `StateHealth`), and the lost lines are counted in
`lost`; writing resumes by itself once the disk takes data again. Only a file that cannot be
opened at start is an error: then nothing could ever be written.

stdout (`-`) is the caller's stream: when its reader closes it (`demo | head -1`), the reader
has had enough; by the Unix convention that ends the run quietly, so the writer notes it in
`reader_gone` (the service stops on it) and drops further lines instead of raising.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from agent.daemon.state_health import StateHealth
from agent.errors import AgentError
from agent.recognition.decision import Decision

PART = "decisions"


class DecisionWriter:
    """Decisions as JSON Lines to a local file (appended, one write per batch) or stdout."""

    def __init__(self, target: str, health: StateHealth | None = None) -> None:
        self.target = target
        self.health = health or StateHealth()
        self.count = 0   # decisions handed in
        self.lost = 0    # of those, lines the file did not take
        self._fd = -1
        self.reader_gone = False
        if target == "-":
            return
        self.path = Path(target)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as e:
            raise AgentError(f"decisions file {self.path} cannot be opened ({e.strerror}); "
                             "choose a writable --decisions path or --state-dir") from None

    def write(self, decisions: list[Decision]) -> None:
        if not decisions:
            return
        lines = "".join(json.dumps(d.to_json()) + "\n" for d in decisions)
        self.count += len(decisions)
        if self._fd < 0:
            if self.reader_gone:
                return
            try:
                sys.stdout.write(lines)
                sys.stdout.flush()
            except BrokenPipeError:
                self.reader_gone = True
                silence_stdout()
            return
        data = lines.encode("utf-8")
        try:
            size = os.fstat(self._fd).st_size
            done = 0
            while done < len(data):
                done += os.write(self._fd, data[done:])
        except OSError as e:
            # All or nothing: cut a partly written batch off again, so the file never holds a
            # half line (truncating frees space, so it works on a full disk).
            if "size" in locals():
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, size)
            self.lost += len(decisions)
            self.health.write_failed(PART, self.path, e, "listening goes on; lost decisions "
                                     "are counted and writing resumes when the disk takes "
                                     "data again")
            return
        self.health.write_ok(PART, self.path)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def silence_stdout() -> None:
    """Point stdout at /dev/null after its reader went away, so nothing (not even the
    interpreter's flush at exit) reports the broken pipe again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
