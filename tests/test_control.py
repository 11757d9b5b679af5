"""`edge-voice-agent reload PID`: what the unit's ExecReload runs instead of /bin/kill."""

from __future__ import annotations

import signal
import subprocess
import sys

from tests.conftest import ROOT, eva

WAITER = """
import signal, sys
signal.signal(signal.SIGHUP, lambda *_: (print("HUP", flush=True), sys.exit(0)))
print("ready", flush=True)
signal.pause()
"""


def test_reload_sends_sighup_to_the_pid() -> None:
    p = subprocess.Popen([sys.executable, "-c", WAITER], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    try:
        assert p.stdout.readline().strip() == "ready"
        r = eva("reload", str(p.pid), cwd=ROOT)
        assert r.returncode == 0, r.stderr
        assert p.stdout.readline().strip() == "HUP"
        assert p.wait(timeout=10) == 0
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=10)


def test_reload_of_a_missing_process_is_one_line() -> None:
    r = eva("reload", "2999999")  # above the kernel's pid_max ceiling: never a live process
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0
    assert "no process 2999999; is the agent running?" in r.stderr
    r = eva("reload", "1")
    assert r.returncode == 1 and "refusing to signal process 1" in r.stderr
