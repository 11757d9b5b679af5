"""Synthetic pipeline outputs for driving a Monitor directly (drift tests): one utterance's
outcome and a stretch of VAD frames, on an 8 kHz audio clock."""

from __future__ import annotations

import numpy as np

from agent.audio.vad import Utterance, VadBlockStats
from agent.recognition.decision import Decision
from agent.recognition.pipeline import Outcome

RATE = 8000


def outcome(t: float, rng: np.random.Generator, *, label: str = "3",
            confidence: float = 0.95) -> Outcome:
    """A 0.5 s utterance at `t` s decided as `label`; accepted unless unknown or below 0.9."""
    audio = (rng.standard_normal(4000) * 0.05).astype(np.float32)
    start = int(t * RATE)
    u = Utterance(start=start, end=start + 4000, audio_start=start, audio=audio, rate=RATE,
                  speech_frames=15, forced_cut=False, emitted_at=start + 6000)
    d = Decision(start=t, end=t + 0.5, decided_at=t + 0.75, label=label, confidence=confidence,
                 accepted=label != "unknown" and confidence >= 0.9, model="m@1",
                 latency_ms=0.5, margin=confidence - 0.05)
    return Outcome(u, d, None)


def frames(t0: float, seconds: float) -> VadBlockStats:
    """`seconds` of quiet 30 ms VAD frames from `t0` s."""
    n = int(seconds * RATE) // 240
    return VadBlockStats(np.full(n, -60.0, np.float32), np.zeros(n, bool), -60.0,
                         int(t0 * RATE), 240)
