"""From class probabilities to an action: threshold, addressing and degree of automation.

The ladder of automation (`off` → `full`) decides who acts. `partial` is the default: act when
the calibrated confidence reaches the threshold chosen for a target precision (one per class,
chosen so that precision holds for the worst held-out speaker group), otherwise abstain, which
on a device means "ask again" or hand over to a person.

Addressing: a command is a short word spoken on its own, with quiet before and after it; a
piece of a sentence is not. `Addressing` reads what the VAD knows about the segment (its speech
length, whether `max_utterance_ms` force-cut it, how long it was quiet before, whether the next
segment started within `vad.quiet_after_ms`) and never lets a segment that fails it act,
whatever the model says. The same rule runs in training evaluation (agent/training/streams.py)
and in the daemon (agent/recognition/pipeline.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import AgentError

MODES = ("off", "shadow", "assist", "partial", "full")


@dataclass(frozen=True)
class Decision:
    """One utterance's outcome. Times are audio seconds on the pipeline clock. Local only."""

    start: float
    end: float
    decided_at: float
    label: str | None
    confidence: float | None
    accepted: bool
    model: str | None
    latency_ms: float
    margin: float | None = None
    mode: str = "partial"
    forced_cut: bool = False
    addressed: bool = True   # False: the VAD context says it was not a command on its own
    wake: bool = False       # the wake phrase was heard in this segment (addressing.mode wake)
    awake: bool | None = None  # wake mode: a command after the wake phrase (None: mode always)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "start": round(self.start, 3), "end": round(self.end, 3),
            "decided_at": round(self.decided_at, 3), "label": self.label,
            "confidence": None if self.confidence is None else round(self.confidence, 4),
            "accepted": self.accepted, "model": self.model,
            "latency_ms": round(self.latency_ms, 3),
        }
        if self.mode == "assist":
            d["suggestion"] = True
        if self.mode != "partial":
            d["mode"] = self.mode
        if self.forced_cut:
            d["forced_cut"] = True
        if not self.addressed:
            d["addressed"] = False
        if self.wake:
            d["wake"] = True
        if self.awake is False:
            d["awake"] = False
        return d


@dataclass(frozen=True)
class Thresholds:
    """Written by training/calibration into calibration/<model>/thresholds.json: one threshold,
    and optionally one per class (`per_class`, label → threshold) that replaces it for that
    class."""

    model: str
    sha256: str
    threshold: float
    target_precision: float
    source: str
    per_class: tuple[tuple[str, float], ...] = ()

    @classmethod
    def read(cls, path: Path) -> Thresholds:
        try:
            d = json.loads(path.read_text())
            per = d.get("per_class") or {}
            return cls(model=str(d["model"]), sha256=str(d["sha256"]),
                       threshold=float(d["threshold"]),
                       target_precision=float(d["target_precision"]), source=str(path),
                       per_class=tuple((str(k), float(v)) for k, v in sorted(per.items())))
        except FileNotFoundError:
            raise AgentError(f"thresholds file {path} is missing; run 'edge-voice-agent train' "
                             "to calibrate the model or set decision.threshold") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise AgentError(f"thresholds file {path} is invalid ({e}); recalibrate the model "
                             "or set decision.threshold") from None


@dataclass(frozen=True)
class Addressing:
    """Is a VAD segment a command said on its own? Chosen on real people talking (never
    addressed to a device) against real digits of held-out speakers; see the model card."""

    max_length_s: float = 1.6          # speech span; spoken digits last 0.2-1.1 s
    min_quiet_before_s: float = 0.7    # a sentence's next piece follows a short pause
    act_on_forced_cut: bool = False    # a segment cut at max_utterance_ms is running speech
    quiet_after: bool = True           # another segment started within vad.quiet_after_ms

    def allows(self, length_s: float, forced_cut: bool, quiet_before_s: float | None,
               speech_after: bool = False) -> bool:
        if forced_cut and not self.act_on_forced_cut:
            return False
        if speech_after and self.quiet_after:
            return False
        if length_s > self.max_length_s:
            return False
        return quiet_before_s is None or quiet_before_s >= self.min_quiet_before_s

    def allows_utterance(self, u: Any) -> bool:
        """`allows` for an agent.audio.vad.Utterance (its length, force-cut, quiet before)."""
        q = u.quiet_before
        return self.allows(u.length_s, u.forced_cut, None if q is None else q / u.rate,
                           u.speech_after)


ADDRESS_ANYTHING = Addressing(max_length_s=float("inf"), min_quiet_before_s=0.0,
                              act_on_forced_cut=True, quiet_after=False)


@dataclass(frozen=True)
class Policy:
    mode: str
    threshold: float
    unknown_label: str | None = None
    per_class: tuple[tuple[str, float], ...] = ()   # label → threshold, replacing `threshold`
    addressing: Addressing = ADDRESS_ANYTHING

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise AgentError(f"automation mode '{self.mode}' is unknown; allowed: "
                             f"{', '.join(MODES)}")

    @property
    def runs_model(self) -> bool:
        return self.mode != "off"

    def threshold_for(self, label: str) -> float:
        for k, v in self.per_class:
            if k == label:
                return v
        return self.threshold

    def decide(self, probs: np.ndarray, classes: tuple[str, ...], addressed: bool = True
               ) -> tuple[str, float, float, bool]:
        """(label, confidence, margin, accepted) for one probability vector; a segment that is
        not `addressed` never acts."""
        order = np.argsort(probs)[::-1]
        top = float(probs[order[0]])
        margin = top - float(probs[order[1]]) if len(order) > 1 else top
        label = classes[int(order[0])]
        known = label != self.unknown_label and addressed
        if self.mode == "full":
            accepted = known
        elif self.mode == "partial":
            accepted = known and top >= self.threshold_for(label)
        else:  # shadow and assist never act
            accepted = False
        return label, top, margin, accepted
