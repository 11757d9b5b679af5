"""Runs the integrator's programs for accepted decisions, off the pipeline thread.

`submit` is all the pipeline thread does: per accepted decision with an entry in the table,
one `put_nowait` into that action's bounded queue. A worker thread per action takes them one
at a time and runs the program (posix_spawn, no shell): the decision's JSON line on stdin,
EVA_LABEL, EVA_CONFIDENCE and EVA_MODEL in the environment, in its own process group, killed
(SIGKILL) when it outlives the table's timeout_s. A full queue drops the decision for that
action (a stuck program cannot pile up work or memory).

Never run: abstentions (accepted false, which includes every assist and shadow decision),
`unknown`, and anything in the `off`/`shadow` modes, checked here again so that a policy bug
cannot turn into an action.

What happened is kept for the monitor (`take`, on the pipeline thread): per run the latency
from the decision to the program's start (`action_latency_ms`) and an `action_outcome`
(0 ok, 1 failed: exit status not 0 or could not start, 2 killed at the timeout, 3 dropped on a
full queue). A failure is logged once per action and cause, naming the program, never the label or
anything else of the decision.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from agent.actions.table import Action, ActionTable
from agent.errors import one_line
from agent.recognition.decision import Decision

log = logging.getLogger("edge-voice-agent.actions")

OK, FAILED, TIMED_OUT, DROPPED = 0, 1, 2, 3
ACTING_MODES = frozenset({"partial", "full"})
# The agent's own systemd plumbing is not the action's business.
PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "LISTEN_FDS", "LISTEN_PID",
               "LISTEN_FDNAMES")


@dataclass(frozen=True)
class Job:
    """One run: the decision as it goes to the program, and when it was handed over."""

    line: bytes
    env: dict[str, str]
    submitted: float   # time.perf_counter() at submit
    timeout_s: float


def acts_on(d: Decision, unknown_label: str | None) -> bool:
    """Whether a decision may cause an action at all."""
    return d.accepted and d.mode in ACTING_MODES and d.label is not None and \
        d.label != (unknown_label or "unknown")


class ActionRunner:
    """The action table in force, one worker per action, and what they measured."""

    def __init__(self, table: ActionTable, unknown_label: str | None = None) -> None:
        self.table = table
        self.unknown_label = unknown_label
        self._workers: dict[Action, _Worker] = {}
        self._lock = threading.Lock()
        self._measures: list[tuple[str, float]] = []
        self._logged: set[tuple[Action, str]] = set()
        self.counts = {"ok": 0, "failed": 0, "timed_out": 0, "dropped": 0}
        env = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV}
        self._base_env = env

    # --- pipeline thread --------------------------------------------------------------------
    def replace(self, table: ActionTable, unknown_label: str | None = None) -> None:
        """Swap the table (one reference: a decision sees the old or the new, never a mix);
        workers of actions no longer in it finish what they hold and end."""
        self.table = table
        if unknown_label is not None:
            self.unknown_label = unknown_label
        keep = set(table.actions.values())
        for a in [a for a in self._workers if a not in keep]:
            self._workers.pop(a).retire()

    def submit(self, decisions: Iterable[Decision]) -> None:
        table = self.table
        if not table:
            return
        for d in decisions:
            if not acts_on(d, self.unknown_label):
                continue
            assert d.label is not None
            action = table.match(d.label)
            if action is None:
                continue
            w = self._workers.get(action)
            if w is None:
                w = self._workers[action] = _Worker(self, action, table.queue_max)
            env = dict(self._base_env, EVA_LABEL=d.label,
                       EVA_CONFIDENCE="" if d.confidence is None else f"{d.confidence:.4f}",
                       EVA_MODEL=d.model or "")
            job = Job((json.dumps(d.to_json()) + "\n").encode(), env, time.perf_counter(),
                      table.timeout_s)
            try:
                w.q.put_nowait(job)
            except queue.Full:
                self.record(action, DROPPED, None, f"its queue is full ({table.queue_max} "
                            "waiting): decisions for it are dropped while it is busy (counted "
                            "in action_outcome)")

    def take(self) -> list[tuple[str, float]]:
        """(metric, value) pairs measured since the last call, for the monitor."""
        with self._lock:
            out, self._measures = self._measures, []
        return out

    # --- any thread -------------------------------------------------------------------------
    def record(self, action: Action, outcome: int, latency_ms: float | None,
               cause: str = "") -> None:
        name = ("ok", "failed", "timed_out", "dropped")[outcome]
        with self._lock:
            self.counts[name] += 1
            self._measures.append(("action_outcome", float(outcome)))
            if latency_ms is not None:
                self._measures.append(("action_latency_ms", latency_ms))
            first = outcome != OK and (action, cause) not in self._logged
            if first:
                self._logged.add((action, cause))
        if first:
            # the program, not the label: a log line must not say what was said
            log.warning("action %s: %s; logged once per cause", action.argv[0], cause)

    def idle(self) -> bool:
        """No run going and none waiting."""
        return all(w.idle() for w in list(self._workers.values()))

    def waiting(self) -> int:
        """Runs queued behind the running ones."""
        return sum(w.q.qsize() for w in list(self._workers.values()))

    def close(self, timeout_s: float) -> None:
        """Let queued runs finish for up to `timeout_s`, then kill what still runs and drop
        what waits (one line saying how many)."""
        workers = list(self._workers.values())
        self._workers.clear()
        for w in workers:
            w.retire()
        deadline = time.monotonic() + timeout_s
        for w in workers:
            w.join(max(0.0, deadline - time.monotonic()))
        left = 0
        for w in workers:
            left += w.abort()
        for w in workers:
            w.join(1.0)
        if left:
            log.warning("stopping: %d queued action run(s) were not started", left)


_RETIRE = object()


class _Worker(threading.Thread):
    """Runs one action's jobs, one at a time, in order."""

    def __init__(self, runner: ActionRunner, action: Action, bound: int) -> None:
        super().__init__(name=f"action {action.key}", daemon=True)
        self.runner, self.action = runner, action
        self.q: queue.Queue = queue.Queue(maxsize=bound)
        self._busy = False
        self._aborted = False
        self._proc: Spawned | None = None
        self._retired = False
        self.start()

    def idle(self) -> bool:
        return not self._busy and self.q.empty()

    def retire(self) -> None:
        """Finish the queue, then end (the sentinel may wait: the queue can be full)."""
        self._retired = True
        try:
            self.q.put_nowait(_RETIRE)
        except queue.Full:
            pass

    def abort(self) -> int:
        """Kill the running program; return how many queued runs are dropped."""
        self._aborted = True
        proc = self._proc
        if proc is not None:
            proc.kill_group()
        n = 0
        while True:
            try:
                if self.q.get_nowait() is not _RETIRE:
                    n += 1
            except queue.Empty:
                return n

    def run(self) -> None:
        while not self._aborted:
            try:
                job = self.q.get(timeout=0.5)
            except queue.Empty:
                if self._retired:
                    return
                continue
            if job is _RETIRE:
                return
            self._busy = True
            try:
                self._run(job)
            finally:
                self._busy = False

    def _run(self, job: Job) -> None:
        a = self.action
        try:
            proc = Spawned(a.argv, job.env, job.line)
        except OSError as e:
            self.runner.record(a, FAILED, None, f"cannot start ({one_line(e.strerror or e)})")
            return
        latency_ms = (proc.started - job.submitted) * 1000.0
        self._proc = proc
        try:
            status = proc.wait(job.timeout_s)
        finally:
            self._proc = None
        if status is None:
            proc.kill_group()
            proc.wait(None)
            self.runner.record(a, TIMED_OUT, latency_ms,
                               f"still running after actions.timeout_s = {job.timeout_s:g} s; "
                               "its process group was killed")
            return
        if self._aborted and status < 0:
            return  # killed by close(): the stop, not the action, ended it
        if status != 0:
            how = f"killed by signal {-status}" if status < 0 else f"exited with status {status}"
            self.runner.record(a, FAILED, latency_ms, how)
            return
        self.runner.record(a, OK, latency_ms)


class Spawned:
    """A program started with posix_spawn in a new session (its own process group), stdin a
    pipe holding `stdin`, stdout and stderr the agent's stderr.

    Why not subprocess.Popen: every release and re-acquisition of the interpreter lock costs up
    to its switch interval (5 ms) while the pipeline thread computes, and Popen takes several
    before the program runs; one posix_spawn call is one (`started` is taken right after it)."""

    def __init__(self, argv: tuple[str, ...], env: dict[str, str], stdin: bytes) -> None:
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            self.pid = os.posix_spawnp(argv[0], list(argv), env, setsid=True, file_actions=[
                (os.POSIX_SPAWN_DUP2, r, 0), (os.POSIX_SPAWN_DUP2, 2, 1)])
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        self.started = time.perf_counter()
        self.status: int | None = None
        try:
            os.set_blocking(w, False)  # a decision is far below a pipe's 64 KiB
            os.write(w, stdin)
        except OSError:
            pass  # the program does not read its stdin: its business
        finally:
            os.close(w)
        try:
            self._pidfd: int | None = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self._pidfd = None  # kernels before 5.3: poll waitpid instead

    def wait(self, timeout_s: float | None) -> int | None:
        """Exit status (negative: killed by that signal), or None when `timeout_s` passed."""
        if self.status is not None:
            return self.status
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                if self._pidfd is not None:
                    os.close(self._pidfd)
                    self._pidfd = None
                return self.status
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            if self._pidfd is not None:
                poller = select.poll()
                poller.register(self._pidfd, select.POLLIN)
                poller.poll(None if left is None else max(1, int(left * 1000)))
            else:
                time.sleep(0.01 if left is None else min(0.01, left))

    def kill_group(self) -> None:
        _kill_group(self.pid)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
