"""`edge-voice-agent listen`: print the running agent's decisions as JSON lines.

Connects to the decision socket and copies each line to stdout as it comes (flushed, so a
pipe into another program gets it at once). Ends with exit 0 on SIGINT/SIGTERM or when the
agent stops (end of file); when nothing serves at the socket, one line and exit 2.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
from pathlib import Path
from typing import TextIO

from agent.actions.socket_server import SOCKET_NAME, connect
from agent.config import Config
from agent.errors import AgentError

SYSTEMD_RUNTIME = Path("/run/edge-voice-agent")


class NoAgent(AgentError):
    """Nothing to listen to: usage-like, exit 2."""

    exit_code = 2


class _Stopped(Exception):
    pass


def candidates(state_dir: str | None = None, socket: str | None = None) -> list[Path]:
    """Where to look: the given socket or state directory, else the service's runtime
    directory, then the default state directory (an agent started from a terminal)."""
    if socket:
        return [Path(socket)]
    if state_dir:
        return [Path(state_dir) / SOCKET_NAME]
    out = []
    if os.environ.get("RUNTIME_DIRECTORY"):
        out.append(Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0]) / SOCKET_NAME)
    out += [SYSTEMD_RUNTIME / SOCKET_NAME, Config().state_path() / SOCKET_NAME]
    return list(dict.fromkeys(out))


def open_socket(paths: list[Path]):
    denied = None
    for p in paths:
        try:
            return connect(p, timeout=2.0), p
        except PermissionError:
            denied = p
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR):
                raise NoAgent(f"cannot connect to the decision socket {p} ({e.strerror})") \
                    from None
    if denied is not None:
        raise NoAgent(f"permission denied on the decision socket {denied}: it is 0660 for the "
                      "service's group; add yourself (sudo usermod -aG edge-voice-agent $USER, "
                      "then log in again) or run as root")
    where = " or ".join(str(p) for p in paths)
    raise NoAgent(f"no agent is running at {where}; start one (systemctl start edge-voice-agent"
                  ", or edge-voice-agent run), or pass --state-dir DIR / --socket PATH")


def listen(paths: list[Path], accepted_only: bool = False, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    sock, _ = open_socket(paths)

    def stop(signum: int, frame: object) -> None:
        raise _Stopped

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with sock, sock.makefile("rb") as lines:
            for raw in lines:
                line = raw.decode("utf-8", "replace")
                if accepted_only and not json.loads(line).get("accepted"):
                    continue
                out.write(line)
                out.flush()
    except _Stopped:
        pass
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 0
