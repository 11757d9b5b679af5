"""Nothing phones home (issue 20): `run --telemetry none` makes no network connection and
writes nothing under HOME. ONNX Runtime 1.32's own telemetry did both (DNS lookups of a vendor
host, a device id under ~/.cache/Microsoft) until ORT_DISABLE_TELEMETRY=1 was set before its
import (agent/__init__.py). Checked with strace on the real process."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "agent" / "demo" / "demo-digits.flac"
INET = re.compile(r"\b(connect|sendto|sendmsg)\(.*\bAF_INET6?\b")


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed "
                    "(apt strace; .ci/run installs it)")
def test_run_with_telemetry_none_connects_nowhere_and_writes_nothing_under_home(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    trace = tmp_path / "trace.txt"
    # the caller's environment minus the variable under test: the agent must set it itself
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=connect,sendto,sendmsg,openat,open,creat,mkdir",
         "-o", str(trace), sys.executable, "-m", "agent", "run", "--source", str(DEMO),
         "--telemetry", "none", "--state-dir", str(tmp_path / "state"),
         "--decisions", str(tmp_path / "d.jsonl"), "--window", "5"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = trace.read_text().splitlines()
    assert any("openat(" in ln for ln in lines)  # the trace saw the process at all
    inet = [ln for ln in lines if INET.search(ln)]
    assert not inet, "network connection attempts:\n" + "\n".join(inet[:10])
    written = [p for p in home.rglob("*")]
    assert not written, f"written under HOME: {written[:10]}"
    writes_home = [ln for ln in lines if str(home) in ln and re.search(
        r"O_(WRONLY|RDWR|CREAT)|mkdir\(", ln)]
    assert not writes_home, "\n".join(writes_home[:10])
