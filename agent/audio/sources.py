"""Audio sources: the I/O edge that turns a microphone or a file into blocks of samples.

Sources only read; they never resample or segment. A block carries its own rate and the
number of frames the source knows it lost before it (microphone overflow), so the rest of the
pipeline can count losses without knowing which device produced them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from threading import Event

import numpy as np

from agent.errors import AgentError, one_line


@dataclass(frozen=True)
class AudioBlock:
    """(n, channels) float32 samples in [-1, 1] at `rate`; `dropped` frames were lost before it."""

    samples: np.ndarray
    rate: int
    dropped: int = 0


def check_audio_file(path: Path, alternative: str = "") -> None:
    """A missing path or a directory named as one: say which, before libsndfile says
    "System error"."""
    hint = f"give the path of a WAV, FLAC or OGG file{', ' + alternative if alternative else ''}"
    if path.is_dir():
        raise AgentError(f"audio file {path} is a directory, not a file; {hint}")
    if not path.exists():
        raise AgentError(f"audio file {path} does not exist; {hint}")


class FileSource:
    """Reads WAV, FLAC or OGG (anything libsndfile reads) at its own rate and channel count.

    With `speed` > 0 blocks are released at `speed` times real time, so `speed=1` behaves like a
    live microphone; with 0 the file is read as fast as the pipeline consumes it.
    """

    live = False

    def __init__(self, path: str | Path, block_ms: int = 100, speed: float = 0.0,
                 stop: Event | None = None) -> None:
        import soundfile as sf

        self.path = Path(path)
        self.speed = speed
        self._stop = stop or Event()
        check_audio_file(self.path, "or 'mic' for the microphone")
        try:
            self._file = sf.SoundFile(str(self.path))
        except (sf.LibsndfileError, RuntimeError, TypeError) as e:
            raise AgentError(f"audio file {self.path} cannot be read ({one_line(e)}); "
                             "give a WAV, FLAC or OGG file") from None
        self.rate = int(self._file.samplerate)
        self.channels = int(self._file.channels)
        if self.rate < 4000:
            raise AgentError(f"audio file {self.path} has a sample rate of {self.rate} Hz; "
                             "at least 4000 Hz is needed")
        # Unpaced reading uses large blocks: fewer Python round trips, same samples out.
        ms = block_ms if speed > 0 else max(block_ms, 2000)
        self.block_frames = max(1, self.rate * ms // 1000)

    def __iter__(self) -> Iterator[AudioBlock]:
        import soundfile as sf

        start = time.monotonic()
        done = 0
        try:
            while not self._stop.is_set():
                try:
                    data = self._file.read(self.block_frames, dtype="float32", always_2d=True)
                except (sf.LibsndfileError, RuntimeError) as e:
                    raise AgentError(f"audio file {self.path} is corrupt after "
                                     f"{done / self.rate:.2f} s ({one_line(e)}); re-record or "
                                     "re-encode it") from None
                if len(data) == 0:
                    return
                if self.speed > 0:
                    due = start + done / self.rate / self.speed
                    delay = due - time.monotonic()
                    if delay > 0 and self._stop.wait(delay):
                        return
                done += len(data)
                yield AudioBlock(data, self.rate)
        finally:
            self.close()

    def close(self) -> None:
        """Release the file (iterating to the end does it too)."""
        self._file.close()

    def describe(self) -> str:
        return f"file {self.path} ({self.rate} Hz, {self.channels} ch)"


class MicSource:
    """A capture device read with blocking reads (callbacks need W+X memory, which systemd's
    MemoryDenyWriteExecute forbids). Overflows are counted as dropped frames, never hidden."""

    live = True

    def __init__(self, device: str | int | None = None, rate: int = 0, channels: int = 0,
                 block_ms: int = 100, stop: Event | None = None) -> None:
        sd = _sounddevice()
        from agent.audio.cstderr import CAPTURE

        CAPTURE.start()  # PortAudio's C-level lines become log lines, folded into the loss report
        self._stop = stop or Event()
        self.device_index = find_input_device(device)
        info = sd.query_devices(self.device_index)
        self.device_name = str(info["name"])
        self.rate = int(rate or info["default_samplerate"])
        self.channels = int(channels or min(int(info["max_input_channels"]), 2))
        self.block_frames = max(1, self.rate * block_ms // 1000)
        self.overflows = 0
        try:
            self._stream = sd.InputStream(device=self.device_index, samplerate=self.rate,
                                          channels=self.channels, dtype="float32",
                                          blocksize=self.block_frames)
        except (sd.PortAudioError, ValueError) as e:
            raise AgentError(f"microphone '{self.device_name}' cannot be opened at {self.rate} Hz, "
                             f"{self.channels} ch ({one_line(e)}{_library_said()}); check the "
                             "device is free or set audio.mic_rate / audio.mic_channels") from None

    def __iter__(self) -> Iterator[AudioBlock]:
        sd = _sounddevice()
        try:
            try:
                self._stream.start()
            except sd.PortAudioError as e:
                raise AgentError(f"microphone '{self.device_name}' cannot be started "
                                 f"({one_line(e)}{_library_said()}); is it still "
                                 "connected?") from None
            while not self._stop.is_set():
                try:
                    data, overflowed = self._stream.read(self.block_frames)
                except sd.PortAudioError as e:
                    raise AgentError(f"microphone '{self.device_name}' failed while reading "
                                     f"({one_line(e)}{_library_said()}); is it still "
                                     "connected?") from None
                dropped = 0
                if overflowed:
                    # PortAudio says input was lost but not how much: count one block, the
                    # smallest loss consistent with the flag.
                    self.overflows += 1
                    dropped = self.block_frames
                yield AudioBlock(np.array(data, dtype=np.float32), self.rate, dropped)
        finally:
            self._stream.close()

    def describe(self) -> str:
        return f"microphone '{self.device_name}' ({self.rate} Hz, {self.channels} ch)"


class DeviceNotFound(AgentError):
    """No input device matches what was asked for (exit 2: the request names nothing here)."""

    exit_code = 2


def waits_for_devices(env: dict[str, str] | None = None) -> bool:
    """Whether a missing microphone is waited for rather than refused.

    Under systemd (which sets INVOCATION_ID for every unit it runs, and NOTIFY_SOCKET for
    Type=notify) waiting is right: USB audio enumerates late at boot and devices come and go.
    Started from a terminal, a name that matches nothing is far more likely a typo, and a
    person expects one line listing the devices and exit 2, not a silent wait."""
    e = os.environ if env is None else env
    return bool(e.get("INVOCATION_ID") or e.get("NOTIFY_SOCKET"))


def _library_said() -> str:
    """What PortAudio/ALSA just wrote to fd 2 (see agent.audio.cstderr), for the one line."""
    from agent.audio.cstderr import CAPTURE, fold

    said = CAPTURE.claim() if CAPTURE.active else []
    return f"; PortAudio: {fold(said)}" if said else ""


def _sounddevice():
    try:
        import sounddevice as sd
    except OSError as e:
        raise AgentError(f"sounddevice cannot load PortAudio ({one_line(e)}); install the "
                         "system package libportaudio2") from None
    return sd


_ALSA_SUFFIX = re.compile(r"\s*\((?:plug)?hw:\d+(?:,\d+)?\)\s*$")


def stable_device_name(name: str) -> str:
    """The device name without ALSA's "(hw:CARD,DEV)" suffix.

    The card number changes when a USB microphone is unplugged and plugged back (or another card
    appears first), so the suffix-free name, not the index, is what finds the same device again.
    """
    return _ALSA_SUFFIX.sub("", name).strip() or name


def rescan_devices() -> None:
    """Make PortAudio list devices afresh: it enumerates them once, when initialised, so a
    re-plugged microphone stays invisible until it is re-initialised. Call with no stream open.

    sounddevice has no public call for this, so PortAudio's own API does it: Pa_Terminate(),
    then Pa_Initialize(), on the library sounddevice loaded (dlopen() of the same name returns
    the same instance). PortAudio counts initialisations, so one of each leaves sounddevice's
    own count as it was. As sounddevice's initialisation does, what ALSA prints while it
    enumerates goes to /dev/null, not into the journal or the next "PortAudio:" line."""
    sd = _sounddevice()
    lib = _portaudio()
    err = lib.Pa_Terminate()
    if not err:
        with _fd2_to_devnull():
            err = lib.Pa_Initialize()
    if err:
        raise sd.PortAudioError("Error re-initializing PortAudio: "
                                f"{lib.Pa_GetErrorText(err).decode(errors='replace')}", err)


def _portaudio() -> ctypes.CDLL:
    """The PortAudio library sounddevice uses (it loads `find_library("portaudio")`)."""
    name = ctypes.util.find_library("portaudio")
    if name is None:
        raise AgentError("the PortAudio library cannot be found to rescan the microphones; "
                         "install the system package libportaudio2")
    lib = ctypes.CDLL(name)
    lib.Pa_GetErrorText.restype = ctypes.c_char_p
    return lib


@contextlib.contextmanager
def _fd2_to_devnull() -> Iterator[None]:
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class MicOpener:
    """Opens the configured microphone; after a loss, finds the same device again by name.

    The first open resolves `device` (None, an index or a name); later opens rescan PortAudio and
    look the device up by its stable name (see `stable_device_name`), at the rate it first had,
    so a microphone that comes back under another index is still the one resumed.
    """

    live = True

    def __init__(self, device: str | int | None = None, rate: int = 0, channels: int = 0,
                 block_ms: int = 100, stop: Event | None = None) -> None:
        _sounddevice()  # no PortAudio library is permanent: fail at start, do not retry it
        self.wanted = device
        self.rate, self.channels, self.block_ms, self.stop = rate, channels, block_ms, stop
        self.name: str | None = None
        self.opens = 0

    def __call__(self) -> MicSource:
        if self.opens:
            rescan_devices()
        self.opens += 1
        src = MicSource(self.wanted if self.name is None else self.name, self.rate,
                        self.channels, self.block_ms, self.stop)
        if self.name is None:
            self.name = stable_device_name(src.device_name)
            self.rate, self.channels = src.rate, src.channels
        return src

    def describe(self) -> str:
        return f"microphone '{self.name or self.wanted or 'default'}'"


def input_devices() -> list[tuple[int, str]]:
    sd = _sounddevice()
    return [(i, str(d["name"])) for i, d in enumerate(sd.query_devices())
            if d["max_input_channels"] > 0]


def find_input_device(device: str | int | None) -> int:
    """Index of the input device named (case-insensitive substring) or numbered; None → default."""
    sd = _sounddevice()
    devices = input_devices()
    listing = "; ".join(f"{i}: {n}" for i, n in devices) or "none"
    if not devices:
        raise DeviceNotFound("no audio input device found; connect a microphone or pass "
                             "--source with an audio file")
    if device is None or device == "":
        default = sd.default.device[0]
        if default is None or default < 0 or default not in dict(devices):
            return devices[0][0]
        return int(default)
    if isinstance(device, int) or str(device).isdigit():
        idx = int(device)
        if idx in dict(devices):
            return idx
        raise DeviceNotFound(f"microphone index {idx} is not an input device; available: "
                             f"{listing}")
    exact = [i for i, n in devices if stable_device_name(n).lower() == str(device).lower()]
    matches = exact or [i for i, n in devices if str(device).lower() in n.lower()]
    if not matches:
        raise DeviceNotFound(f"no input device matches '{device}'; available: {listing}")
    return matches[0]


def open_source(spec: str, block_ms: int = 100, speed: float = 0.0, mic_rate: int = 0,
                mic_channels: int = 0, stop: Event | None = None) -> FileSource | MicSource:
    """`mic`, `mic:NAME_OR_INDEX` or a file path → an opened source."""
    if spec == "mic" or spec.startswith("mic:"):
        if speed:
            raise AgentError("--speed applies to file sources only; remove it for the microphone")
        device = spec[4:] or None
        return MicSource(device, mic_rate, mic_channels, block_ms, stop)
    return FileSource(spec, block_ms, speed, stop)

