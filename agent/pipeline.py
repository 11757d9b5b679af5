"""The pure pipeline: audio blocks in, decisions out, on one audio clock.

source block → mono → resample to the model's rate → VAD segmenter → features → model →
policy. No threads, no files, no network here: the service feeds blocks and drains decisions,
tests and benchmarks call the same object directly. Observers get every measurement the
monitoring layer needs without the pipeline knowing what they do with it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from agent.audio.resample import Resampler, to_mono
from agent.audio.sources import AudioBlock
from agent.config import VadConfig
from agent.decision import Decision, Policy
from agent.features import extract
from agent.model import ModelRunner
from agent.vad import Segmenter, Utterance, VadBlockStats


@dataclass(frozen=True)
class Outcome:
    """Everything known about one utterance after the model; kept on the device."""

    utterance: Utterance
    decision: Decision
    probabilities: np.ndarray | None


class Observer(Protocol):
    def on_block(self, clock_s: float, stats: VadBlockStats, dropped: int) -> None: ...

    def on_outcome(self, outcome: Outcome) -> None: ...


class Pipeline:
    def __init__(self, vad_cfg: VadConfig, model: ModelRunner | None, policy: Policy,
                 rate: int | None = None) -> None:
        if model is None and policy.runs_model:
            raise ValueError("a model is needed unless the automation mode is 'off'")
        self.model = model
        self.policy = policy
        self.rate = model.manifest.sample_rate if model is not None else (rate or 8000)
        self.segmenter = Segmenter(vad_cfg, self.rate)
        self.observers: list[Observer] = []
        self.dropped_frames = 0
        self._resampler: Resampler | None = None
        if model is not None:  # build feature constants now, not on the first utterance
            extract(np.zeros(self.rate // 4, np.float32), model.manifest.features)

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
        return out + [self._decide(u) for u in self.segmenter.flush()]

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
        return decisions

    def _observe(self, stats: VadBlockStats, dropped: int) -> None:
        for o in self.observers:
            o.on_block(stats.end / self.rate, stats, dropped)

    def _decide(self, u: Utterance) -> Decision:
        t0 = time.perf_counter()
        probs = None
        label = confidence = margin = None
        accepted = False
        runs = self.model is not None and self.policy.runs_model
        if runs:
            feats = extract(u.audio, self.model.manifest.features)
            probs = self.model.predict(feats[None, :])[0]
            label, confidence, margin, accepted = self.policy.decide(
                probs, self.model.manifest.classes)
        latency_ms = (time.perf_counter() - t0) * 1000.0
        d = Decision(start=u.start / self.rate, end=u.end / self.rate,
                     decided_at=u.emitted_at / self.rate, label=label, confidence=confidence,
                     accepted=accepted,
                     model=self.model.manifest.ref if runs else None,
                     latency_ms=latency_ms, margin=margin, mode=self.policy.mode,
                     forced_cut=u.forced_cut)
        outcome = Outcome(u, d, probs)
        for o in self.observers:
            o.on_outcome(outcome)
        return d
