"""Signals to a running agent from its own command line.

Why: `systemctl reload` runs ExecReload, which used to be `/bin/kill -HUP $MAINPID`; a minimal
Debian has no /bin/kill (procps), so the reload failed with status=203/EXEC. The agent's venv
is the one thing the unit can count on, so `edge-voice-agent reload PID` sends the signal.
"""

from __future__ import annotations

import os
import signal

from agent.errors import AgentError


def send_reload(pid: int) -> None:
    """SIGHUP to `pid`: the agent re-reads its config (see agent.daemon.service, SIGHUP)."""
    if pid <= 1:
        raise AgentError(f"refusing to signal process {pid}; give the agent's main PID "
                         "(systemd passes $MAINPID)")
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise AgentError(f"no process {pid}; is the agent running? (systemctl status "
                         "edge-voice-agent)") from None
    except PermissionError:
        raise AgentError(f"not allowed to signal process {pid}; run as the agent's user or "
                         "root") from None
