"""Probation of a newly activated model: is it doing worse than the model it replaced?

Each closed stats window gives a few key figures (abstain rate, estimated accuracy, compute
latency p95, the share of abstentions asked again). The running model's recent windows are its
baseline; during probation, after every window with enough utterances, the probation's windows
so far (pooled, weighted by utterances) are compared with the previous model's baseline, and
`breach_windows` breaching verdicts in a row mean rollback. Quiet windows
do not count either way, so probation lasts `probation_windows` windows of real use.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from agent.rollout.experience import ExperienceCounts
from agent.windows import WindowSummary

LATENCY_SLACK_MS = 5.0  # latency below this growth is never a breach (timer noise)


@dataclass(frozen=True)
class WindowKpis:
    utterances: int
    abstain_rate: float | None
    estimated_accuracy: float | None
    latency_p95_ms: float | None
    retry_after_abstain: float | None


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
        retry_after_abstain=exp.rates()["retry_after_abstain"])


def baseline_of(windows: Iterable[WindowKpis]) -> dict[str, float]:
    """Mean of each figure over the windows that have it (weighted by utterances)."""
    out: dict[str, float] = {}
    ws = list(windows)
    for key in ("abstain_rate", "estimated_accuracy", "latency_p95_ms", "retry_after_abstain"):
        vals = [(getattr(w, key), max(w.utterances, 1)) for w in ws if getattr(w, key) is not None]
        if vals:
            out[key] = round(sum(v * n for v, n in vals) / sum(n for _, n in vals), 6)
    return out


@dataclass(frozen=True)
class Limits:
    max_abstain_increase: float = 0.2
    max_accuracy_drop: float = 0.1
    max_latency_ratio: float = 3.0
    max_retry_increase: float = 0.25

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
    if b is not None and k.retry_after_abstain is not None and \
            k.retry_after_abstain > b + lim.max_retry_increase:
        out.append(f"asked again {k.retry_after_abstain:.2f} vs {b:.2f}")
    return out


def pooled(windows: list[WindowKpis]) -> WindowKpis:
    """The probation so far as one window: figures weighted by utterances. Pooling makes the
    verdict steadier as probation goes on (a window of four utterances is mostly noise)."""
    b = baseline_of(windows)
    return WindowKpis(sum(w.utterances for w in windows), b.get("abstain_rate"),
                      b.get("estimated_accuracy"), b.get("latency_p95_ms"),
                      b.get("retry_after_abstain"))


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
