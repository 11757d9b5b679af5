"""Logging for a daemon whose stderr is the journal: one line per event, with a level.

Why a module: journald splits records on newlines, so a multi-line message or traceback would
become many unrelated entries; and when stderr *is* the journal (systemd sets $JOURNAL_STREAM to
its device:inode) a "<N>" prefix gives each line its real syslog priority, and journald adds the
timestamp itself. Elsewhere (a terminal, a test) lines carry a timestamp and the level name.

Content rule, enforced by review and tests: nothing per utterance (labels, confidences, audio)
is logged at INFO or above; decisions go to the decisions file only.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import IO

# syslog priorities (sd-daemon(3)): what journald reads from a "<N>" line prefix.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


def _one_line(text: str) -> str:
    return " | ".join(part.strip() for part in text.splitlines() if part.strip())


class OneLineFormatter(logging.Formatter):
    """Formats a record, traceback included, as exactly one line."""

    def __init__(self, journal: bool) -> None:
        fmt = "%(name)s: %(message)s" if journal else \
            "%(asctime)s %(levelname)s %(name)s: %(message)s"
        super().__init__(fmt)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = _one_line(super().format(record))
        if self.journal:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


def stderr_is_journal(stream: IO[str] | None = None, env: dict[str, str] | None = None) -> bool:
    """True when `stream` (stderr) is the journal stream systemd announced in $JOURNAL_STREAM."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat((stream or sys.stderr).fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def setup(level: str | int = "INFO", stream: IO[str] | None = None) -> None:
    """Route every logger to stderr, one line per record, at `level`."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter(stderr_is_journal(stream)))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
