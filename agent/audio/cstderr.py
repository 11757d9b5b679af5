"""What C audio libraries write straight to file descriptor 2, turned into log lines.

Why: when a microphone goes away, PortAudio's ALSA host API prints lines such as
"Expression 'alsa_snd_pcm_poll_descriptors_revents( ... )' failed in
'src/hostapi/alsa/pa_linux_alsa.c', line: 3665" directly to fd 2. Python never sees them, so they
reached the journal raw, without level or context, next to the agent's own one-line report.
While a microphone is in use, fd 2 is therefore a pipe read here: Python's own stderr (the log
handler) keeps writing to the real stream, C lines are held for HOLD_S so the microphone-lost
report can fold them into its one line (`claim()`), and lines nobody claims are logged as one
warning each (repeats counted), so nothing is hidden.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import select
import sys
import threading
import time

log = logging.getLogger("edge-voice-agent")

HOLD_S = 1.0      # a C line waits this long for a report to fold it in before it is logged
MAX_HELD = 200    # lines kept at most (a library printing in a loop must not grow memory)
_PA_EXPR = re.compile(r"Expression '(\w+)\s*\(.*' failed in '(?:[^']*/)?([^'/]+)', line: (\d+)")


def shorten(line: str) -> str:
    """PortAudio's "Expression 'f( args )' failed in 'path/file.c', line: N" as
    "f failed (file.c:N)"; anything else unchanged."""
    m = _PA_EXPR.search(line)
    return f"{m.group(1)} failed ({m.group(2)}:{m.group(3)})" if m else line.strip()


def fold(lines: list[str]) -> str:
    """Distinct lines in order, repeats counted, joined for one log line."""
    counts: dict[str, int] = {}
    for line in lines:
        counts[line] = counts.get(line, 0) + 1
    return " | ".join(f"{k} (x{n})" if n > 1 else k for k, n in counts.items())


class CStderr:
    """Captures fd 2 for the process (one instance, started once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: list[tuple[float, str]] = []
        self._partial = b""
        self._read_fd = -1
        self._real_fd = -1
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self._read_fd >= 0

    def start(self) -> bool:
        """Redirect fd 2 into the capture; False (and nothing changed) where it cannot."""
        if self.active:
            return True
        try:
            sys.stderr.flush()
            real = os.dup(2)
            r, w = os.pipe()
        except (OSError, ValueError, AttributeError):
            return False
        old = sys.stderr
        stream = os.fdopen(os.dup(real), "w", buffering=1, encoding="utf-8",
                           errors="backslashreplace")
        os.dup2(w, 2)
        os.close(w)
        os.set_blocking(r, False)
        self._read_fd, self._real_fd = r, real
        sys.stderr = stream  # Python's own writes (the log handler) go to the real stream
        for h in logging.getLogger().handlers:
            if isinstance(h, logging.StreamHandler) and h.stream is old:
                h.setStream(stream)
        self._thread = threading.Thread(target=self._run, name="c-stderr", daemon=True)
        self._thread.start()
        atexit.register(self.stop)
        return True

    def claim(self) -> list[str]:
        """Every C line not yet logged (shortened), for a report about to be logged."""
        with self._lock:
            self._read()
            lines = [shorten(text) for _, text in self._held]
            self._held.clear()
        return lines

    def stop(self) -> None:
        """Give fd 2 back to the real stream; held lines are logged first."""
        if not self.active:
            return
        with self._lock:
            self._read()
            self._forward(force=True)
            os.dup2(self._real_fd, 2)
            os.close(self._read_fd)
            os.close(self._real_fd)
            self._read_fd = self._real_fd = -1

    # --- the reader thread ---------------------------------------------------------------
    def _run(self) -> None:
        while self.active:
            try:
                select.select([self._read_fd], [], [], HOLD_S / 4)
                with self._lock:
                    if not self.active:
                        return
                    self._read()
                    self._forward(force=False)
            except (OSError, ValueError):  # fd closed by stop() meanwhile
                return

    def _read(self) -> None:
        """Move whatever is in the pipe into `_held` (caller holds the lock)."""
        while True:
            try:
                chunk = os.read(self._read_fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            data = self._partial + chunk
            *lines, self._partial = data.split(b"\n")
            now = time.monotonic()
            for raw in lines:
                text = raw.decode("utf-8", "backslashreplace").rstrip()
                if text:
                    self._held.append((now, text))
        del self._held[:-MAX_HELD]

    def _forward(self, force: bool) -> None:
        """Log lines nobody claimed within HOLD_S (caller holds the lock)."""
        due = time.monotonic() - HOLD_S
        old = [text for t, text in self._held if force or t <= due]
        if not old:
            return
        self._held = [] if force else [(t, x) for t, x in self._held if t > due]
        with contextlib.suppress(Exception):
            log.warning("audio library (C) wrote: %s", fold([shorten(x) for x in old]))


CAPTURE = CStderr()
