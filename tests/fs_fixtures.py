"""Small real file systems for field-condition tests: a tiny tmpfs (a full disk) and read-only
bind mounts. Both need root (CI runs as root); elsewhere the tests skip and say why."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _mount(args: list[str], what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root to mount (CI runs as root)")
    r = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=10)
    if r.returncode:
        pytest.skip(f"{what}: mount failed here ({r.stderr.strip()})")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


@contextlib.contextmanager
def tiny_fs(path: Path, size: str = "200k") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (the 200 kB state disk of issue 10)."""
    path.mkdir(parents=True, exist_ok=True)
    _mount(["-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
           "a tiny tmpfs")
    try:
        yield path
    finally:
        _umount(path)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """`path` (a directory or a file) bind-mounted read-only onto itself."""
    _mount(["--bind", str(path), str(path)], "a read-only bind mount")
    try:
        r = subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True,
                           text=True, timeout=10)
        if r.returncode:
            pytest.skip(f"read-only remount failed here ({r.stderr.strip()})")
        yield path
    finally:
        _umount(path)


def fill(directory: Path, leave: int = 0) -> Path:
    """Fill the file system of `directory` up to about `leave` free bytes; returns the filler
    file (delete it to give the space back)."""
    filler = directory / f"filler-{len(list(directory.glob('filler-*')))}.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (65536, 4096, 512):
            while True:
                st = os.statvfs(directory)
                if st.f_bavail * st.f_frsize - chunk < leave:
                    break
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


class FailingInserts:
    """Stands in for an outbox's sqlite connection: its INSERTs into the outbox fail with
    `message` (e.g. "database or disk is full", the way SQLITE_FULL does), all else works."""

    def __init__(self, db: sqlite3.Connection, message: str = "database or disk is full") -> None:
        self._db = db
        self._message = message

    def execute(self, sql: str, *a: object) -> sqlite3.Cursor:
        if sql.startswith("INSERT INTO outbox"):
            raise sqlite3.OperationalError(self._message)
        return self._db.execute(sql, *a)

    def __getattr__(self, name: str) -> object:
        return getattr(self._db, name)
