"""Probation of a newly activated model: is it doing worse than the model it replaced?

Each closed stats window gives a few key figures: abstain rate, estimated accuracy, compute
latency p95, the share of abstentions asked again — and two that catch a model that accepts
too much: the share of accepted decisions said again at once (`repeat_after_accept`, a person
correcting the device) and the estimated precision of the accepted decisions (their mean
calibrated confidence, each model at its own threshold: a threshold lowered below its
calibration accepts decisions the calibration itself expects to be wrong).

The running model's recent windows on this device are its baseline. Only windows decided
entirely by the candidate count for its probation (the window it was switched in is not its
evidence), and only with `min_utterances`. The verdict is sequential (`judge`): after every
such window, that window and the probation so far (pooled) are compared with the baseline; a
breach counts, `breach_windows` breaching windows in a row roll back at once, and a pass needs
the whole probation with no breaching window at all. During probation the previous model
shadows the candidate (`Paired`): abstain rate, estimated accuracy and estimated precision are
then compared on the very same utterances, so a change of room is neither blamed on nor
credited to the candidate; latency (pooled only: one window's p95 is mostly the machine's load)
and the people's reactions are compared with the previous model's recent windows.

A model with another vocabulary (rolled out on purpose, agent.rollout.compat) is judged on what
does not depend on which words exist: abstain rate, latency and the people's reactions (asked
again after an abstention, repeated after an accept). Estimated accuracy and estimated
precision are calibrated probabilities of *which word* was heard; over other words they are
other quantities, so they are not compared (`VOCABULARY_BOUND`), and the verdict says so.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from agent.monitoring.windows import WindowSummary
from agent.rollout.experience import MIN_EVENTS, ExperienceCounts

LATENCY_SLACK_MS = 5.0  # latency below this growth is never a breach (timer noise)
Z_ONE_SIDED = 1.645     # estimated precision and the experience rates must pass their limit
                        # by 1.645 standard errors too (one-sided 95 %): a few events are noise


@dataclass(frozen=True)
class WindowKpis:
    utterances: int
    abstain_rate: float | None
    estimated_accuracy: float | None
    latency_p95_ms: float | None
    retry_after_abstain: float | None
    repeat_after_accept: float | None = None
    accepted_confidence: float | None = None  # estimated precision of the accepted decisions
    accepted_n: int = 0        # accepted decisions with a confidence (local, for the noise)
    accepted_sq: float = 0.0   # sum of their squared confidences
    # the events the two experience rates are made of (pooled by counts, not by rates)
    abstentions: int = 0
    retried: int = 0
    accepts: int = 0
    repeated: int = 0

    @property
    def precision_se(self) -> float:
        """Standard error of `accepted_confidence` (0 without enough values)."""
        n, m = self.accepted_n, self.accepted_confidence
        if m is None or n < 2:
            return 0.0
        return math.sqrt(max(self.accepted_sq / n - m * m, 0.0) / n)


FIGURES = ("abstain_rate", "estimated_accuracy", "latency_p95_ms", "retry_after_abstain",
           "repeat_after_accept", "accepted_confidence")
# figures that mean something else for another vocabulary (its words' probabilities)
VOCABULARY_BOUND = ("estimated_accuracy", "accepted_confidence")


def not_compared_note(vocabulary_change: bool) -> str:
    """What a verdict on a model with another vocabulary could not compare, for its event."""
    if not vocabulary_change:
        return ""
    # short: it shares an event's 200-character reason
    return ("vocabulary changed: accuracy and precision estimates not compared (abstain rate, "
            "latency, asked-again rates are)")


def kpis_of(s: WindowSummary, exp: ExperienceCounts) -> WindowKpis:
    decided = s.counts.get("accepted", 0) + s.counts.get("abstained", 0)
    conf = s.hists.get("digit_confidence")
    lat = s.hists.get("compute_latency_ms")
    return WindowKpis(
        utterances=int(s.counts.get("utterances", 0)),
        abstain_rate=s.counts.get("abstained", 0) / decided if decided else None,
        estimated_accuracy=conf.sum / conf.count if conf is not None and conf.count else None,
        latency_p95_ms=float(lat.quantiles((0.95,))[0]) if lat is not None and lat.count
        else None,
        retry_after_abstain=exp.rates()["retry_after_abstain"],
        repeat_after_accept=exp.rates()["repeat_after_accept"],
        accepted_confidence=exp.accepted_confidence(), accepted_n=exp.accepted_conf_n,
        accepted_sq=exp.accepted_conf_sq, abstentions=exp.abstentions, retried=exp.retried,
        accepts=exp.accepted, repeated=exp.repeated)


# the experience rates: (figure, events it is a share of, the events counted)
RATES = (("retry_after_abstain", "abstentions", "retried"),
         ("repeat_after_accept", "accepts", "repeated"))


def _rate(num: int, den: int) -> float | None:
    return round(num / den, 6) if den >= MIN_EVENTS else None


def baseline_of(windows: Iterable[WindowKpis]) -> dict[str, float]:
    """Mean of each figure over the windows that have it (weighted by utterances); the
    experience rates from the pooled counts (a rate of 3 events is mostly noise)."""
    out: dict[str, float] = {}
    ws = list(windows)
    rates = {name for name, _, _ in RATES}
    for key in FIGURES:
        if key in rates:
            continue
        vals = [(getattr(w, key), max(w.utterances, 1)) for w in ws if getattr(w, key) is not None]
        if vals:
            out[key] = round(sum(v * n for v, n in vals) / sum(n for _, n in vals), 6)
    for name, den, num in RATES:
        r = _rate(sum(getattr(w, num) for w in ws), sum(getattr(w, den) for w in ws))
        if r is None:  # windows that carry only the rate (older persisted baselines, tests)
            vals = [(getattr(w, name), max(w.utterances, 1)) for w in ws
                    if getattr(w, name) is not None]
            r = round(sum(v * n for v, n in vals) / sum(n for _, n in vals), 6) if vals \
                else None
        if r is not None:
            out[name] = r
    return out


def _over(rate: float | None, b: float, limit: float, n: int) -> bool:
    """`rate` of `n` events above baseline `b` by more than `limit` plus its sampling noise
    (1.645 binomial standard errors at the baseline's rate: one-sided 95 %)."""
    if rate is None:
        return False
    noise = Z_ONE_SIDED * math.sqrt(b * (1 - b) / n) if n > 0 else 0.0
    return rate > b + limit + noise


@dataclass(frozen=True)
class Limits:
    max_abstain_increase: float = 0.2
    max_accuracy_drop: float = 0.1
    max_latency_ratio: float = 3.0
    max_retry_increase: float = 0.25
    max_repeat_increase: float = 0.25
    max_precision_drop: float = 0.01

    @classmethod
    def from_config(cls, rc: Any) -> Limits:
        return cls(**{k: getattr(rc, k) for k in asdict(cls())})


def breaches(k: WindowKpis, base: dict[str, float], lim: Limits) -> list[str]:
    """One phrase per figure that is worse than the baseline by more than its limit."""
    out = []
    b = base.get("abstain_rate")
    if b is not None and k.abstain_rate is not None and \
            k.abstain_rate > b + lim.max_abstain_increase:
        out.append(f"abstain rate {k.abstain_rate:.2f} vs {b:.2f}")
    b = base.get("estimated_accuracy")
    if b is not None and k.estimated_accuracy is not None and \
            k.estimated_accuracy < b - lim.max_accuracy_drop:
        out.append(f"estimated accuracy {k.estimated_accuracy:.2f} vs {b:.2f}")
    b = base.get("latency_p95_ms")
    if b is not None and k.latency_p95_ms is not None and \
            k.latency_p95_ms > max(b * lim.max_latency_ratio, b + LATENCY_SLACK_MS):
        out.append(f"latency p95 {k.latency_p95_ms:.1f} ms vs {b:.1f} ms")
    b = base.get("retry_after_abstain")
    if b is not None and _over(k.retry_after_abstain, b, lim.max_retry_increase, k.abstentions):
        out.append(f"asked again {k.retry_after_abstain:.2f} vs {b:.2f}")
    b = base.get("repeat_after_accept")
    if b is not None and _over(k.repeat_after_accept, b, lim.max_repeat_increase, k.accepts):
        out.append(f"repeated after accept {k.repeat_after_accept:.2f} vs {b:.2f}")
    b = base.get("accepted_confidence")
    if b is not None and k.accepted_confidence is not None and \
            k.accepted_confidence < b - lim.max_precision_drop - Z_ONE_SIDED * k.precision_se:
        out.append(f"estimated precision {k.accepted_confidence:.3f} vs {b:.3f}")
    return out


def pooled(windows: list[WindowKpis]) -> WindowKpis:
    """The probation so far as one window: figures weighted by utterances. Pooling makes the
    verdict steadier as probation goes on (a window of four utterances is mostly noise)."""
    b = baseline_of(windows)
    judged = [w for w in windows if w.accepted_confidence is not None]
    n = sum(w.accepted_n for w in judged)
    total = sum(w.accepted_confidence * w.accepted_n for w in judged)  # type: ignore[operator]
    counts = {c: sum(getattr(w, c) for w in windows)
              for c in ("abstentions", "retried", "accepts", "repeated")}
    return WindowKpis(sum(w.utterances for w in windows), b.get("abstain_rate"),
                      b.get("estimated_accuracy"), b.get("latency_p95_ms"),
                      b.get("retry_after_abstain"), b.get("repeat_after_accept"),
                      accepted_confidence=round(total / n, 6) if n else None, accepted_n=n,
                      accepted_sq=sum(w.accepted_sq for w in judged), **counts)


@dataclass(frozen=True)
class Paired:
    """The previous model on exactly the candidate's utterances (a shadow of the previous model
    during probation): the figures a room's drift moves for both models alike, so comparing
    with these rather than with the previous model's earlier windows keeps a change of room
    from passing for a worse model (or hiding one)."""

    n: int = 0
    abstained: int = 0
    best_word_sum: float = 0.0
    accepted_n: int = 0
    accepted_conf_sum: float = 0.0

    def __add__(self, o: Paired) -> Paired:
        return Paired(self.n + o.n, self.abstained + o.abstained,
                      self.best_word_sum + o.best_word_sum, self.accepted_n + o.accepted_n,
                      self.accepted_conf_sum + o.accepted_conf_sum)

    def figures(self, min_n: int) -> dict[str, float]:
        """What replaces the recent baseline's abstain rate, estimated accuracy and estimated
        precision (nothing below `min_n` utterances)."""
        if self.n < max(min_n, 1):
            return {}
        out = {"abstain_rate": round(self.abstained / self.n, 6),
               "estimated_accuracy": round(self.best_word_sum / self.n, 6)}
        if self.accepted_n >= MIN_EVENTS:
            out["accepted_confidence"] = round(self.accepted_conf_sum / self.accepted_n, 6)
        return out


def _figure(phrase: str) -> str:
    """"abstain rate 0.50 vs 0.10" -> "abstain rate"."""
    return re.split(r" [\d.]", phrase, maxsplit=1)[0]


@dataclass(frozen=True)
class Verdict:
    action: str            # "continue", "rollback" or "commit"
    reasons: list[str]     # this window's breaches (empty: a clean window)
    breach_run: int        # breaching windows in a row, this one included
    breached: int          # breaching windows of the whole probation


def judge(window: WindowKpis, so_far: list[WindowKpis], base: dict[str, float], lim: Limits,
          *, breach_run: int, breached: int, done: int, total: int, breach_windows: int,
          paired: dict[str, float] | None = None,
          paired_so_far: dict[str, float] | None = None,
          not_compared: tuple[str, ...] = ()) -> Verdict:
    """The sequential verdict after one more eligible probation window (`so_far` includes it;
    `done` counts it). A breach of the window itself or of the pooled probation counts; a
    run of `breach_windows` rolls back at once; the end of probation commits only a probation
    without any breaching window, and rolls back one that had some. `paired` (and
    `paired_so_far`): the previous model's figures on the same utterances (`Paired`), which
    replace the recent baseline's where they exist. Figures in `not_compared` (e.g.
    VOCABULARY_BOUND for a model with another vocabulary) are left out of every comparison."""
    if not_compared:
        base = {k: v for k, v in base.items() if k not in not_compared}
        paired = {k: v for k, v in (paired or {}).items() if k not in not_compared}
        paired_so_far = {k: v for k, v in (paired_so_far or {}).items()
                         if k not in not_compared}
    # latency p95 of one window is mostly the machine's load at that moment: only the
    # probation's pooled latency is a verdict
    reasons = [r for r in breaches(window, {**base, **(paired or {})}, lim)
               if _figure(r) != "latency p95"]
    seen = {_figure(r) for r in reasons}
    reasons += [f"{r} (probation so far)"
                for r in breaches(pooled(so_far), {**base, **(paired_so_far or {})}, lim)
                if _figure(r) not in seen]
    run = breach_run + 1 if reasons else 0
    breached += bool(reasons)
    if run >= breach_windows:
        return Verdict("rollback", reasons, run, breached)
    if done >= total:
        if breached == 0:
            return Verdict("commit", reasons, run, breached)
        return Verdict("rollback", reasons, run, breached)  # breaching windows: no pass
    return Verdict("continue", reasons, run, breached)


class Recent:
    """The running model's last `n` eligible windows: what a successor is compared with."""

    def __init__(self, n: int, min_utterances: int) -> None:
        self.min_utterances = min_utterances
        self.windows: deque[WindowKpis] = deque(maxlen=n)

    def add(self, k: WindowKpis) -> None:
        if k.utterances >= self.min_utterances:
            self.windows.append(k)

    @property
    def full(self) -> bool:
        return len(self.windows) == self.windows.maxlen

    def clear(self) -> None:
        self.windows.clear()

    def baseline(self) -> dict[str, float]:
        return baseline_of(self.windows)
