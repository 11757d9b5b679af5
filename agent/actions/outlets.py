"""Where a decision goes after the decisions file: the local socket and the actions.

The service makes one `Outlets` at start, hands it every batch of decisions right after the
decisions file took them (`publish`, cheap and non-blocking on the pipeline thread), lets it
report its measurements into the monitor between blocks (`report`), swaps the action table on
a reload (`replace`) and closes it at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from agent.actions.runner import ActionRunner
from agent.actions.socket_server import DecisionSocket, socket_path
from agent.actions.table import ActionTable, check, parse
from agent.config import Config
from agent.errors import AgentError
from agent.recognition.decision import Decision

log = logging.getLogger("edge-voice-agent.actions")


class Observes(Protocol):
    def observe(self, metric: str, value: float | list[float], clock_s: float) -> None: ...


def load_table(cfg: Config, classes: Iterable[str] | None) -> ActionTable:
    """The configured table, checked against the disk (AgentError, one line, when a program
    cannot run) and the model's classes (one warning per label it does not have)."""
    a = cfg.actions
    table = parse(a.labels, a.timeout_s, a.queue_max)
    for warning in check(table, classes):
        log.warning("%s", warning)
    return table


class Outlets:
    def __init__(self, socket: DecisionSocket | None, runner: ActionRunner,
                 socket_error: str = "") -> None:
        self.socket = socket
        self.runner = runner
        self.socket_error = socket_error  # why there is no socket although one was configured
        self._socket_values: list[float] = []

    @classmethod
    def build(cls, cfg: Config, table: ActionTable, unknown_label: str | None) -> Outlets:
        """The socket is an extra outlet: when it cannot be served (a read-only directory,
        another agent on the same path) the agent says so in one line and goes on listening;
        the service raises the `socket_dropped` alarm from `socket_error`."""
        path = socket_path(cfg.output.socket, cfg.state_path())
        sock, error = None, ""
        if path is not None:
            try:
                sock = DecisionSocket(path)
            except AgentError as e:
                error = str(e)
                log.warning("%s; listening goes on without it (decisions still go to the "
                            "decisions file and actions)", error)
        return cls(sock, ActionRunner(table, unknown_label), error)

    @property
    def socket_file(self) -> Path | None:
        return self.socket.path if self.socket is not None else None

    def describe(self) -> str:
        where = str(self.socket_file) if self.socket is not None else "no decision socket"
        return f"decision socket {where}; actions: {self.runner.table.describe()}"

    # --- pipeline thread --------------------------------------------------------------------
    def publish(self, decisions: list[Decision]) -> None:
        if not decisions:
            return
        if self.socket is not None:
            queued, dropped = self.socket.publish(decisions)
            if queued or dropped:
                self._socket_values += [0.0] * queued + [1.0] * dropped
        self.runner.submit(decisions)

    def report(self, monitor: Observes, clock_s: float) -> None:
        """Hand what was measured since the last call to the monitor (pipeline thread)."""
        if self._socket_values:
            values, self._socket_values = self._socket_values, []
            monitor.observe("socket_dropped", values, clock_s)
        for metric, value in self.runner.take():
            monitor.observe(metric, value, clock_s)

    def replace(self, table: ActionTable, unknown_label: str | None) -> None:
        self.runner.replace(table, unknown_label)

    def close(self, actions_timeout_s: float) -> None:
        """Readers get what is buffered and then end of file; queued actions may finish for
        `actions_timeout_s`, the rest is killed or not started."""
        if self.socket is not None:
            self.socket.close()
        self.runner.close(actions_timeout_s)
