"""Voice activity segmenter: a stream of samples in, whole utterances out.

Designed for short commands (spoken digits last 0.2-0.8 s). The classic recipe (300 ms ring,
90 % of it voiced to trigger) needs most of a short word to be voiced before it starts, so it
misses or clips them. Here a frame is speech when webrtcvad says so *and* it stands
`energy_gate_db` above a tracked noise floor (webrtcvad alone fires on steady noise); an
utterance starts after `trigger_frames` speech frames within `trigger_window`, keeps
`preroll_ms` of audio before that point, ends after `hangover_ms` of non-speech (so the
closure inside "six" or "eight" does not split a word), and is force-cut at `max_utterance_ms`.
An utterance ended by silence is held until `quiet_after_ms` of quiet follow its last speech, or
released as `speech_after` when the next utterance starts sooner: a command is said on its own,
a piece of a sentence is followed by more speech (see agent/recognition/decision.py, `Addressing`).

Time is the sample counter of the stream pushed in (one clock): every position in an
`Utterance` is a sample index, so a replayed file gives identical results in any block size.

Speculation: `speculate_after` frames into the hangover the utterance's audio is already final
if the silence lasts (it ends one frame after the last speech frame), so the segmenter hands
that candidate to `speculate` (the pipeline runs the front end on it while the hangover runs
out). When the utterance is released with the same span the work is reused; when speech
resumes it is thrown away.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import webrtcvad

from agent.config import VadConfig
from agent.errors import ConfigError

VAD_RATES = (8000, 16000, 32000, 48000)


@dataclass(frozen=True)
class Utterance:
    """One segment of speech. Sample indices are on the pipeline clock (samples since start)."""

    start: int            # first speech frame
    end: int              # just after the last speech frame
    audio_start: int      # index of audio[0]: start minus the pre-roll actually available
    audio: np.ndarray     # float32 mono, pre-roll through one frame after `end`
    rate: int
    speech_frames: int
    forced_cut: bool      # True when max_utterance_ms cut it, not silence
    emitted_at: int       # clock position at which the segmenter released it
    # samples of quiet between the previous segment's last speech (released or discarded as
    # too short) and `start`; None when nothing was heard before (stream start, after a hole)
    quiet_before: int | None = None
    speech_after: bool = False   # the next utterance started within quiet_after_ms

    @property
    def length_s(self) -> float:
        """Speech span in seconds (first to last speech frame)."""
        return (self.end - self.start) / self.rate


@dataclass
class VadBlockStats:
    """Per-frame measurements of one pushed block, for input and VAD-stage metrics."""

    frame_db: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    speech: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    noise_floor_db: float = float("nan")
    start: int = 0          # clock position (samples) of the first frame
    frame: int = 1          # samples per frame

    @property
    def end(self) -> int:
        """Clock position just after the last frame."""
        return self.start + len(self.frame_db) * self.frame

    def slice(self, i: int, j: int) -> VadBlockStats:
        """Frames i..j-1, so observers can see frames and utterances in time order."""
        return VadBlockStats(self.frame_db[i:j], self.speech[i:j], self.noise_floor_db,
                             self.start + i * self.frame, self.frame)


class Segmenter:
    """Stateful, pure (no I/O) VAD state machine. `push` samples, get finished utterances."""

    # Noise floor tracker: falls fast, rises slowly (minimum-statistics flavour), in dB.
    FLOOR_DOWN = 0.3
    FLOOR_UP = 0.02
    SILENCE_DB = -100.0

    def __init__(self, cfg: VadConfig, rate: int,
                 speculate: Callable[[Utterance], None] | None = None,
                 speculate_after: int = 3) -> None:
        if rate not in VAD_RATES:
            raise ConfigError(f"VAD rate {rate} Hz is not supported; allowed: "
                              f"{', '.join(map(str, VAD_RATES))} (set by the model's manifest)")
        self.cfg = cfg
        self.rate = rate
        self.frame = rate * cfg.frame_ms // 1000
        self._vad = webrtcvad.Vad(cfg.aggressiveness)
        self._hang_frames = max(1, -(-cfg.hangover_ms // cfg.frame_ms))
        self._max_frames = max(1, cfg.max_utterance_ms // cfg.frame_ms)
        self._min_speech = -(-cfg.min_speech_ms // cfg.frame_ms)
        self._pre_frames = cfg.preroll_ms // cfg.frame_ms + cfg.trigger_window
        self._pending = np.zeros(0, np.float32)
        self._clock = 0                       # samples consumed into whole frames
        self._recent: deque[bool] = deque(maxlen=cfg.trigger_window)
        self._history: deque[np.ndarray] = deque(maxlen=self._pre_frames)
        self._active: list[np.ndarray] | None = None
        self._active_first = 0                # clock of the first frame in _active
        self._start = 0
        self._last_speech_end = 0
        self._speech_count = 0
        self._silence_run = 0
        self._prev_speech_end: int | None = None  # last speech of the previous segment
        self._quiet_after = rate * cfg.quiet_after_ms // 1000
        self._held: Utterance | None = None      # ended by silence, waiting for quiet after
        self.speculate = speculate
        self.speculate_after = max(1, speculate_after)
        self.noise_floor_db: float | None = None
        self.frames = 0
        self.speech_frames = 0
        self.discarded_short = 0

    @property
    def clock(self) -> int:
        return self._clock + len(self._pending)

    @property
    def busy(self) -> bool:
        """An utterance is in progress or held: it has started and is not released yet."""
        return self._active is not None or self._held is not None

    def push(self, samples: np.ndarray) -> tuple[list[Utterance], VadBlockStats]:
        """Consume mono float32 samples; return utterances finished inside them, and stats."""
        buf = np.concatenate([self._pending, samples]) if len(self._pending) else samples
        n = len(buf) // self.frame
        self._pending = buf[n * self.frame:].astype(np.float32, copy=True)
        first = self._clock
        if n == 0:
            return [], VadBlockStats(noise_floor_db=self._floor(), start=first, frame=self.frame)
        frames = np.asarray(buf[: n * self.frame], np.float32).reshape(n, self.frame)
        power = np.einsum("ij,ij->i", frames, frames) / self.frame
        frame_db = (10.0 * np.log10(np.maximum(power, 1e-10))).astype(np.float32)
        pcm = (np.clip(frames, -1.0, 32767 / 32768) * 32768).astype("<i2").tobytes()
        nbytes = self.frame * 2
        speech = np.zeros(n, bool)
        out: list[Utterance] = []
        vad = self._vad.is_speech
        gate = self.cfg.energy_gate_db
        for i in range(n):
            db = float(frame_db[i])
            voiced = vad(pcm[i * nbytes:(i + 1) * nbytes], self.rate)
            floor = self.noise_floor_db
            if floor is None:
                floor = self.noise_floor_db = db
            is_speech = voiced and db >= floor + gate
            if not voiced:
                a = self.FLOOR_DOWN if db < floor else self.FLOOR_UP
                self.noise_floor_db = floor + a * (db - floor)
            speech[i] = is_speech
            u = self._step(frames[i], is_speech)
            if u is not None:
                out.append(u)
        self.frames += n
        self.speech_frames += int(speech.sum())
        return out, VadBlockStats(frame_db, speech, self._floor(), first, self.frame)

    def flush(self) -> list[Utterance]:
        """End of stream: release the held utterance and close the one in progress (as if
        silence followed)."""
        out = []
        if self._held is not None:  # nothing can follow now: released as of when it closed
            out.append(replace(self._held, speech_after=False))
            self._held = None
        if self._active is None:
            return out
        u = self._close(forced=False)
        return out + [self._release(False, u)] if u is not None else out

    def skip(self, n: int) -> list[Utterance]:
        """A hole of `n` samples in the input (the device was away): close the utterance in
        progress as `flush` does, forget the pre-roll, trigger window and partial frame (that
        audio is not continuous with what follows), and move the clock on by `n` so positions
        after the hole stay aligned with the time the stream covers. The noise floor is kept."""
        out = self.flush()
        self._clock = self.clock + max(0, int(n))
        self._pending = np.zeros(0, np.float32)
        self._recent.clear()
        self._history.clear()
        self._prev_speech_end = None  # what came before the hole is unknown
        return out

    def _floor(self) -> float:
        return float("nan") if self.noise_floor_db is None else float(self.noise_floor_db)

    def _release(self, speech_after: bool, u: Utterance | None = None) -> Utterance:
        """The held utterance (or `u`), released now."""
        u = u if u is not None else self._held
        assert u is not None
        if u is self._held:
            self._held = None
        return replace(u, emitted_at=self._clock, speech_after=speech_after)

    def _step(self, frame: np.ndarray, is_speech: bool) -> Utterance | None:
        t = self._clock
        self._clock += self.frame
        self._recent.append(is_speech)
        if self._active is None:
            self._history.append(frame)
            held = None
            if self._held is not None and self._clock - self._held.end >= self._quiet_after:
                held = self._release(False)
            if is_speech and sum(self._recent) >= self.cfg.trigger_frames:
                if self._held is not None:  # the next utterance starts: running speech
                    held = self._release(True)
                # The utterance starts at the first speech frame of the trigger window.
                k = len(self._recent)
                first = next(j for j, s in enumerate(self._recent) if s)
                self._start = t - (k - 1 - first) * self.frame
                self._active = list(self._history)
                self._active_first = t - (len(self._history) - 1) * self.frame
                self._speech_count = sum(self._recent)
                self._last_speech_end = t + self.frame
                self._silence_run = 0
                self._history.clear()
            return held
        self._active.append(frame)
        if is_speech:
            self._speech_count += 1
            self._last_speech_end = t + self.frame
            self._silence_run = 0
        else:
            self._silence_run += 1
        if (self._clock - self._start) // self.frame >= self._max_frames:
            return self._close(forced=True)
        if self._silence_run >= self._hang_frames:
            u = self._close(forced=False)
            if u is None or self._clock - u.end >= self._quiet_after:
                return u
            self._held = u  # released once quiet_after_ms of quiet follow, or speech resumes
            return None
        if (self.speculate is not None and self._silence_run == self.speculate_after
                and self._speech_count >= self._min_speech):
            u = self._build(forced=False)
            if u is not None:
                self.speculate(u)
        return None

    def _build(self, forced: bool) -> Utterance | None:
        """The utterance in progress as it would be released now (None: too little speech)."""
        assert self._active is not None
        if self._speech_count < self._min_speech:
            return None
        end = self._clock if forced else self._last_speech_end
        tail = min(self._clock, end + self.frame)          # one frame of release context
        keep = (tail - self._active_first) // self.frame
        pre = self.cfg.preroll_ms * self.rate // 1000
        audio_start = max(self._active_first, self._start - pre)
        skip = (audio_start - self._active_first) // self.frame
        audio = np.concatenate(self._active[skip:keep]) if keep > skip else \
            np.zeros(0, np.float32)
        prev = self._prev_speech_end
        return Utterance(start=self._start, end=end, audio_start=audio_start, audio=audio,
                         rate=self.rate, speech_frames=self._speech_count, forced_cut=forced,
                         emitted_at=self._clock,
                         quiet_before=None if prev is None else max(0, self._start - prev))

    def _close(self, forced: bool) -> Utterance | None:
        u = self._build(forced)
        self._prev_speech_end = self._last_speech_end
        self._active = None
        self._recent.clear()
        if u is None:
            self.discarded_short += 1
        return u
