"""The real microphone path: a PulseAudio null sink as a virtual microphone.

A WAV is played into the sink with `paplay`; the agent captures the sink's monitor through
PortAudio → ALSA → PulseAudio with blocking reads, exactly as on a device, and must decide the
same digits as when it reads the file directly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from agent.resources import demo_audio, demo_truth
from tests.conftest import ROOT

PA_CONFIG = """load-module module-native-protocol-unix auth-anonymous=1
load-module module-null-sink sink_name=vsink rate=16000 channels=1
set-default-sink vsink
set-default-source vsink.monitor
"""


@pytest.fixture()
def pulse_proc(tmp_path: Path) -> Iterator[tuple[dict[str, str], subprocess.Popen]]:
    """A PulseAudio null sink as the virtual microphone, and its process (to kill it)."""
    for tool in ("pulseaudio", "paplay"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt pulseaudio pulseaudio-utils "
                        "libasound2-plugins): no virtual microphone on this machine")
    run = tmp_path / "xdg"
    run.mkdir(mode=0o700)
    (tmp_path / "pa.conf").write_text(PA_CONFIG)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(run), "HOME": str(tmp_path)}
    err = tmp_path / "pulseaudio.err"
    with err.open("wb") as err_file:
        proc = subprocess.Popen(["pulseaudio", "-n", "-F", str(tmp_path / "pa.conf"),
                                 "--daemonize=no", "--exit-idle-time=-1", "--use-pid-file=no",
                                 "--disallow-exit"], env=env, stdout=subprocess.DEVNULL,
                                stderr=err_file)
    deadline = time.monotonic() + 10
    while not (run / "pulse" / "native").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.skip("pulseaudio could not start here: "
                        f"{err.read_bytes().decode(errors='replace')[-200:]}")
        time.sleep(0.02)  # waiting for a socket file to appear; no event to await
    yield env, proc
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture()
def pulse(pulse_proc: tuple[dict[str, str], subprocess.Popen]) -> dict[str, str]:
    return pulse_proc[0]


def wait_for_line(stream, needle: str, timeout: float) -> str | None:
    found: list[str] = []
    done = threading.Event()

    def reader():
        for line in stream:
            found.append(line)
            if needle in line:
                done.set()
                return

    threading.Thread(target=reader, daemon=True).start()
    done.wait(timeout)
    return next((x for x in found if needle in x), None)


def test_agent_hears_digits_played_into_a_virtual_microphone(pulse, tmp_path):
    x, sr = sf.read(str(demo_audio()), dtype="float32")
    truth = json.loads(demo_truth().read_text())["utterances"][:3]
    clip = x[: int((truth[-1]["end"] + 0.6) * sr)]
    wav = tmp_path / "clip.wav"
    sf.write(str(wav), np.concatenate([np.zeros(sr // 2, np.float32), clip,
                                       np.zeros(sr // 2, np.float32)]), sr, subtype="PCM_16")
    expected = [json.loads(line)["label"] for line in subprocess.run(
        [sys.executable, "-m", "agent", "run", "--source", str(wav), "--decisions", "-",
         "--decision-mode", "full"], capture_output=True, text=True, timeout=60, cwd=ROOT,
        check=True).stdout.splitlines()]
    assert len(expected) == 3

    out = tmp_path / "mic.jsonl"
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--source", "mic:pulse", "--audio-mic-rate",
         "16000", "--decisions", str(out), "--decision-mode", "full", "--state-dir",
         str(tmp_path / "state")], env=pulse, cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        line = wait_for_line(agent.stderr, "listening to", timeout=30)
        if line is None:
            pytest.fail(f"agent did not start listening; exit {agent.poll()}")
        assert "microphone 'pulse'" in line and "16000 Hz" in line
        subprocess.run(["paplay", "--device=vsink", str(wav)], env=pulse, check=True, timeout=60)
        deadline = time.monotonic() + 10
        while (not out.exists() or len(out.read_text().splitlines()) < 3) and \
                time.monotonic() < deadline:
            time.sleep(0.05)  # the agent decides 240 ms after each word ends
    finally:
        agent.send_signal(signal.SIGTERM)
        rc = agent.wait(timeout=10)
    assert rc == 0
    heard = [json.loads(x)["label"] for x in out.read_text().splitlines()]
    # Capture may add a stray start-up click; the played digits must all be there, in order.
    it = iter(heard)
    assert all(any(h == e for h in it) for e in expected), (heard, expected)
    assert len(heard) <= len(expected) + 1
