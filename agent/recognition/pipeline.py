"""The pure pipeline: audio blocks in, decisions out, on one audio clock.

source block → mono → resample to the model's rate (16 kHz) → VAD segmenter → front end
(agent/recognition/frontend.py, the same code training uses) → head → policy (threshold and
addressing: what the VAD knows about the segment, agent/recognition/decision.py; in wake mode the
wake stage, agent/recognition/wake.py, on the same speech embedding). No threads, no files, no
network here: the service feeds blocks and drains decisions, tests and benchmarks call the same
object directly. Observers get every measurement the monitoring layer needs without the pipeline
knowing what they do with it.

The front end (about 7 ms per utterance on one thread) runs speculatively while the VAD waits
out its hangover (see agent/audio/vad.py): the audio it sees is exactly the audio the released
utterance holds, so the result is reused as is and after the release only the head runs.
`Decision.latency_ms` is the compute after the release; `speculative_ms` counts the rest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from agent.audio.resample import Resampler, to_mono
from agent.audio.sources import AudioBlock
from agent.audio.vad import Segmenter, Utterance, VadBlockStats
from agent.config import VadConfig
from agent.recognition.decision import Decision, Policy
from agent.recognition.model import ModelRunner
from agent.recognition.wake import WakeResult, WakeStage


@dataclass(frozen=True)
class Outcome:
    """Everything known about one utterance after the model; kept on the device."""

    utterance: Utterance
    decision: Decision
    probabilities: np.ndarray | None
    features: np.ndarray | None = None  # the head input, for a shadow sharing the front end
    wake: WakeResult | None = None      # what the wake stage made of it (wake mode only)


class Observer(Protocol):
    def on_block(self, clock_s: float, stats: VadBlockStats, dropped: int) -> None: ...

    def on_outcome(self, outcome: Outcome) -> None: ...


class Scorer(Protocol):
    """Personalised scoring (agent.personal.device.Personalizer): probabilities for a head
    input instead of the model's own, then what the decision teaches it."""

    def predict(self, model: ModelRunner, x: np.ndarray) -> np.ndarray: ...

    def observe(self, x: np.ndarray, probs: np.ndarray) -> None: ...


class Pipeline:
    def __init__(self, vad_cfg: VadConfig, model: ModelRunner | None, policy: Policy,
                 rate: int | None = None, speculate: bool = True) -> None:
        if model is None and policy.runs_model:
            raise ValueError("a model is needed unless the automation mode is 'off'")
        self.model = model
        self.policy = policy
        self.rate = model.manifest.sample_rate if model is not None else (rate or 16000)
        self.segmenter = Segmenter(vad_cfg, self.rate,
                                   speculate=self._speculate if speculate else None)
        self.observers: list[Observer] = []
        self.personal: Scorer | None = None  # device adaptation and enrollment, when on
        self.wake: WakeStage | None = None    # addressing.mode = "wake"
        self.dropped_frames = 0
        self._resampler: Resampler | None = None
        # (audio_start, end, samples) → (model, head input, wake scan) of speculations not yet
        # released; several can be pending when one pushed block holds more than one word
        self._speculated: dict[tuple[int, int, int], tuple] = {}
        self.speculations = 0       # front-end runs during a hangover
        self.speculation_hits = 0   # ... reused by the released utterance
        self.speculative_ms = 0.0   # their compute time

    @property
    def clock_s(self) -> float:
        return self.segmenter.clock / self.rate

    def condition(self, block: AudioBlock) -> np.ndarray:
        """Mono at the model's rate: the same conditioning whatever the source."""
        if self._resampler is None or self._resampler.in_rate != block.rate:
            self._resampler = Resampler(block.rate, self.rate)
        return self._resampler.process(to_mono(block.samples))

    def feed(self, block: AudioBlock) -> list[Decision]:
        dropped = block.dropped * self.rate // block.rate
        self.dropped_frames += dropped
        return self._consume(self.condition(block), dropped)

    def flush_conditioning(self) -> np.ndarray:
        """End of stream: the resampler's remaining tail (empty when nothing is buffered)."""
        return self._resampler.flush() if self._resampler is not None else \
            np.zeros(0, np.float32)

    def finish(self) -> list[Decision]:
        """End of stream: drain the resampler and close the utterance in progress."""
        out = self._consume(self.flush_conditioning(), 0)
        out += [self._decide(u) for u in self.segmenter.flush()]
        if self.wake is not None:
            self._wakes_unused(self.wake.finish())
        return out

    def skip(self, samples: int) -> list[Decision]:
        """The source was away for `samples` (at the pipeline's rate): decide the utterance in
        progress if it has enough speech, restart resampling (the audio is discontinuous) and
        move the clock on by the gap, which observers see as an empty block of dropped frames."""
        out = self._consume(self._resampler.flush(), 0) if self._resampler is not None else []
        self._resampler = None
        start = self.segmenter.clock
        out += [self._decide(u) for u in self.segmenter.skip(samples)]
        samples = self.segmenter.clock - start
        self.dropped_frames += samples
        stats = VadBlockStats(start=start, frame=self.segmenter.frame)  # no frames heard
        for o in self.observers:
            o.on_block(self.clock_s, stats, samples)
        return out

    def _consume(self, samples: np.ndarray, dropped: int) -> list[Decision]:
        utts, stats = self.segmenter.push(samples)
        # Observers see frames and decisions in audio-time order: the block's frames are cut
        # where each utterance was released, so a window boundary inside a block is exact.
        decisions, i = [], 0
        for u in utts:
            k = (u.emitted_at - stats.start) // stats.frame
            self._observe(stats.slice(i, k), dropped)
            dropped = 0
            decisions.append(self._decide(u))
            i = k
        self._observe(stats.slice(i, len(stats.frame_db)), dropped)
        if self.wake is not None:
            self._wakes_unused(self.wake.expire(self.segmenter.clock, self.segmenter.busy))
        return decisions

    def _wakes_unused(self, n: int) -> None:
        """Wake windows that closed with no command: observers that count them hear it."""
        for o in self.observers if n else ():
            hook = getattr(o, "on_wakes_unused", None)
            if hook is not None:
                hook(n, self.clock_s)

    def _observe(self, stats: VadBlockStats, dropped: int) -> None:
        for o in self.observers:
            o.on_block(stats.end / self.rate, stats, dropped)

    def _speculate(self, u: Utterance) -> None:
        if self.model is None or not self.policy.runs_model:
            return
        t0 = time.perf_counter()
        scan = self.wake.scan_for(u, self._on_its_own(u)) if self.wake is not None else None
        self._speculated[(u.audio_start, u.end, len(u.audio))] = (
            self.model, self.model.features(u.audio), self.wake, scan)
        self.speculations += 1
        self.speculative_ms += (time.perf_counter() - t0) * 1000.0

    def _features(self, u: Utterance) -> tuple[np.ndarray, tuple | None]:
        """The head input and the wake scan (None: not computed), from the speculation when it
        covered exactly this audio."""
        assert self.model is not None
        spec = self._speculated.pop((u.audio_start, u.end, len(u.audio)), None)
        for key in [k for k in self._speculated if k[0] <= u.audio_start]:
            del self._speculated[key]  # earlier candidates of this word: speech resumed
        if spec is not None and spec[0] is self.model:
            self.speculation_hits += 1
            return spec[1], spec[3] if spec[2] is self.wake else None
        return self.model.features(u.audio), None

    def _on_its_own(self, u: Utterance) -> bool:
        """A wake phrase is said on its own too: not in running speech (quiet before it, not
        force-cut); the command after it then needs no quiet before."""
        q = None if u.quiet_before is None else u.quiet_before / u.rate
        return self.policy.addressing.allows(0.0, u.forced_cut, q, False)

    def _decide(self, u: Utterance) -> Decision:
        t0 = time.perf_counter()
        probs = feats = wake = None
        label = confidence = margin = None
        accepted = False
        runs = self.model is not None and self.policy.runs_model
        addressed = self.policy.addressing.allows_utterance(u)
        start = u.start
        if runs:
            feats, scan = self._features(u)
            if self.wake is not None:
                wake = self.wake.judge(u, feats, scan, self._on_its_own(u))
                if wake.command_from is not None:  # wake phrase and command in one breath
                    start = u.audio_start + wake.command_from
                    feats = self.model.features(u.audio[wake.command_from:])
                # the speech just before a command here is the wake phrase: no quiet-before
                addressed = self.policy.addressing.allows((u.end - start) / self.rate,
                                                          u.forced_cut, None, u.speech_after)
            probs = self.model.predict(feats[None, :])[0] if self.personal is None else \
                self.personal.predict(self.model, feats)
            label, confidence, margin, accepted = self.policy.decide(
                probs, self.model.manifest.classes, addressed)
            if wake is not None:
                accepted = accepted and wake.awake
                self.wake.settle(wake, accepted)
                self._wakes_unused(wake.unused)
        latency_ms = (time.perf_counter() - t0) * 1000.0
        if runs and self.personal is not None and not u.forced_cut:
            # learning (and its saves) after the decision; a force-cut segment is running
            # speech, not a command, and teaches the adaptation nothing
            self.personal.observe(feats, probs)
        d = Decision(start=start / self.rate, end=u.end / self.rate,
                     decided_at=u.emitted_at / self.rate, label=label, confidence=confidence,
                     accepted=accepted,
                     model=self.model.manifest.ref if runs else None,
                     latency_ms=latency_ms, margin=margin, mode=self.policy.mode,
                     forced_cut=u.forced_cut, addressed=addressed,
                     wake=wake is not None and wake.heard,
                     awake=None if wake is None else wake.awake)
        outcome = Outcome(u, d, probs, feats, wake)
        for o in self.observers:
            o.on_outcome(outcome)
        return d
