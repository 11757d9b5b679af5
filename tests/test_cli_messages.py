"""Messages a person reads: each mistake a new user makes answered in one line by the CLI,
as a separate process, with the exit code a shell script can rely on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.audio.sources import waits_for_devices
from agent.resources import demo_audio
from tests.conftest import ROOT, eva


def terminal_env() -> dict[str, str]:
    """The environment of a shell: not started by systemd, whatever runs these tests."""
    return {k: v for k, v in os.environ.items() if k not in ("INVOCATION_ID", "NOTIFY_SOCKET")}


def error_line(r: subprocess.CompletedProcess) -> str:
    lines = [x for x in r.stderr.splitlines() if "error" in x.lower()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_demo_into_a_pipe_reader_that_stops_early_ends_quietly() -> None:
    """`demo | head -1`: the reader closes the pipe after one line; the agent stops with exit
    0 and no traceback (it used to die of BrokenPipeError)."""
    p = subprocess.Popen([sys.executable, "-m", "agent", "demo"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stderr is not None
    first = p.stdout.readline()
    p.stdout.close()  # what `head -1` does after its line
    rc = p.wait(timeout=60)
    err = p.stderr.read()
    assert json.loads(first)["model"]
    assert rc == 0, err
    assert "Traceback" not in err and "Error" not in err, err


def test_classify_into_a_closed_pipe_ends_quietly() -> None:
    demo = str(demo_audio())
    p = subprocess.Popen([sys.executable, "-m", "agent", "classify", *[demo] * 40], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.readline()
    p.stdout.close()
    rc = p.wait(timeout=60)
    err = p.stderr.read()
    assert rc == 0 and "Traceback" not in err, err


def test_source_that_is_a_directory_says_so(tmp_path: Path) -> None:
    r = eva("run", "--source", str(tmp_path), "--state-dir", str(tmp_path / "s"))
    assert r.returncode == 1
    assert f"audio file {tmp_path} is a directory, not a file" in error_line(r)


def test_classify_on_a_missing_file_says_it_does_not_exist(tmp_path: Path) -> None:
    r = eva("classify", str(tmp_path / "nope.wav"))
    assert r.returncode == 1
    line = error_line(r)
    assert "nope.wav does not exist" in line and "System error" not in line


@pytest.mark.parametrize("cmd,flag", [
    (["demo"], ["--source", "x.wav"]),
    (["demo"], ["--audio-mic-rate", "16000"]),
    (["classify", "a.wav"], ["--window", "10"]),
    (["classify", "a.wav"], ["--telemetry", "stdout"]),
    (["classify", "a.wav"], ["--source", "x.wav"]),
])
def test_demo_and_classify_refuse_run_flags_that_do_not_apply(cmd, flag) -> None:
    r = eva(*cmd, *flag)
    assert r.returncode == 2
    assert f"{cmd[0]}: error: unrecognized arguments: {flag[0]}" in r.stderr
    assert r.stderr.startswith(f"usage: edge-voice-agent {cmd[0]}"), r.stderr


def test_unknown_flag_prints_the_subcommands_usage() -> None:
    r = eva("run", "--no-such-flag")
    assert r.returncode == 2
    assert r.stderr.startswith("usage: edge-voice-agent run ")
    assert "--source" in r.stderr  # the run usage, which lists what is allowed
    assert "edge-voice-agent run: error: unrecognized arguments: --no-such-flag" in r.stderr


def test_mode_help_lists_its_choices() -> None:
    r = eva("run", "--help")
    assert "--mode {off,shadow,assist,partial,full}" in r.stdout
    assert "--vad-frame-ms {10,20,30}" in r.stdout


def test_config_type_errors_are_one_line_naming_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[monitoring]\nwindow_s = "60"\n')
    r = eva("run", "--config", str(cfg), "--source", str(demo_audio()))
    assert r.returncode == 2
    assert f'{cfg}: monitoring.window_s = "60" is a string' in error_line(r)
    cfg.write_text('[telemetry]\nsink = "mqtt:// 127.0.0.1:1883"\n')
    r = eva("run", "--config", str(cfg), "--source", str(demo_audio()))
    assert r.returncode == 2
    assert f"{cfg}: telemetry.sink" in error_line(r) and "contains a space" in r.stderr


def test_only_systemd_waits_for_a_missing_microphone() -> None:
    assert not waits_for_devices({})
    assert waits_for_devices({"INVOCATION_ID": "0123abcd"})
    assert waits_for_devices({"NOTIFY_SOCKET": "/run/systemd/notify"})


def test_missing_microphone_from_a_terminal_lists_devices_and_exits_2(tmp_path: Path) -> None:
    r = eva("run", "--source", "mic:No Such Microphone", "--state-dir", str(tmp_path),
            env=terminal_env(), timeout=30)
    if "PortAudio" in r.stderr and "libportaudio2" in r.stderr:
        pytest.skip("PortAudio library not installed (apt-get install libportaudio2)")
    assert r.returncode == 2, r.stderr
    line = error_line(r)
    assert "No Such Microphone" in line or "no audio input device found" in line
    assert "available:" in line or "no audio input device found" in line


def test_missing_microphone_under_systemd_is_awaited(tmp_path: Path) -> None:
    env = {**terminal_env(), "INVOCATION_ID": "0123456789abcdef"}
    p = subprocess.Popen([sys.executable, "-m", "agent", "run", "--source",
                          "mic:No Such Microphone", "--state-dir", str(tmp_path)],
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    assert p.stderr is not None
    try:
        deadline = time.monotonic() + 30
        seen = ""
        while "retrying" not in seen and time.monotonic() < deadline:
            line = p.stderr.readline()
            if not line:
                break
            seen += line
        if "libportaudio2" in seen:
            pytest.skip("PortAudio library not installed (apt-get install libportaudio2)")
        assert "retrying" in seen, seen  # waiting for the device, not exiting
        assert p.poll() is None
    finally:
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=15)
    assert rc == 0
