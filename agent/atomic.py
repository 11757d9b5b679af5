"""Replace a file so that readers (and a crash or power cut) see the old or the new content,
never half of it: write a temporary file beside it, fsync it, rename it over the old one,
fsync the directory.

One writer for every state file that must survive a crash (the model store's pointers and
rollout command, the personal store's enrollment and adaptation): the sequence is easy to get
subtly wrong, so it is written once.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: Path, write: Callable[[IO[bytes]], object], mode: int = 0o644) -> None:
    """`write(f)` fills a new temporary file (created with `mode`) that then replaces `path`;
    on any failure the temporary file is removed and `path` is unchanged."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(d: Path) -> None:
    """Make a rename in `d` durable; a file system that cannot fsync a directory is skipped."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
