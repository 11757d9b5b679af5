"""File sources in every format, rates and channel counts; resampling; clear errors."""

from __future__ import annotations

import time

import numpy as np
import pytest
import soundfile as sf

from agent.audio.resample import Resampler, to_mono
from agent.audio.sources import FileSource, open_source
from agent.errors import AgentError


def tone(freq: float, rate: int, seconds: float = 1.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    x = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def dominant_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spec.argmax()])


def read_all(src: FileSource) -> tuple[np.ndarray, list]:
    blocks = list(src)
    return np.concatenate([b.samples for b in blocks]), blocks


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_16"),
                                         ("OGG", "VORBIS"), ("WAV", "FLOAT")])
def test_file_formats_are_read_whole(tmp_path, fmt, subtype):
    x = tone(440, 16000, 1.5)
    path = tmp_path / f"a.{fmt.lower()}"
    sf.write(str(path), x, 16000, format=fmt, subtype=subtype)
    got, blocks = read_all(FileSource(path))
    assert blocks[0].rate == 16000
    assert got.shape == (len(x), 1)
    if fmt != "OGG":  # lossless formats come back (near) exactly
        np.testing.assert_allclose(got[:, 0], x, atol=1e-4)
    assert abs(dominant_hz(got[:, 0], 16000) - 440) < 2


@pytest.mark.parametrize("rate", [16000, 44100, 48000])
def test_resampling_to_8k_keeps_pitch_and_length(rate):
    x = tone(1000, rate, 2.0)
    r = Resampler(rate, 8000)
    # block by block, like a stream: same result as one call
    y = np.concatenate([r.process(x[i:i + 1234]) for i in range(0, len(x), 1234)] + [r.flush()])
    assert abs(len(y) - 16000) <= 2
    assert abs(dominant_hz(y, 8000) - 1000) < 2


@pytest.mark.parametrize("rate", [16000, 44100, 48000])
def test_resampling_is_anti_aliased(rate):
    """A 6 kHz tone has no place at 8 kHz: naive decimation would fold it to 2 kHz."""
    x = tone(6000, rate, 1.0)
    r = Resampler(rate, 8000)
    y = np.concatenate([r.process(x), r.flush()])
    assert np.sqrt(np.mean(y[400:-400] ** 2)) < 0.005  # > 40 dB down from 0.35 RMS
    naive = x[:: rate // 8000] if rate % 8000 == 0 else None
    if naive is not None:
        assert np.sqrt(np.mean(naive ** 2)) > 0.3  # what the naive way would have let through


def test_stereo_is_down_mixed():
    left, right = tone(500, 8000), tone(500, 8000) * 0.0
    mono = to_mono(np.stack([left, right], axis=1))
    np.testing.assert_allclose(mono, left / 2, atol=1e-6)
    assert to_mono(left).dtype == np.float32


def test_stereo_file_at_48k_goes_through_the_pipeline_conditioning(tmp_path):
    path = tmp_path / "s.wav"
    sf.write(str(path), tone(800, 48000, 1.0, channels=2), 48000)
    src = FileSource(path)
    assert (src.rate, src.channels) == (48000, 2)
    got, _ = read_all(src)
    r = Resampler(48000, 8000)
    y = np.concatenate([r.process(to_mono(got)), r.flush()])
    assert abs(dominant_hz(y, 8000) - 800) < 2


def test_missing_and_bad_files_give_one_line_errors(tmp_path):
    with pytest.raises(AgentError, match="does not exist") as e:
        FileSource(tmp_path / "nope.wav")
    assert "\n" not in str(e.value)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    with pytest.raises(AgentError, match="cannot be read") as e:
        FileSource(bad)
    assert "\n" not in str(e.value) and str(bad) in str(e.value)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(AgentError, match="WAV, FLAC or OGG"):
        FileSource(text)


def test_speed_paces_a_file_like_a_live_source(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(str(path), tone(300, 8000, 1.0), 8000)
    t0 = time.monotonic()
    read_all(FileSource(path, block_ms=100, speed=5.0))  # 1 s of audio at 5x: >= 0.18 s
    assert time.monotonic() - t0 >= 0.17
    t0 = time.monotonic()
    n, _ = read_all(FileSource(path))
    assert len(n) == 8000


def test_speed_is_refused_for_the_microphone():
    with pytest.raises(AgentError, match="file sources only"):
        open_source("mic", speed=1.0)


def test_rescanning_portaudio_keeps_sounddevice_usable_and_its_exit_clean():
    """rescan_devices() re-initialises PortAudio through its C API on sounddevice's library: the
    device list is read again afterwards, and sounddevice's own count of initialisations still
    matches PortAudio's at exit (a mismatch prints an error from its atexit handler)."""
    import subprocess
    import sys

    code = ("import sounddevice as sd\n"
            "from agent.audio.sources import rescan_devices\n"
            "before = len(sd.query_devices())\n"
            "rescan_devices(); rescan_devices()\n"
            "assert len(sd.query_devices()) == before\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr
    assert "Error" not in r.stderr and "Traceback" not in r.stderr, r.stderr
