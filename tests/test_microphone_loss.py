"""Microphone loss through the real PortAudio → ALSA → PulseAudio path: what PortAudio prints
at C level is folded into the agent's one log line instead of reaching the journal raw."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from agent.audio.cstderr import fold, shorten
from tests import test_microphone
from tests.conftest import ROOT

pulse_proc = test_microphone.pulse_proc  # the one virtual-microphone fixture

def test_portaudio_shortening_and_folding() -> None:
    raw = ("Expression 'alsa_snd_pcm_poll_descriptors_revents( self->pcm, pfds, self->nfds, "
           "&revents )' failed in 'src/hostapi/alsa/pa_linux_alsa.c', line: 3665")
    assert shorten(raw) == "alsa_snd_pcm_poll_descriptors_revents failed (pa_linux_alsa.c:3665)"
    assert shorten("ALSA lib pcm.c:8675: underrun\n") == "ALSA lib pcm.c:8675: underrun"
    assert fold(["a", "b", "a"]) == "a (x2) | b"


def test_microphone_loss_is_one_line_with_portaudios_own_words(pulse_proc, tmp_path) -> None:
    env, pa = pulse_proc
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--source", "mic:pulse", "--audio-mic-rate",
         "16000", "--state-dir", str(tmp_path / "state"), "--decisions", os.devnull,
         "--telemetry", f"file:{tmp_path / 'telemetry.jsonl'}", "--window", "1"],
        env={k: v for k, v in env.items() if k not in ("INVOCATION_ID", "NOTIFY_SOCKET")},
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    lost = threading.Event()
    listening = threading.Event()

    def read() -> None:
        assert agent.stderr is not None
        for line in agent.stderr:
            lines.append(line.rstrip("\n"))
            if "listening to" in line:
                listening.set()
            if " lost (" in line:
                lost.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert listening.wait(30), lines
        stats = tmp_path / "telemetry.jsonl"
        deadline = time.monotonic() + 15  # a first 1 s window: audio is flowing from the device
        while "/stats" not in (stats.read_text() if stats.exists() else ""):
            assert time.monotonic() < deadline, lines
            time.sleep(0.05)
        pa.kill()  # the sound server dies under the open stream: PortAudio's read fails
        assert lost.wait(15), lines
        time.sleep(1.5)  # past the hold time: anything left unclaimed would be logged now
    finally:
        agent.send_signal(signal.SIGTERM)
        rc = agent.wait(timeout=15)
        reader.join(5)
    assert rc == 0, lines
    (loss,) = [x for x in lines if " lost (" in x]
    assert "WARNING" in loss and "PortAudio: " in loss and " failed (pa_linux_alsa.c:" in loss
    raw = [x for x in lines if x.startswith("Expression '") or "src/hostapi" in x]
    assert raw == [], raw  # nothing reached stderr outside the agent's own log lines
