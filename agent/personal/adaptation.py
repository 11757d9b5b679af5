"""Label-free device adaptation: the head input moved by how this device's voices and
microphone differ from the training recordings, learned from its own utterances.

A device hears one room, one microphone and a few voices; their head inputs sit a little away
from where the training recordings put them. The adapter keeps a running mean of the device's
own head inputs (no labels: only utterances the model does not call "unknown" and the VAD did
not force-cut count, so noise and running talk do not pull it) and moves every head input by
the difference to the training mean:

    x' = x - w * (device_mean - training_mean),  w = n / (n + prior)

bounded three ways, so a young or wrong estimate cannot move much: nothing moves before
`min_utterances`; `w` shrinks the shift toward zero while the estimate is young; and the shift
is capped at `max_shift` (root mean square, in units of the training standard deviation). The
mean forgets with a horizon of `horizon` utterances, so it follows a slow change and its memory
is one vector. The state belongs to one model build, one front end and one microphone; anything
else starts it afresh (agent.personal.store).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AdaptationParams:
    min_utterances: int = 20
    prior: float = 20.0
    horizon: int = 500
    max_shift: float = 0.5


@dataclass
class AdaptationState:
    """What is persisted: the running mean of the device's head inputs and how many fed it."""

    mean: np.ndarray   # (dim,) float64
    n: int = 0

    @classmethod
    def fresh(cls, dim: int) -> AdaptationState:
        return cls(np.zeros(dim, np.float64), 0)


class Adapter:
    """Pure: observe head inputs, give the shift to subtract. No I/O (agent.personal.store)."""

    def __init__(self, params: AdaptationParams, state: AdaptationState) -> None:
        self.params = params
        self.state = state
        self.updates = 0  # since the last save

    @property
    def active(self) -> bool:
        return self.state.n >= self.params.min_utterances

    @property
    def utterances(self) -> int:
        return self.state.n

    def weight(self) -> float:
        if not self.active:
            return 0.0
        n = min(self.state.n, self.params.horizon)
        return n / (n + self.params.prior)

    def shift(self, training_mean: np.ndarray, scale: np.ndarray) -> np.ndarray | None:
        """The vector to subtract from a head input, or None while inactive."""
        w = self.weight()
        if w <= 0.0:
            return None
        d = w * (self.state.mean - training_mean)
        rms = float(np.sqrt(np.mean((d / scale) ** 2)))
        if rms > self.params.max_shift:
            d *= self.params.max_shift / rms
        return d.astype(np.float32)

    def observe(self, x: np.ndarray) -> None:
        """One utterance's (unshifted) head input joins the running mean."""
        s = self.state
        s.n += 1
        rate = max(1.0 / s.n, 1.0 / self.params.horizon)
        s.mean += rate * (np.asarray(x, np.float64) - s.mean)
        self.updates += 1
