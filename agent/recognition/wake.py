"""The wake phrase: in `addressing.mode = "wake"` the device takes a command only after it.

A wake model is a model directory like any other (made by `edge-voice-agent train --vocabulary
WORD`, from text alone if need be) whose classes are [WORD, unknown], with its `calibration/`
inside. It must share the command model's front end: it is only another head on the same 96-d
speech embedding, as in the open wake-word engines. The check on a VAD segment costs one head
call on the features the command model computes anyway, plus one embedding pass over the
segment with the head slid over it in 80 ms steps (agent/recognition/frontend.py,
`sliding_head_inputs`), which finds a wake phrase said in one breath with its command.

Per segment (`WakeStage.judge`, then `settle` with the decision):
* the wake phrase at the start, with speech after a pause ("WORD seven" in one breath, the
  energy back near the background for 30 ms): the rest of the segment is the command,
  classified by the same front end, provided the audio before the pause still scores as the
  wake phrase on its own (a pause inside a two-word phrase is not the end of it);
* the wake phrase alone: a window of `window_s` opens from its end;
* within the window, segments are commands until one is acted on (an abstention lets the
  person say it again), which closes the window; a window that passes with none is a wake
  with no command (`unused`);
* anything else is not addressed to the device and never acts.

The addressing rule's quiet-before requirement moves from the command to the wake phrase: the
speech just before the command is the wake phrase, but the wake phrase itself must follow
quiet (`decision.min_quiet_before_ms`) and not be a force-cut piece of long speech, or it is
no wake phrase (people talking say words that sound like it, mid-sentence). The rest applies
to the command: a force-cut piece of long speech, speech right after, a segment longer than a
command never act (agent/recognition/pipeline.py applies it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.errors import AgentError
from agent.recognition.decision import Thresholds
from agent.recognition.frontend import sliding_head_inputs
from agent.recognition.model import ModelRunner

TRAIN_ONE = "make one with 'edge-voice-agent train --vocabulary WORD'"
MAX_LEAD_S = 1.0        # the wake phrase's centre lies this close to the segment's first speech
SCAN_MIN_S = 0.8        # a shorter segment cannot hold a wake phrase and a command: its own
                        # centred window (which covers all of it) is the whole check
MIN_GAP_S = 0.2         # one breath: the command starts at least this long after that centre
MIN_COMMAND_S = 0.15    # ... and holds at least this much of the segment's speech
DIP_DB = 10.0           # a pause is this far below the command's loudest frame
PAUSE_DB = 12.0         # ... and this close to the segment's background
PREFIX_SCORE = 0.5      # the audio before a pause holds the wake phrase: its own window scores
                        # this (below the threshold: a trailing pause costs a little score)


class WakeModel:
    """A verified two-class wake model on the command model's front end, with its threshold."""

    def __init__(self, directory: str | Path, command: ModelRunner, threads: int = 1,
                 threshold: float = -1.0) -> None:
        d = Path(directory)
        if not d.is_dir():
            raise AgentError(f"wake model {d} does not exist; set addressing.wake_model to a "
                             f"wake model directory ({TRAIN_ONE})")
        try:
            self.runner = ModelRunner(d, threads, share_from=command)
        except AgentError as e:
            raise AgentError(f"wake model {d}: {e}") from None
        m = self.runner.manifest
        words = [c for c in m.classes if c != m.unknown_label]
        if len(m.classes) != 2 or len(words) != 1:
            raise AgentError(f"wake model {d} ({m.ref}) has classes [{', '.join(m.classes)}]; "
                             f"a wake model has two, [WORD, {m.unknown_label or 'unknown'}]: "
                             f"{TRAIN_ONE}")
        if self.runner.embedder is not command.embedder:
            raise AgentError(f"wake model {d} ({m.ref}) has another front end than the command "
                             f"model {command.manifest.ref}; the wake head must run on the same "
                             f"speech embedding: retrain it with this agent ({TRAIN_ONE})")
        self.word = words[0]
        self.index = m.classes.index(self.word)
        if threshold < 0:
            path = d / "calibration" / "thresholds.json"
            t = Thresholds.read(path)
            if t.sha256 != m.sha256:
                raise AgentError(f"thresholds file {path} was calibrated for {t.model}, not for "
                                 f"the wake model {m.ref}; reinstall the wake model directory or "
                                 "set addressing.wake_threshold")
            threshold = dict(t.per_class).get(self.word, t.threshold)
        self.threshold = float(threshold)
        self.directory = d

    @property
    def ref(self) -> str:
        return self.runner.manifest.ref

    def score(self, head_inputs: np.ndarray) -> np.ndarray:
        """(n, dim) head inputs → (n,) probability of the wake phrase."""
        return self.runner.predict(head_inputs)[:, self.index]

    def scan(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores, window centres as sample indices into `audio`) over a whole segment."""
        x, centres = sliding_head_inputs(audio, self.runner.embedder)
        return self.score(x), centres


@dataclass(frozen=True)
class WakeResult:
    """What the wake stage made of one segment. Local only (aggregates reach monitoring)."""

    heard: bool                  # the wake phrase was in this segment
    score: float                 # best wake score at the segment's start
    awake: bool                  # this segment (or its rest) is a command after a wake
    command_from: int | None     # one breath: where the command starts in the segment's audio
    wake_end: int | None         # clock sample at which the wake phrase ended, when heard
    unused: int = 0              # earlier wakes this segment closed with no command


def split_points(audio: np.ndarray, centre: int, speech_end: int, rate: int,
                 most: int = 3) -> list[int]:
    """Where the command may start after a wake phrase centred at `centre` (sample indices into
    `audio`): pauses, i.e. 30 ms stretches within PAUSE_DB of the segment's background (its
    quietest frames, the VAD's pre-roll) and at least DIP_DB below the speech after them, with
    enough speech after them; the deepest first, at most `most`."""
    frame = rate // 100
    lo = max(1, (centre + int(MIN_GAP_S * rate)) // frame)
    hi = (speech_end - int(MIN_COMMAND_S * rate)) // frame
    n = len(audio) // frame
    if hi <= lo or hi + 1 >= n:
        return []
    f = audio[: n * frame].astype(np.float64).reshape(n, frame)
    db = 10.0 * np.log10(np.mean(f * f, axis=1) + 1e-12)
    smooth = np.convolve(db, np.ones(3) / 3.0, mode="same")
    background = float(np.percentile(db, 5))
    after = np.maximum.accumulate(db[: speech_end // frame][::-1])[::-1]  # loudest from k on
    out = [k for k in range(lo, hi)
           if smooth[k] <= smooth[k - 1] and smooth[k] < smooth[k + 1]
           and smooth[k] <= min(after[k] - DIP_DB, background + PAUSE_DB)]
    return [k * frame for k in sorted(out, key=lambda k: smooth[k])[:most]]


class WakeStage:
    """The wake gate over a stream of segments (pure: no I/O, the audio clock only)."""

    def __init__(self, model: WakeModel, window_s: float) -> None:
        self.model = model
        self.window_s = window_s
        self.deadline: int | None = None   # clock sample by which the command must start
        self.heard = self.commands = self.unused = 0

    def expire(self, clock: int, busy: bool) -> int:
        """Close a window that passed with no command (nothing in progress started in it)."""
        if self.deadline is not None and clock >= self.deadline and not busy:
            self.deadline = None
            self.unused += 1
            return 1
        return 0

    def finish(self) -> int:
        """End of stream: an open window gets no command any more."""
        return self.expire(2**62, False)

    def scan_for(self, u, on_its_own: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
        """The sliding wake scores over the start of segment `u` (an agent.audio.vad.Utterance),
        where a wake phrase followed by a command could be: None for a segment too short to
        hold both, or one that cannot hold a wake phrase (not `on_its_own`: running speech).
        Only the audio that windows centred within MAX_LEAD_S of the first speech see is
        embedded, so a long segment costs no more than a short one."""
        if u.length_s < SCAN_MIN_S or not on_its_own:
            return None
        p = self.model.runner.manifest.frontend
        reach = (u.start - u.audio_start) + int(MAX_LEAD_S * u.rate) + p.window // 2
        return self.model.scan(u.audio[:reach])

    def whole_before(self, audio: np.ndarray) -> bool:
        """The audio before a split holds the wake phrase: its own centred window (the front
        end's `features`, as in training) scores at least PREFIX_SCORE."""
        x = self.model.runner.features(audio)
        return bool(self.model.score(x[None, :])[0] >= PREFIX_SCORE)

    def judge(self, u, feats: np.ndarray,
              scan: tuple[np.ndarray, np.ndarray] | None = None,
              on_its_own: bool = True) -> WakeResult:
        """`u`: an agent.audio.vad.Utterance; `feats`: its head input (the command model's); `scan`:
        `WakeModel.scan` of its audio when already computed (the pipeline speculates it);
        `on_its_own`: the segment starts after quiet and was not force-cut (the addressing
        rule): a wake phrase inside running speech is not one."""
        rate = u.rate
        unused = 0
        if self.deadline is not None and u.start > self.deadline:
            unused += self.expire(u.start, False)
        lead = u.start - u.audio_start
        speech_end = u.end - u.audio_start
        best = float(self.model.score(feats[None, :])[0])
        if scan is None:
            scan = self.scan_for(u, on_its_own)
        command_from = None
        if scan is not None:
            scores, centres = scan
            start = centres <= lead + int(MAX_LEAD_S * rate)
        if scan is not None and start.any():
            i = int(np.argmax(np.where(start, scores, -1.0)))
            if scores[i] >= self.model.threshold and on_its_own:
                # the deepest pause that leaves the wake phrase before it ("hey | jarvis"
                # does not), when speech follows it
                for k in split_points(u.audio, int(centres[i]), speech_end, rate):
                    if self.whole_before(u.audio[:k]):
                        command_from = k
                        break
            best = max(best, float(scores[i]))
        heard = best >= self.model.threshold and on_its_own
        if heard:
            if self.deadline is not None:
                self.deadline = None     # a new wake phrase: the earlier one went unused
                self.unused += 1
                unused += 1
            self.heard += 1
            wake_end = u.audio_start + command_from if command_from is not None else u.end
            self.deadline = wake_end + int(self.window_s * rate)
            return WakeResult(True, best, command_from is not None, command_from, wake_end,
                              unused)
        return WakeResult(False, best, self.deadline is not None, None, None, unused)

    def settle(self, result: WakeResult, accepted: bool) -> None:
        """The decision on the command: acting on it closes the window."""
        if result.awake and accepted:
            self.deadline = None
            self.commands += 1
