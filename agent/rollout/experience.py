"""What the person experiences, as output metrics: the voice form of "redoing the search".

From the sequence of decisions alone (times and accepted/abstained, never labels):

* retry after abstain — an abstention followed by a new utterance within `retry_s` seconds:
  the device asked again and the person repeated.
* tries to accept — utterances in a run (each within `retry_s` of the previous) until one is
  accepted: 1 is first time right.
* repeat after accept — an accepted decision followed by a new utterance within `retry_s`: a
  likely correction, the person said it again because the device got it wrong.

These are the closest thing to labels a device has; probation and shadow comparisons use them.
Only per-window counts and rates leave the device, and a rate is published only when at least
`MIN_EVENTS` events make it up, so no single utterance's outcome can be read back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.audio.vad import VadBlockStats
from agent.monitoring.metric_catalog import MEAN_MIN_VALUES
from agent.recognition.pipeline import Outcome

MIN_EVENTS = MEAN_MIN_VALUES


@dataclass
class ExperienceCounts:
    abstentions: int = 0        # resolved abstentions
    retried: int = 0            # ... followed by a new utterance within retry_s
    accepted: int = 0           # resolved accepted decisions
    repeated: int = 0           # ... followed by a new utterance within retry_s
    runs_accepted: int = 0      # runs that ended in an accepted decision
    tries: int = 0              # utterances in those runs
    # local only (probation reads them, never published): decisions per model in the window,
    # and the sum and number of accepted decisions' confidences (their estimated precision)
    by_model: dict[str, int] = field(default_factory=dict)
    accepted_conf_sum: float = 0.0
    accepted_conf_sq: float = 0.0
    accepted_conf_n: int = 0

    def accepted_confidence(self) -> float | None:
        if self.accepted_conf_n < MIN_EVENTS:
            return None
        return round(self.accepted_conf_sum / self.accepted_conf_n, 6)

    def rates(self) -> dict[str, float | None]:
        def r(num: int, den: int) -> float | None:
            return round(num / den, 4) if den >= MIN_EVENTS else None

        return {"retry_after_abstain": r(self.retried, self.abstentions),
                "tries_to_accept_mean": r(self.tries, self.runs_accepted),
                "repeat_after_accept": r(self.repeated, self.accepted)}

    def section(self) -> dict[str, Any]:
        return {"abstentions": self.abstentions, "accepted": self.accepted, **self.rates()}


class ExperienceTracker:
    """Pipeline observer; `take()` returns and resets the counts of the closing window."""

    def __init__(self, retry_s: float = 4.0) -> None:
        self.retry_s = retry_s
        self.counts = ExperienceCounts()
        self._last_end: float | None = None
        self._last_accepted = False
        self._run = 0  # utterances in the current run, including the last one

    def on_block(self, clock_s: float, stats: VadBlockStats, dropped: int) -> None:
        if self._last_end is not None and clock_s - self._last_end > self.retry_s:
            self._resolve(followed=False)

    def on_outcome(self, o: Outcome) -> None:
        d = o.decision
        if d.label is None:  # the model did not run (mode off): nothing was offered
            return
        c = self.counts
        c.by_model[str(d.model)] = c.by_model.get(str(d.model), 0) + 1
        if d.accepted and d.confidence is not None:
            c.accepted_conf_sum += d.confidence
            c.accepted_conf_sq += d.confidence * d.confidence
            c.accepted_conf_n += 1
        followed = self._last_end is not None and d.start - self._last_end <= self.retry_s
        if self._last_end is not None:
            self._resolve(followed)
        self._run = self._run + 1 if followed else 1
        if d.accepted:
            self.counts.runs_accepted += 1
            self.counts.tries += self._run
            self._run = 0
        self._last_end, self._last_accepted = d.end, d.accepted

    def _resolve(self, followed: bool) -> None:
        if self._last_accepted:
            self.counts.accepted += 1
            self.counts.repeated += followed
        else:
            self.counts.abstentions += 1
            self.counts.retried += followed
        if not followed:
            self._run = 0
        self._last_end = None

    def take(self) -> ExperienceCounts:
        c, self.counts = self.counts, ExperienceCounts()
        return c
