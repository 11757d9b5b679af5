"""Shadow mode: the candidate model decides on the same utterances as the active one and never
acts. Operators compare before switching.

Budget: the active path must not slow down, so the observer only queues the utterance; the
service calls `run_pending()` after the active decisions of a block were written. The queue is
bounded: when the device cannot keep up, utterances are skipped for the shadow (counted), never
delayed for the active model. Only per-window aggregates leave (agreement, abstain rate,
estimated accuracy, latency), each withheld below `MIN_VALUES` utterances.

A candidate with another vocabulary (`comparable=False`, a rollout that allows it) is compared
on abstain rate and latency only: agreement (the same word acted on) and estimated accuracy
(the probability of its own words) are null, and the rollout's event says why.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from agent.audio.vad import VadBlockStats
from agent.monitoring.metric_catalog import MEAN_MIN_VALUES
from agent.recognition.decision import Decision, Policy
from agent.recognition.model import ModelRunner
from agent.recognition.pipeline import Outcome

MIN_VALUES = MEAN_MIN_VALUES
MAX_PENDING = 32


@dataclass(frozen=True)
class ShadowResult:
    """The candidate's view of one utterance (local only)."""

    label: str
    confidence: float
    accepted: bool
    agrees: bool
    best_word: float
    latency_ms: float


def features_of(model: ModelRunner, audio: np.ndarray) -> np.ndarray:
    """The model's input for one utterance, computed as the pipeline computes it."""
    return model.features(audio)


def decide(model: ModelRunner, policy: Policy, audio: np.ndarray, addressed: bool = True
           ) -> tuple[str, float, float, bool, np.ndarray]:
    """(label, confidence, margin, accepted, probabilities): the pipeline's own steps."""
    probs = model.predict(features_of(model, audio)[None, :])[0]
    label, conf, margin, accepted = policy.decide(probs, model.manifest.classes, addressed)
    return label, conf, margin, accepted, probs


def agree(active: Decision, label: str, accepted: bool) -> bool:
    """Same outcome for the person: both abstain, or both act on the same label."""
    return active.accepted == accepted and (not accepted or active.label == label)


@dataclass
class ShadowCounts:
    n: int = 0
    agreed: int = 0
    abstained: int = 0
    best_word_sum: float = 0.0
    latencies: list[float] = field(default_factory=list)
    skipped: int = 0
    accepted_conf_sum: float = 0.0  # local (probation's paired comparison), never published
    accepted_n: int = 0
    personalised: int = 0  # comparisons with both models personalised alike (else both plain)
    comparable: bool = True  # the same vocabulary: agreement and accuracy mean something

    def scored(self) -> str | None:
        """How the window's comparisons were made: both models with the device's
        personalisation, both without it (it could not be applied to the candidate, or
        there was none), or some of each."""
        if self.n == 0:
            return None
        return "personalised" if self.personalised == self.n else \
            "plain" if self.personalised == 0 else "mixed"

    def section(self) -> dict[str, Any]:
        ok = self.n >= MIN_VALUES
        words = ok and self.comparable
        lat = np.asarray(self.latencies) if ok else None
        return {"n": self.n, "skipped": self.skipped, "scored": self.scored(),
                "agreement": round(self.agreed / self.n, 4) if words else None,
                "abstain_rate": round(self.abstained / self.n, 4) if ok else None,
                "estimated_accuracy": round(self.best_word_sum / self.n, 4) if words else None,
                "latency_ms_mean": round(float(lat.mean()), 3) if lat is not None else None,
                "latency_ms_p95": round(float(np.quantile(lat, 0.95)), 3)
                if lat is not None else None}


class ShadowRunner:
    """Pipeline observer that queues utterances and runs the candidate on them later."""

    def __init__(self, model: ModelRunner, policy: Policy, rate: int,
                 active: Callable[[], ModelRunner | None] = lambda: None,
                 personal: Callable[[], Any] = lambda: None,
                 active_policy: Callable[[], Policy | None] = lambda: None,
                 comparable: bool = True) -> None:
        """`personal`: the running pipeline's personalisation (agent.personal.device), asked
        each time; the candidate is scored with the same state, or — when that cannot be done
        like for like — both models are compared without it (`active_policy` re-decides the
        running model's side then). `comparable` False: another vocabulary (see above)."""
        self.model, self.policy, self.rate = model, policy, rate
        self.active = active  # the running model, asked each time (a reload may swap it)
        self.personal = personal
        self.active_policy = active_policy
        self._scorers: dict[int, Any] = {}  # id(personalizer) → scorer for the candidate
        self.comparable = comparable
        self.counts = ShadowCounts(comparable=comparable)
        self._pending: deque[Outcome] = deque()
        self.on_result: list[Callable[[Outcome, ShadowResult], None]] = []

    @property
    def ref(self) -> str:
        return self.model.manifest.ref

    def on_block(self, clock_s: float, stats: VadBlockStats, dropped: int) -> None:
        pass

    def on_outcome(self, o: Outcome) -> None:
        if o.decision.label is None:
            return
        if len(self._pending) >= MAX_PENDING:
            self._pending.popleft()
            self.counts.skipped += 1
        self._pending.append(o)

    def run_pending(self) -> None:
        while self._pending:
            self._run(self._pending.popleft())

    def _run(self, o: Outcome) -> None:
        t0 = time.perf_counter()
        feats = getattr(o, "features", None)
        active = self.active()
        addressed = self.policy.addressing.allows_utterance(o.utterance)  # like the pipeline
        personal = self.personal()
        personalised = personal is not None and getattr(personal, "active", False)
        reference = o.decision
        score = self._scorer(personal) if personalised else None
        if personalised and (score is None or feats is None):
            # the candidate cannot get this device's personalisation: compare both plain
            personalised = False
            reference = self._plain_active(o, active, feats, addressed)
        # the active model's head input is the candidate's too when they share the front end
        if feats is not None and active is not None and \
                getattr(self.model, "embedder", None) is getattr(active, "embedder", False):
            probs = score(feats) if personalised else self.model.predict(feats[None, :])[0]
            label, conf, margin, accepted = self.policy.decide(
                probs, self.model.manifest.classes, addressed)
        else:
            audio = o.utterance.audio
            want = self.model.manifest.sample_rate
            if o.utterance.rate != want:
                import soxr
                audio = soxr.resample(audio, o.utterance.rate, want).astype(np.float32)
            label, conf, margin, accepted, _ = decide(self.model, self.policy, audio, addressed)
        latency = (time.perf_counter() - t0) * 1000.0
        unknown = self.policy.unknown_label
        best = conf - margin if label == unknown else conf
        r = ShadowResult(label, conf, accepted, agree(reference, label, accepted), best,
                         latency)
        c = self.counts
        c.n += 1
        c.personalised += personalised
        c.agreed += r.agrees
        c.abstained += not accepted
        c.best_word_sum += best
        if accepted:
            c.accepted_n += 1
            c.accepted_conf_sum += conf
        c.latencies.append(latency)
        for f in self.on_result:
            f(o, r)

    def _scorer(self, personal: Any) -> Callable[[np.ndarray], np.ndarray] | None:
        key = id(personal)
        if key not in self._scorers:
            self._scorers = {key: personal.scorer_for(self.model)}  # one personalizer at a time
        return self._scorers[key]

    def _plain_active(self, o: Outcome, active: ModelRunner | None,
                      feats: np.ndarray | None, addressed: bool = True) -> Decision:
        """The running model's decision on this utterance without personalisation."""
        policy = self.active_policy()
        if active is None or policy is None or feats is None:
            return o.decision
        probs = active.predict(feats[None, :])[0]
        label, conf, margin, accepted = policy.decide(probs, active.manifest.classes, addressed)
        return replace(o.decision, label=label, confidence=conf, margin=margin,
                       accepted=accepted)

    def take(self) -> ShadowCounts:
        c, self.counts = self.counts, ShadowCounts(comparable=self.comparable)
        return c
