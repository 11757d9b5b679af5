"""Enrollment: the person says each word once (or more); the device keeps those utterances'
head inputs, never their audio, and rescores every later decision with them.

Rescoring, in the reference's discriminant space (agent.personal.reference): each known class
gets a prototype, the mean of its enrolled examples there; an utterance's squared distance to
each prototype, in units of the training within-class spread, becomes a log-likelihood that is
added to the head's log-probability of the class with weight `weight`:

    log q(c) = log P_head(c | known) - weight * (d2(c) - min d2) / 2

The probability that the utterance is one of the known classes at all (the rejector's p_in,
1 - P(unknown)) is left as the model gave it: enrollment can change which word, and how sure,
but no decision's confidence can rise above p_in, so a sound the model takes for "not a word"
(p_in below the threshold) is never acted on because of it. The weight was chosen on speaker-
grouped data (benchmarks/bench_personal.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.errors import AgentError
from agent.personal.reference import Reference

DEFAULT_WEIGHT = 0.25


def label_of(path: Path, classes: Iterable[str]) -> str:
    """`{label}_{anything}.wav` → label, which must be one of `classes`."""
    known = list(classes)
    label = Path(path).name.split("_", 1)[0]
    if "_" not in Path(path).name or label not in known:
        raise AgentError(f"enrollment recording {path} is not named {{label}}_{{anything}}.wav "
                         f"with a label of the model ({', '.join(known)}); rename it")
    return label


def missing_classes(labels: Iterable[str], classes: Iterable[str]) -> list[str]:
    have = set(labels)
    return [c for c in classes if c not in have]


@dataclass(frozen=True)
class Enrollment:
    """Enrolled head inputs and their labels, for one front end (its identity)."""

    x: np.ndarray            # (n, dim) float32 head inputs
    labels: tuple[str, ...]  # (n,)
    frontend: str            # agent.personal.store.frontend_id of the model that made them
    model: str               # the model ref at enrollment (informational)

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.x.shape[0] != len(self.labels) or self.x.shape[0] == 0:
            raise ValueError("enrollment: one head input per label, at least one")
        if not np.all(np.isfinite(self.x)):
            raise ValueError("enrollment: head inputs must be finite")


class Rescorer:
    """Prototypes of one enrollment in one model's reference space; pure and cheap (one
    (dim × k) projection per utterance)."""

    def __init__(self, enrollment: Enrollment, reference: Reference, classes: tuple[str, ...],
                 unknown_label: str | None, weight: float = DEFAULT_WEIGHT) -> None:
        self.reference = reference
        self.weight = weight
        self.known = [i for i, c in enumerate(classes) if c != unknown_label]
        u = reference.project(enrollment.x)
        labels = np.array(enrollment.labels)
        self.protos = np.stack([u[labels == classes[i]].mean(0) for i in self.known])

    def rescore(self, probs: np.ndarray, x: np.ndarray) -> np.ndarray:
        """One probability vector and the utterance's head input → the rescored vector.

        `x` is the head input before any adaptation shift: a shift moves the utterance and the
        enrolled examples alike, so the distances between them do not depend on it."""
        u = self.reference.project(x[None, :])[0]
        d2 = np.sum((self.protos - u) ** 2, axis=1) / self.reference.within
        p = np.asarray(probs, np.float64)
        known = p[self.known]
        p_in = float(known.sum())
        if p_in <= 0.0:
            return np.asarray(probs, np.float32)
        logit = np.log(np.maximum(known / p_in, 1e-12)) - 0.5 * self.weight * (d2 - d2.min())
        q = np.exp(logit - logit.max())
        q *= p_in / q.sum()
        out = p.copy()
        out[self.known] = q
        return out.astype(np.float32)
