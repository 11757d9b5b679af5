"""The unit under a real systemd: a Debian 12 minbase root booted with systemd-nspawn, the
project installed by systemd/install.sh from a wheel built from this checkout.

What the offline checks (tests/test_systemd_unit.py, a fake notify socket) cannot show: that
`systemctl start` returns on the agent's READY=1, that `systemctl reload` works on a minimal
Debian (no /bin/kill there: the unit used to fail with status=203/EXEC) and applies a changed
threshold, that the watchdog kills and restarts a frozen process, that `systemctl stop` ends
with exit 0, that a file source's decisions land in the state directory, 0600, owned by the
service user, that the decision socket lives in the runtime directory (0660, the service's
group) where `listen` reads it and a user outside the group is refused, and that an action runs
inside the sandbox (it writes the state directory, not /etc).

The root (debootstrap, slow, network) is built once by .ci/systemd-root.sh into
$EVA_SYSTEMD_CACHE (default /var/cache/eva-systemd); the test boots it on a throw-away overlay.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from agent.resources import demo_audio
from tests.conftest import ROOT

CACHE = Path(os.environ.get("EVA_SYSTEMD_CACHE", "/var/cache/eva-systemd"))
UNIT = "edge-voice-agent"
INIT = ("/usr/lib/systemd/systemd", "/lib/systemd/systemd", "/sbin/init")


@dataclass
class Container:
    root: Path
    pid: int  # the container's init (systemd), as seen from the host

    def run(self, *cmd: str, timeout: float = 60, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        pre = ["nsenter", "-t", str(self.pid), "-a"]
        if env:
            pre += ["env", *[f"{k}={v}" for k, v in env.items()]]
        r = subprocess.run([*pre, *cmd], capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}: {r.stdout}{r.stderr}"
                                 f"\njournal: {self.journal()}")
        return r

    def show(self, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", UNIT, *[f"--property={p}" for p in props]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self) -> str:
        with contextlib.suppress(Exception):
            r = subprocess.run(["nsenter", "-t", str(self.pid), "-a", "journalctl", "-u", UNIT,
                                "--no-pager", "-n", "30"], capture_output=True, text=True,
                               timeout=10)
            return r.stdout
        return ""

    def wait(self, pred: Callable[[dict[str, str]], bool], props: tuple[str, ...],
             timeout_s: float, what: str) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.show(*props)
            if pred(state):
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}: "
                                     f"{state}\njournal: {self.journal()}")
            time.sleep(0.2)


def _why_not() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "booting a container needs root on Linux"
    for tool, pkg in (("systemd-nspawn", "systemd-container"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install {pkg})"
    if not (CACHE / "root.ok").is_file() or not list((CACHE / "wheels").glob("numpy-*.whl")):
        return (f"no cached Debian root and wheels in {CACHE}; build them with "
                "`bash .ci/systemd-root.sh` (CI does)")
    return None


def _mount_root(work: Path) -> tuple[Path, Callable[[], None]]:
    """A writable view of the cached root: an overlay (instant, the cache stays pristine), or
    a copy where overlays are not allowed."""
    merged = work / "root"
    for d in ("upper", "ovl-work", "root"):
        (work / d).mkdir()
    opts = f"lowerdir={CACHE / 'root'},upperdir={work / 'upper'},workdir={work / 'ovl-work'}"
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode == 0:
        return merged, lambda: subprocess.run(["umount", "-l", str(merged)], timeout=30,
                                              check=False)
    subprocess.run(["cp", "-a", f"{CACHE / 'root'}/.", str(merged)], check=True, timeout=300)
    return merged, lambda: None


def _init_pid(nspawn: subprocess.Popen, timeout_s: float) -> int | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and nspawn.poll() is None:
        for children in Path(f"/proc/{nspawn.pid}/task").glob("*/children"):
            for pid in children.read_text().split():
                with contextlib.suppress(OSError):
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
                    if cmd in INIT:
                        return int(pid)
        time.sleep(0.05)
    return None


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    why = _why_not()
    if why:
        pytest.skip(why)
    work = tmp_path_factory.mktemp("systemd")
    root, unmount = _mount_root(work)
    log = open(work / "nspawn.log", "wb")  # noqa: SIM115 - closed in the finally below
    nspawn = subprocess.Popen(
        ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet", "-D", str(root), "-b",
         "--console=read-only"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        pid = _init_pid(nspawn, 30)
        if pid is None:
            tail = (work / "nspawn.log").read_text(errors="replace")[-400:]
            pytest.skip(f"containers cannot run here: systemd-nspawn did not boot ({tail!r})")
        c = Container(root, pid)
        state, deadline = "", time.monotonic() + 60
        while state not in ("running", "degraded") and time.monotonic() < deadline:
            # before systemd listens on its socket, systemctl cannot ask it (empty answer)
            r = c.run("systemctl", "is-system-running", "--wait", check=False)
            state = r.stdout.strip() or r.stderr.strip()
            if state not in ("running", "degraded"):
                time.sleep(0.2)
        if state not in ("running", "degraded"):
            pytest.skip(f"containers cannot run here: the container's systemd is {state!r}")
        yield c
    finally:
        with contextlib.suppress(Exception):
            if nspawn.poll() is None and "c" in locals():
                c.run("systemctl", "poweroff", check=False, timeout=10)
            nspawn.wait(timeout=20)
        if nspawn.poll() is None:
            nspawn.kill()
            nspawn.wait(timeout=10)
        log.close()
        unmount()


def _install(c: Container) -> None:
    """install.sh from this checkout, with a wheel built from it and the cached dependency
    wheels (pip inside the container has no index)."""
    wheels = c.root / "opt" / "wheels"
    wheels.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
                    "--find-links", str(CACHE / "build"), "--disable-pip-version-check", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True, timeout=180)
    for w in (CACHE / "wheels").glob("*.whl"):
        shutil.copy2(w, wheels)
    (wheel,) = wheels.glob("edge_voice_agent-*.whl")
    shutil.copytree(ROOT / "systemd", c.root / "opt" / "src" / "systemd")
    x, rate = sf.read(str(demo_audio()), dtype="float32")  # ~7 min of spoken digits
    sf.write(str(c.root / "opt" / "src" / "digits.wav"), np.tile(x, 20), rate, subtype="PCM_16")
    r = c.run("bash", "/opt/src/systemd/install.sh", "--no-start", f"/opt/wheels/{wheel.name}",
              env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/opt/wheels", "PIP_NO_COMPILE": "1"},
              timeout=300)
    assert "install: done" in r.stdout


STATE = f"/var/lib/{UNIT}"
# An action that records its decision where the sandbox lets it write, then tries /etc.
ACTION = (f"cat > {STATE}/last-action.json; touch /etc/eva-action-probe "
          f"2> {STATE}/action-denied.txt; exit 0")


def _config(c: Container, threshold: float) -> None:
    (c.root / "etc" / UNIT / "config.toml").write_text(
        f'[audio]\nsource = "/opt/src/digits.wav"\nspeed = 1.0\n'
        f"[decision]\nthreshold = {threshold}\n"
        f'[actions]\n"*" = ["/bin/sh", "-c", "{ACTION}"]\n')


def test_unit_starts_reloads_survives_a_freeze_and_stops_under_a_real_systemd(
        container: Container) -> None:
    c = container
    _install(c)
    _config(c, 0.5)
    # the watchdog at the unit's 30 s would make this test slow: the same mechanism, shorter
    dropin = c.root / "etc" / "systemd" / "system" / f"{UNIT}.service.d"
    dropin.mkdir(parents=True)
    (dropin / "test.conf").write_text("[Service]\nWatchdogSec=3\nRestartSec=1\n")
    c.run("systemctl", "daemon-reload")

    # start returns once the agent said READY=1 (Type=notify), with its STATUS= text
    c.run("systemctl", "start", UNIT, timeout=90)
    s = c.show("ActiveState", "MainPID", "StatusText", "NRestarts")
    assert s["ActiveState"] == "active" and s["NRestarts"] == "0", s
    assert "mode partial (threshold 0.500)" in s["StatusText"], s
    main_pid = s["MainPID"]

    # reload with nothing but the venv (the minbase root has no /bin/kill)
    assert not (c.root / "bin" / "kill").exists() and not (c.root / "usr/bin/kill").exists()
    _config(c, 0.75)
    c.run("systemctl", "reload", UNIT)
    s = c.wait(lambda s: "(threshold 0.750)" in s["StatusText"], ("StatusText", "MainPID",
               "ActiveState"), 15, "the reloaded threshold in STATUS")
    assert s["MainPID"] == main_pid and s["ActiveState"] == "active"  # same process

    # a file source's decisions in the state directory, private to the service user
    decisions = c.root / "var" / "lib" / UNIT / "decisions.jsonl"
    deadline = time.monotonic() + 20
    while (not decisions.exists() or not decisions.read_text().strip()) and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    assert decisions.read_text().splitlines(), c.journal()
    uid = next(int(line.split(":")[2]) for line in (c.root / "etc/passwd").read_text().splitlines()
               if line.startswith(f"{UNIT}:"))
    st = decisions.stat()
    assert (st.st_mode & 0o777, st.st_uid) == (0o600, uid)

    # the decision socket in the runtime directory, 0660 for the service's group; `listen`
    # reads from it (root here), a user outside the group is told in one line
    sock = f"/run/{UNIT}/decisions.sock"
    assert c.run("stat", "-c", "%a %U %G %F", sock).stdout.split() == \
        ["660", UNIT, UNIT, "socket"]
    venv = f"/opt/{UNIT}/venv/bin/edge-voice-agent"
    r = c.run("sh", "-c", f"timeout 30 {venv} listen | head -n 1", timeout=60)
    line = json.loads(r.stdout)
    assert line["model"].startswith("fsdd-digits@") and "accepted" in line
    r = c.run("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", venv, "listen",
              check=False)
    assert r.returncode == 2 and "permission denied" in r.stderr, r.stderr

    # an action ran inside the sandbox: it could write the state directory, not /etc
    action = c.root / "var" / "lib" / UNIT / "last-action.json"
    deadline = time.monotonic() + 20
    while not action.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert json.loads(action.read_text())["accepted"] is True, c.journal()
    assert action.stat().st_uid == uid
    assert "Read-only file system" in (action.parent / "action-denied.txt").read_text()
    assert not (c.root / "etc" / "eva-action-probe").exists()

    # a frozen process stops pinging: the watchdog kills it and systemd starts a new one
    c.run("systemctl", "kill", "--kill-whom=main", "--signal=SIGSTOP", UNIT)
    s = c.wait(lambda s: s["NRestarts"] == "1" and s["ActiveState"] == "active",
               ("NRestarts", "ActiveState", "MainPID"), 30, "the watchdog restart")
    assert s["MainPID"] != main_pid
    assert "Watchdog timeout" in c.journal() or "watchdog" in c.journal()

    # stop: SIGTERM answered, exit 0
    t0 = time.monotonic()
    c.run("systemctl", "stop", UNIT, timeout=30)
    s = c.show("ActiveState", "Result", "ExecMainStatus")
    assert s == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, s
    assert time.monotonic() - t0 < 10
