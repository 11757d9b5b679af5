"""The local decision socket: every decision, the moment it is written, to every local reader.

A Unix domain stream socket (never a network port), mode 0660 with the service's group, so
only the service user and members of its group can read decisions: per-utterance data stays
on the device. Each reader receives the same JSON lines as the decisions file, in order.

The pipeline thread hands a decision's bytes to each reader with one non-blocking send (a
reader hears it at once, without waiting for another thread to get the interpreter); what the
kernel does not take goes into that reader's bounded buffer and the socket thread, woken
through a pipe, writes it when the reader reads again. The socket thread also accepts readers
and notices when they leave. A reader that does not read fills its kernel buffer, then its own
buffer (at most
`buffer_max` decisions), and from then on decisions are dropped *for that reader only*, counted
per reader (logged when it starts and when it leaves) and in the `socket_dropped` metric. The
pipeline never waits for a reader, and memory stays bounded whatever readers do.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import selectors
import socket
import stat
import struct
import threading
from collections import deque
from collections.abc import Iterable
from pathlib import Path

from agent.errors import AgentError
from agent.recognition.decision import Decision

log = logging.getLogger("edge-voice-agent.socket")

SOCKET_NAME = "decisions.sock"
SOCKET_MODE = 0o660
BUFFER_MAX = 256      # decisions held per reader beyond what its kernel buffer takes
MAX_READERS = 64
SUN_PATH_MAX = 107    # bytes, Linux sockaddr_un; longer paths are reached through the directory


def socket_path(output_socket: str, state_dir: Path) -> Path | None:
    """Where the agent serves: output.socket, else $RUNTIME_DIRECTORY (systemd's
    RuntimeDirectory=), else the state directory; None for `none`."""
    if output_socket == "none":
        return None
    if output_socket:
        return Path(output_socket)
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:
        return Path(runtime.split(":")[0]) / SOCKET_NAME
    return state_dir / SOCKET_NAME


@contextlib.contextmanager
def reachable(path: Path):
    """An address for `path` that fits sockaddr_un: the path itself, or (too long) the same
    file through an O_PATH descriptor of its directory."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def connect(path: Path, timeout: float | None = None) -> socket.socket:
    """A connected client socket (OSError when nothing listens there)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(timeout)
        with reachable(path) as addr:
            s.connect(addr)
        s.settimeout(None)
    except BaseException:
        s.close()
        raise
    return s


def encode(decisions: Iterable[Decision]) -> list[bytes]:
    return [(json.dumps(d.to_json()) + "\n").encode() for d in decisions]


class Reader:
    """One connected reader: its socket, bounded buffer and counts."""

    def __init__(self, sock: socket.socket, n: int) -> None:
        self.sock = sock
        self.n = n
        self.peer = _peer(sock)
        self.pending: deque[bytes] = deque()
        self.out = b""        # handed to the socket, partly sent (under the lock)
        self.sent = 0         # decisions handed to the kernel
        self.dropped = 0      # decisions dropped for this reader
        self.writing = False  # registered for EVENT_WRITE


class DecisionSocket:
    """Serves decisions on `path` until `close()`."""

    def __init__(self, path: Path, buffer_max: int = BUFFER_MAX) -> None:
        self.path = path
        self.buffer_max = buffer_max
        self.readers: list[Reader] = []
        self.dropped = 0      # decisions dropped for slow readers, all readers, since start
        self._lock = threading.Lock()
        self._next = 1
        self._closing = False
        self._listener = self._bind(path)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._serve, name="decision-socket", daemon=True)
        self._thread.start()

    @staticmethod
    def _bind(path: Path) -> socket.socket:
        fix = "set output.socket to a writable path, or to none for no socket"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink() or path.exists():
                if not stat.S_ISSOCK(path.lstat().st_mode):
                    raise AgentError(f"decision socket {path} exists and is not a socket; move "
                                     f"it away or {fix}")
                try:
                    connect(path, timeout=1.0).close()
                except OSError:
                    path.unlink()  # left by an agent that did not stop cleanly
                else:
                    raise AgentError(f"decision socket {path} is served by another running "
                                     "agent; stop it or give this one another --state-dir or "
                                     "--output-socket")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK |
                              socket.SOCK_CLOEXEC)
            with reachable(path) as addr:
                s.bind(addr)
                os.chmod(addr, SOCKET_MODE)  # the bind honoured the umask (0077 in the unit)
            s.listen(16)
            return s
        except OSError as e:
            raise AgentError(f"decision socket {path} cannot be created ({e.strerror or e}); "
                             f"{fix}") from None

    # --- pipeline thread --------------------------------------------------------------------
    def publish(self, decisions: list[Decision]) -> tuple[int, int]:
        """Queue the decisions for every reader; (queued, dropped) reader-decision pairs."""
        if not decisions or not self.readers:
            return 0, 0
        lines = encode(decisions)
        queued = dropped = 0
        first_drop: list[Reader] = []
        wake = False
        with self._lock:
            for r in self.readers:
                if not r.out and not r.pending:  # the usual case: straight to the kernel
                    data = b"".join(lines)
                    try:
                        done = r.sock.send(data)
                    except OSError:  # full (EAGAIN), or gone: the socket thread sees that
                        done = 0
                    if done:
                        r.out = data[done:]  # a line is never cut: the rest follows
                        r.sent += len(lines)
                        queued += len(lines)
                        wake = wake or bool(r.out)
                        continue
                wake = True
                room = self.buffer_max - len(r.pending)
                take = lines[:max(0, room)]
                r.pending.extend(take)
                lost = len(lines) - len(take)
                queued += len(take)
                if lost:
                    if not r.dropped:
                        first_drop.append(r)
                    r.dropped += lost
                    dropped += lost
            self.dropped += dropped
        if wake:
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"\0")  # a full pipe: a wake-up is pending anyway
        for r in first_drop:
            log.warning("decision socket: reader %d (%s) is not reading; decisions beyond %d "
                        "buffered are dropped for it (counted in socket_dropped)", r.n, r.peer,
                        self.buffer_max)
        return queued, dropped

    def close(self) -> None:
        """Send what is buffered (without waiting for slow readers), say goodbye by closing
        every connection (a `listen` then exits 0), and remove the socket file."""
        if self._closing:
            return
        self._closing = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")
        self._thread.join(timeout=2.0)
        with contextlib.suppress(OSError):
            with reachable(self.path) as addr:
                st = os.lstat(addr)
                if stat.S_ISSOCK(st.st_mode):
                    os.unlink(addr)
        self._listener.close()
        for r in list(self.readers):
            self._drop(r, "the agent stopped")
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # --- socket thread ----------------------------------------------------------------------
    def _serve(self) -> None:
        try:
            while not self._closing:
                for key, events in self._sel.select():
                    what = key.data
                    if what == "accept":
                        self._accept()
                    elif what == "wake":
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 4096)
                        for r in list(self.readers):
                            self._flush(r)
                    elif events & selectors.EVENT_READ:
                        self._readable(what)
                    elif events & selectors.EVENT_WRITE:
                        self._flush(what)
            for r in list(self.readers):
                self._flush(r)  # a last non-blocking write of what is buffered
        except Exception as e:  # noqa: BLE001 - one line; the pipeline goes on without it
            log.error("decision socket %s stopped serving: %s; decisions still go to the "
                      "decisions file and actions", self.path, e)
            with self._lock:
                self.readers = []

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("decision socket: cannot accept a reader (%s)", e.strerror)
                return
            if len(self.readers) >= MAX_READERS:
                log.warning("decision socket: %d readers already; refusing another",
                            MAX_READERS)
                conn.close()
                continue
            conn.setblocking(False)
            r = Reader(conn, self._next)
            self._next += 1
            with self._lock:
                self.readers = [*self.readers, r]
            self._sel.register(conn, selectors.EVENT_READ, r)
            log.info("decision socket: reader %d connected (%s)", r.n, r.peer)

    def _readable(self, r: Reader) -> None:
        """Readers do not talk: anything they send is discarded; end of file means gone."""
        try:
            data = r.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(r, "disconnected")

    def _flush(self, r: Reader) -> None:
        gone = False
        with self._lock:  # sends never block: the pipeline thread waits microseconds at most
            while True:
                if not r.out:
                    if not r.pending:
                        break
                    r.sent += len(r.pending)
                    r.out = b"".join(r.pending)
                    r.pending.clear()
                try:
                    done = r.sock.send(r.out)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    gone = True
                    break
                r.out = r.out[done:]
                if r.out:
                    break
            want = bool(r.out or r.pending)
        if gone:
            self._drop(r, "disconnected")
            return
        if want != r.writing and r in self.readers:
            r.writing = want
            self._sel.modify(r.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if want
                                                             else 0), r)

    def _drop(self, r: Reader, why: str) -> None:
        with self._lock:
            if r not in self.readers:
                return
            self.readers = [x for x in self.readers if x is not r]
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(r.sock)
        r.sock.close()
        log.info("decision socket: reader %d (%s) gone (%s): %d decisions sent, %d dropped for "
                 "it", r.n, r.peer, why, r.sent, r.dropped)


def _peer(sock: socket.socket) -> str:
    with contextlib.suppress(OSError):
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET,
                                                            socket.SO_PEERCRED, 12))
        return f"pid {pid}, uid {uid}"
    return "unknown peer"
