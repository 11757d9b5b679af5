"""From class probabilities to an action: threshold and degree of automation.

The ladder of automation (`off` → `full`) decides who acts. `partial` is the default: act when
the calibrated confidence reaches the threshold chosen for a target precision, otherwise
abstain, which on a device means "ask again" or hand over to a person.
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
        return d


@dataclass(frozen=True)
class Thresholds:
    """Written by training/calibration into calibration/<model>/thresholds.json."""

    model: str
    sha256: str
    threshold: float
    target_precision: float
    source: str

    @classmethod
    def read(cls, path: Path) -> Thresholds:
        try:
            d = json.loads(path.read_text())
            return cls(model=str(d["model"]), sha256=str(d["sha256"]),
                       threshold=float(d["threshold"]),
                       target_precision=float(d["target_precision"]), source=str(path))
        except FileNotFoundError:
            raise AgentError(f"thresholds file {path} is missing; run 'edge-voice-agent train' "
                             "to calibrate the model or set decision.threshold") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise AgentError(f"thresholds file {path} is invalid ({e}); recalibrate the model "
                             "or set decision.threshold") from None


@dataclass(frozen=True)
class Policy:
    mode: str
    threshold: float
    unknown_label: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise AgentError(f"automation mode '{self.mode}' is unknown; allowed: "
                             f"{', '.join(MODES)}")

    @property
    def runs_model(self) -> bool:
        return self.mode != "off"

    def decide(self, probs: np.ndarray, classes: tuple[str, ...]) -> tuple[str, float, float, bool]:
        """(label, confidence, margin, accepted) for one probability vector."""
        order = np.argsort(probs)[::-1]
        top = float(probs[order[0]])
        margin = top - float(probs[order[1]]) if len(order) > 1 else top
        label = classes[int(order[0])]
        known = label != self.unknown_label
        if self.mode == "full":
            accepted = known
        elif self.mode == "partial":
            accepted = known and top >= self.threshold
        else:  # shadow and assist never act
            accepted = False
        return label, top, margin, accepted
