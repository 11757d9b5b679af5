"""Drift scores against baselines, baselines themselves, and alarm rules with hysteresis.

Drift is scored per metric by comparing a window's histogram with a baseline histogram over the
same fixed edges (agent.monitoring.metric_catalog). Two scores are available, chosen by config:

* ``js`` (default): Jensen-Shannon *distance*, sqrt of the JS divergence in base 2. Chosen over
  PSI because it is bounded to [0, 1] (one threshold scale for every metric), symmetric, a true
  metric, and defined when either side has empty bins -- which is the normal case for a short
  window -- without an arbitrary smoothing constant that changes the score.
* ``psi``: Population Stability Index, sum (p - q) ln(p / q), with an epsilon added to every bin
  proportion (then renormalised) so empty bins do not make it infinite. Familiar to operators
  (0.1 "some", 0.25 "major" shift), but unbounded and its value on sparse windows depends on eps.

Both are biased upwards on small samples (a window of n values cannot fill the baseline's
shape), which is why alarm rules carry `min_count` and why drift can be scored on a trailing
merge of windows (agent.monitoring.windows.Trailing) or on roll-ups.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from agent.daemon.state_health import StateHealth
from agent.errors import AgentError, ConfigError
from agent.monitoring.metric_catalog import BY_NAME, CLASS_DISTRIBUTION, METRICS, MetricSpec
from agent.monitoring.windows import Histogram, WindowSummary, copy_summary, merge_into

DRIFT_METHODS: tuple[str, ...] = ("js", "psi")
PSI_EPS = 1e-4
BASELINE_FORMAT = "edge-voice-agent/baseline"
BASELINE_VERSION = 1


# --- scores ------------------------------------------------------------------------------
def _proportions(counts: ArrayLike) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    if c.ndim != 1 or total <= 0 or np.any(c < 0):
        raise ValueError("need a 1-D array of non-negative counts with a positive total")
    return c / total


def js_distance(p_counts: ArrayLike, q_counts: ArrayLike) -> float:
    """Jensen-Shannon distance, base 2: 0 for identical shapes, 1 for disjoint support."""
    p, q = _proportions(p_counts), _proportions(q_counts)
    if p.shape != q.shape:
        raise ValueError("histograms have different numbers of bins")
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0  # 0 * log 0 = 0; m > 0 wherever a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    jsd = 0.5 * kl(p) + 0.5 * kl(q)
    return float(math.sqrt(min(1.0, max(0.0, jsd))))


def psi(p_counts: ArrayLike, q_counts: ArrayLike, eps: float = PSI_EPS) -> float:
    """Population Stability Index with `eps` added to every bin proportion (then renormalised)."""
    p, q = _proportions(p_counts), _proportions(q_counts)
    if p.shape != q.shape:
        raise ValueError("histograms have different numbers of bins")
    if eps < 0:
        raise ValueError("eps must be >= 0")
    p = (p + eps) / (1.0 + eps * p.size)
    q = (q + eps) / (1.0 + eps * q.size)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p == q, 0.0, (p - q) * np.log(p / q))
    return float(np.sum(terms))


def check_method(method: str, key: str = "monitoring.drift_method") -> str:
    if method not in DRIFT_METHODS:
        raise ConfigError(f"{key}: {method!r} is not a drift method; allowed: "
                          f"{', '.join(DRIFT_METHODS)}")
    return method


NULL_QUANTILE = 0.99
NULL_DRAWS = 400


@lru_cache(maxsize=4096)
def _null_score(baseline_counts: tuple[int, ...], n: int, method: str) -> float:
    """The NULL_QUANTILE of the raw score between `n` values drawn from the baseline itself
    and the baseline: what chance alone reaches with that few values (seeded: deterministic)."""
    p = _proportions(baseline_counts)
    rng = np.random.default_rng(n * 7919 + len(p))
    a = rng.multinomial(n, p, size=NULL_DRAWS) / n       # draws as proportions, vectorised
    if method == "js":
        m = 0.5 * (a + p)
        with np.errstate(divide="ignore", invalid="ignore"):
            ka = np.where(a > 0, a * np.log2(a / m), 0.0).sum(1)
            kp = np.where(p > 0, p * np.log2(p / m), 0.0).sum(1)
        scores = np.sqrt(np.clip(0.5 * ka + 0.5 * kp, 0.0, 1.0))
    else:
        e = PSI_EPS
        a2, p2 = (a + e) / (1.0 + e * p.size), (p + e) / (1.0 + e * p.size)
        scores = ((a2 - p2) * np.log(a2 / p2)).sum(1)
    return float(np.sort(scores)[int(NULL_QUANTILE * (NULL_DRAWS - 1))])


def drift_score(window: Histogram, baseline: Histogram, method: str = "js",
                corrected: bool = True) -> float | None:
    """Score `window` against `baseline`; None when either is empty.

    A histogram of a dozen values is far from any smooth baseline by chance alone (raw JS
    around 0.5 for 12 values), so the score is corrected for the window's sample size: the raw
    score minus what 99 % of same-sized samples of the baseline itself would reach, rescaled to
    0..1 for JS (0 = indistinguishable from the baseline at that size, 1 = disjoint). Exact and
    deterministic: the chance level is simulated once per (baseline, size) with a fixed seed.
    """
    if not np.array_equal(window.edges, baseline.edges):
        raise ValueError("window and baseline histograms have different edges")
    return counts_drift_score(window.counts, baseline.counts, method, corrected)


def counts_drift_score(window: ArrayLike, baseline: ArrayLike, method: str = "js",
                       corrected: bool = True) -> float | None:
    """`drift_score` on two count vectors over the same bins (or classes); None when either
    is empty."""
    check_method(method)
    w = np.asarray(window, dtype=np.int64)
    b = np.asarray(baseline, dtype=np.int64)
    if w.shape != b.shape:
        raise ValueError("window and baseline have different numbers of bins")
    n = int(w.sum())
    if n == 0 or int(b.sum()) == 0:
        return None
    raw = js_distance(w, b) if method == "js" else psi(w, b)
    if not corrected:
        return raw
    chance = _null_score(tuple(int(c) for c in b), n, method)
    if method == "js":
        return max(0.0, (raw - chance) / (1.0 - chance)) if chance < 1.0 else 0.0
    return max(0.0, raw - chance)


@dataclass(frozen=True)
class DriftScore:
    """A metric's worst score over the baselines (`baseline` names it) plus every baseline's."""

    metric: str
    score: float | None
    baseline: str | None
    method: str
    n: int  # values of the metric in the scored window
    by_baseline: Mapping[str, float | None] = field(default_factory=dict)


# --- baselines ---------------------------------------------------------------------------
@dataclass
class Baseline:
    """Per-metric reference histograms plus metadata (model, source, seconds, ...)."""

    name: str
    hists: dict[str, Histogram]
    meta: dict[str, Any] = field(default_factory=dict)
    classes: dict[str, int] = field(default_factory=dict)  # decisions per class (device only)

    @classmethod
    def from_summary(cls, name: str, summary: WindowSummary,
                     meta: Mapping[str, Any] | None = None) -> Baseline:
        m = {"seconds": summary.duration_s, "windows": summary.windows,
             "utterances": summary.counts.get("utterances", 0), **(meta or {})}
        return cls(name, {k: h.copy() for k, h in summary.hists.items()}, m,
                   dict(sorted(summary.classes.items())))

    def to_dict(self) -> dict:
        return {"format": BASELINE_FORMAT, "version": BASELINE_VERSION, "name": self.name,
                "meta": self.meta, "metrics": {k: h.to_dict() for k, h in self.hists.items()},
                "classes": self.classes}

    @classmethod
    def from_dict(cls, d: Mapping, *, catalog: Sequence[MetricSpec] = METRICS,
                  origin: str = "baseline") -> Baseline:
        """Parse and check against the catalogue; AgentError names what is wrong and the fix."""
        if d.get("format") != BASELINE_FORMAT or d.get("version") != BASELINE_VERSION:
            raise AgentError(f"{origin}: not a version {BASELINE_VERSION} baseline file "
                             f"(format {d.get('format')!r}, version {d.get('version')!r}); "
                             "rebuild it with `edge-voice-agent calibrate`")
        names = {m.name: m for m in catalog}
        hists: dict[str, Histogram] = {}
        for k, hd in dict(d.get("metrics", {})).items():
            if k not in names:
                continue  # a metric retired from the catalogue: ignore, do not fail
            try:
                h = Histogram.from_dict(hd)
            except (KeyError, TypeError, ValueError) as e:
                raise AgentError(f"{origin}: metric {k}: unreadable histogram ({e})") from None
            if tuple(float(x) for x in h.edges) != tuple(float(x) for x in names[k].edges):
                raise AgentError(f"{origin}: metric {k} has bin edges that differ from the "
                                 "catalogue; rebuild the baseline with this version")
            hists[k] = h
        classes = d.get("classes", {})  # absent in training baselines and older files
        if not isinstance(classes, Mapping) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0
                for v in classes.values()):
            raise AgentError(f"{origin}: classes must map class names to counts >= 0; "
                             "delete the file to relearn it")
        return cls(str(d.get("name", "baseline")), hists, dict(d.get("meta", {})),
                   {str(c): int(v) for c, v in classes.items()})

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file + rename) so a crash never leaves half a baseline."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.to_dict(), separators=(",", ":")) + "\n")
            os.replace(tmp, p)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()  # a half-written temp file only takes space
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, *, catalog: Sequence[MetricSpec] = METRICS
             ) -> Baseline:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise AgentError(f"{p}: baseline not found") from None
        except (OSError, ValueError) as e:
            raise AgentError(f"{p}: unreadable baseline ({e})") from None
        if not isinstance(d, dict):
            raise AgentError(f"{p}: baseline must be a JSON object")
        return cls.from_dict(d, catalog=catalog, origin=str(p))


class DeviceBaselineLearner:
    """Learns the device baseline from the windows of the first `learn_s` audio seconds.

    Windows starting before `learn_s` are merged; once a window reaches `learn_s` (and at least
    `min_utterances` were heard, so a silent start does not freeze an empty baseline) it freezes
    for good and, when `path` is set, is saved there. `resume()` picks a frozen baseline up again
    after a restart, unless it was learned for a different model.
    """

    def __init__(self, learn_s: float, *, path: str | os.PathLike | None = None,
                 meta: Mapping[str, Any] | None = None, min_utterances: int = 0,
                 name: str = "device", health: StateHealth | None = None) -> None:
        if not learn_s > 0:
            raise ValueError("device baseline learning time must be > 0 s")
        self.learn_s = float(learn_s)
        self.path = Path(path) if path is not None else None
        self.meta = dict(meta or {})
        self.min_utterances = min_utterances
        self.name = name
        self.baseline: Baseline | None = None
        self.note = ""
        self._acc: WindowSummary | None = None  # windows merged so far (memory stays flat)
        self.health = health or StateHealth()
        self.unsaved = False  # frozen, but the save failed: retried with every window

    @property
    def frozen(self) -> bool:
        return self.baseline is not None

    @classmethod
    def resume(cls, path: str | os.PathLike, learn_s: float, *,
               meta: Mapping[str, Any] | None = None, min_utterances: int = 0,
               health: StateHealth | None = None) -> DeviceBaselineLearner:
        """A learner that is already frozen if `path` holds a baseline for the same model."""
        learner = cls(learn_s, path=path, meta=meta, min_utterances=min_utterances,
                      health=health)
        p = Path(path)
        if not p.exists():
            learner.note = "no device baseline yet: learning"
            return learner
        try:
            b = Baseline.load(p)
        except AgentError as e:
            learner.note = f"relearning device baseline: {e}"
            return learner
        labels = learner.meta.get("labels")
        if labels is not None and b.meta.get("labels") != labels:
            have = b.meta.get("labels")
            learner.note = (f"relearning device baseline: learned for another vocabulary "
                            f"({len(have) if isinstance(have, list) else 'no'} classes "
                            f"{have!r:.80}), running {len(labels)} classes {labels!r:.80}; "
                            "the old class distribution is discarded")
            return learner
        want = learner.meta.get("model")
        if want is not None and b.meta.get("model") != want:
            learner.note = (f"relearning device baseline: learned for model "
                            f"{b.meta.get('model')!r}, running {want!r}")
            return learner
        learner.baseline = b
        learner.note = "device baseline loaded"
        return learner

    def add(self, summary: WindowSummary) -> Baseline | None:
        """Feed a closed window; returns the baseline once, at the moment it freezes."""
        if self.frozen:
            if self.unsaved:
                self._save()
            return None
        # past learn_s without enough utterances: keep learning (merged as it goes, so a silent
        # device that never freezes does not keep every window)
        if self._acc is None:
            self._acc = copy_summary(summary)
        else:
            merge_into(self._acc, summary)
        if summary.end_s >= self.learn_s - 1e-9 and self._ready():
            merged = self._acc
            merged.nominal_s = merged.end_s - merged.start_s
            self.baseline = Baseline.from_summary(
                self.name, merged, {"learned_s": merged.end_s, "frozen": True, **self.meta})
            self._acc = None
            self._save()
            return self.baseline
        return None

    def _save(self) -> None:
        """Save the frozen baseline; a full or read-only disk keeps it in memory only (drift
        is still scored against it) and the save is retried with the next window."""
        if self.path is None or self.baseline is None:
            return
        try:
            self.baseline.save(self.path)
        except OSError as e:
            self.unsaved = True
            self.health.write_failed("baseline", self.path, e, "the device baseline is kept in "
                                     "memory (drift still scored against it) and saved when the "
                                     "disk takes data again")
            return
        self.unsaved = False
        self.health.write_ok("baseline", self.path)

    def _ready(self) -> bool:
        n = self._acc.counts.get("utterances", 0) if self._acc is not None else 0
        return n >= self.min_utterances


def class_drift(summary: WindowSummary, baselines: Iterable[Baseline], labels: Sequence[str],
                method: str = "js", k: int = 1) -> DriftScore | None:
    """Drift of the window's class distribution (decisions per class of `labels`, the model's
    manifest incl. unknown) against each baseline that counted classes for the same labels.

    None when the window holds fewer than `k` decisions (as for `outputs`, the anonymity set
    is the smaller of its utterances and decisions): a distribution score of a handful of
    decisions would say what was said, so it is neither computed nor published.
    """
    labels = list(labels)
    n = min(int(summary.counts.get("utterances", 0)), sum(summary.classes.values()))
    if not labels or n < max(1, k):
        return None
    w = [int(summary.classes.get(c, 0)) for c in labels]
    by: dict[str, float | None] = {}
    for b in baselines:
        if b.classes and b.meta.get("labels") == labels:
            by[b.name] = counts_drift_score(w, [int(b.classes.get(c, 0)) for c in labels],
                                            method)
    scored = [(s, b) for b, s in by.items() if s is not None]
    score, which = max(scored) if scored else (None, None)
    return DriftScore(CLASS_DISTRIBUTION, score, which, method, sum(w), by)


def score_window(summary: WindowSummary, baselines: Iterable[Baseline], method: str = "js"
                 ) -> dict[str, DriftScore]:
    """Score every metric of `summary` against each baseline; keep the worst per metric."""
    check_method(method)
    bl = list(baselines)
    out: dict[str, DriftScore] = {}
    for name, h in summary.hists.items():
        by: dict[str, float | None] = {}
        for b in bl:
            ref = b.hists.get(name)
            by[b.name] = drift_score(h, ref, method) if ref is not None else None
        scored = [(s, b) for b, s in by.items() if s is not None]
        score, which = max(scored) if scored else (None, None)
        out[name] = DriftScore(name, score, which, method, h.count, by)
    return out


# --- alarms ------------------------------------------------------------------------------
ALARM_ON: tuple[str, ...] = ("drift", "value_high", "value_low")
ALARM_STATS: tuple[str, ...] = ("mean", "p50", "p95", "min", "max")
_RULE_KEYS: tuple[str, ...] = ("metric", "on", "threshold", "raise_after", "clear_after",
                               "min_count", "stat", "baseline")


@dataclass(frozen=True)
class AlarmRule:
    """Raise after `raise_after` breaching windows in a row, clear after `clear_after` clean ones.

    on="drift": breach when the drift score >= threshold (against `baseline`, or the worst one);
    on="value_high"/"value_low": breach when the window's `stat` >= / <= threshold.
    Windows with fewer than `min_count` values of the metric neither raise nor clear, and do not
    break a streak either: they carry no evidence.
    """

    metric: str
    threshold: float
    raise_after: int = 3
    clear_after: int = 3
    on: str = "drift"
    min_count: int = 1
    stat: str = "mean"
    baseline: str | None = None

    def __post_init__(self) -> None:
        w = f"alarms.{self.metric}"
        if self.metric not in BY_NAME:
            raise ConfigError(f"{w}: unknown metric; allowed: {', '.join(BY_NAME)}")
        if self.on not in ALARM_ON:
            raise ConfigError(f"{w}.on: {self.on!r} not allowed; allowed: {', '.join(ALARM_ON)}")
        if self.stat not in ALARM_STATS:
            raise ConfigError(f"{w}.stat: {self.stat!r} not allowed; allowed: "
                              f"{', '.join(ALARM_STATS)}")
        for k in ("raise_after", "clear_after", "min_count"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{w}.{k}: {v!r} not allowed; allowed: an integer >= 1")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
            raise ConfigError(f"{w}.threshold: {t!r} not allowed; allowed: a finite number")
        if self.on == "drift" and t <= 0:
            raise ConfigError(f"{w}.threshold: {t!r} not allowed; allowed: a drift score > 0")

    @property
    def key(self) -> tuple[str, str, str, str | None]:
        return (self.metric, self.on, self.stat, self.baseline)


@dataclass(frozen=True)
class AlarmEvent:
    """A transition of one rule: raised or cleared, with the window value that caused it."""

    metric: str
    stage: str
    state: str  # "raised" | "cleared"
    value: float | None
    threshold: float
    window_end_s: float
    reason: str


def rules_from_config(section: Mapping[str, Any] | Sequence[Mapping[str, Any]],
                      where: str = "alarms") -> list[AlarmRule]:
    """Rules from a TOML section, either shape:

        [alarms.input_rms_dbfs]            # one table (or an array of tables) per metric
        on = "drift"; threshold = 0.5; raise_after = 2; clear_after = 3; min_count = 10

        [[alarms]]                         # an array of tables with a `metric` key
        metric = "queue_depth"; on = "value_high"; stat = "p95"; threshold = 64

    ConfigError names the offending key and what is allowed.
    """
    items: list[tuple[str, Mapping[str, Any], str | None]] = []
    if isinstance(section, Mapping):
        for metric, v in section.items():
            tables = v if isinstance(v, list) else [v]
            for i, t in enumerate(tables):
                path = f"{where}.{metric}" + (f"[{i}]" if isinstance(v, list) else "")
                items.append((path, t, metric))
    elif isinstance(section, Sequence) and not isinstance(section, str | bytes):
        items = [(f"{where}[{i}]", t, None) for i, t in enumerate(section)]
    else:
        raise ConfigError(f"{where}: must be a table of metric tables or an array of tables")
    rules: list[AlarmRule] = []
    seen: dict[tuple, str] = {}
    for path, t, metric in items:
        if not isinstance(t, Mapping):
            raise ConfigError(f"{path}: must be a table with keys {', '.join(_RULE_KEYS)}")
        for k in t:
            if k not in _RULE_KEYS or (k == "metric" and metric is not None):
                allowed = [x for x in _RULE_KEYS if metric is None or x != "metric"]
                raise ConfigError(f"{path}.{k}: unknown key; allowed: {', '.join(allowed)}")
        m = metric if metric is not None else t.get("metric")
        if m not in BY_NAME:
            raise ConfigError(f"{path}{'' if metric is not None else '.metric'}: {m!r} is not a "
                              f"metric; allowed: {', '.join(BY_NAME)}")
        if "threshold" not in t:
            raise ConfigError(f"{path}.threshold: missing; allowed: a finite number")
        kw = {k: v for k, v in t.items() if k != "metric"}
        try:
            rule = AlarmRule(metric=m, **kw)
        except ConfigError as e:
            raise ConfigError(str(e).replace(f"alarms.{m}", path, 1)) from None
        if rule.key in seen:
            raise ConfigError(f"{path}: duplicates {seen[rule.key]} (same metric, on, stat, "
                              "baseline)")
        seen[rule.key] = path
        rules.append(rule)
    return rules


# Starting points for the demo streams; tune per fleet. Audio and the noise floor carry the
# sudden "muffled microphone" case; model confidence the "new voices" case.
# Sudden drift (a muffled microphone, a noisy room) is a change against how *this* device
# sounded when it started: window rules score against the device baseline. How the device
# compares with the training data (a quieter voice, another microphone) is the gradual question
# the roll-up rules below ask of the training baseline.
DEFAULT_ALARMS: dict[str, Any] = {
    "noise_floor_dbfs": {"on": "drift", "threshold": 0.35, "raise_after": 2, "clear_after": 3,
                         "min_count": 50, "baseline": "device"},
    "input_rms_dbfs": {"on": "drift", "threshold": 0.25, "raise_after": 2, "clear_after": 3,
                       "min_count": 6, "baseline": "device"},
    "snr_db": {"on": "drift", "threshold": 0.3, "raise_after": 2, "clear_after": 3,
               "min_count": 6, "baseline": "device"},
    "clipping_ratio": {"on": "value_high", "stat": "mean", "threshold": 0.01, "raise_after": 2,
                       "clear_after": 3, "min_count": 3},
    "confidence": {"on": "drift", "threshold": 0.25, "raise_after": 3, "clear_after": 3,
                   "min_count": 8, "baseline": "device"},
    "queue_depth": {"on": "value_high", "stat": "p95", "threshold": 64, "raise_after": 2,
                    "clear_after": 2, "min_count": 1},
    # Acting on decisions (agent/actions): an action that failed, timed out or was dropped in
    # a window raises at once and clears after two windows of clean runs; a slow start (the
    # target is 20 ms) or a reader losing decisions says the device is not doing its job.
    "action_outcome": {"on": "value_high", "stat": "max", "threshold": 1, "raise_after": 1,
                       "clear_after": 2, "min_count": 1},
    "action_latency_ms": {"on": "value_high", "stat": "p95", "threshold": 100, "raise_after": 2,
                          "clear_after": 2, "min_count": 3},
    "socket_dropped": {"on": "value_high", "stat": "mean", "threshold": 0.01, "raise_after": 1,
                       "clear_after": 2, "min_count": 1},
    # What people say shifts legitimately (a household that counts, a quiet day of "unknown"),
    # so the class mix alarms only on a large, lasting shift against the device's own start:
    # size-corrected JS >= 0.4 for 3 windows of >= k decisions in a row. Measured on 30
    # decisions a window (tests/test_drift_classes.py, 19 of them one word): half of that
    # word's decisions going to another word scores 0.0 (chance at this size), all of them
    # 0.50, every decision unknown 0.85 -- e.g. a model that hears one class or only unknown
    # after the room or microphone changed.
    "class_distribution": {"on": "drift", "threshold": 0.4, "raise_after": 3, "clear_after": 3,
                           "min_count": 20, "baseline": "device"},
}


# Gradual drift: hourly and daily roll-ups against the training baseline. Many values per
# roll-up make the scores stable, so thresholds are lower and one roll-up in a row suffices.
DEFAULT_ROLLUP_ALARMS: dict[str, Any] = {
    "confidence": {"on": "drift", "threshold": 0.15, "raise_after": 1, "clear_after": 1,
                   "min_count": 100, "baseline": "training"},
    "input_rms_dbfs": {"on": "drift", "threshold": 0.15, "raise_after": 1, "clear_after": 1,
                       "min_count": 100, "baseline": "training"},
    "utterance_length_s": {"on": "drift", "threshold": 0.15, "raise_after": 1, "clear_after": 1,
                           "min_count": 100, "baseline": "training"},
}


@dataclass
class _RuleState:
    raised: bool = False
    streak: int = 0  # consecutive evidence windows pointing at the other state


def _stat(h: Histogram, stat: str) -> float | None:
    if stat == "mean":
        return h.mean
    if stat == "p50":
        return h.quantile(0.5)
    if stat == "p95":
        return h.quantile(0.95)
    if h.count == 0:
        return None
    return h.min if stat == "min" else h.max


class AlarmTracker:
    """Applies rules to successive windows and emits events only on transitions."""

    def __init__(self, rules: Iterable[AlarmRule] = ()) -> None:
        self._rules: dict[tuple, AlarmRule] = {}
        self._state: dict[tuple, _RuleState] = {}
        self._last_end_s = 0.0
        self.replace_rules(rules)

    @property
    def rules(self) -> list[AlarmRule]:
        return list(self._rules.values())

    @property
    def active(self) -> frozenset[str]:
        """Metrics with at least one raised rule."""
        return frozenset(k[0] for k, s in self._state.items() if s.raised)

    def replace_rules(self, rules: Iterable[AlarmRule]) -> list[AlarmEvent]:
        """Reload: rules with the same (metric, on, stat, baseline) keep their state; a removed
        rule that was raised is cleared with an event so operators are not left hanging."""
        new = {}
        for r in rules:
            if r.key in new:
                raise ConfigError(f"alarms.{r.metric}: duplicate rule for on={r.on}, "
                                  f"stat={r.stat}, baseline={r.baseline}")
            new[r.key] = r
        events = []
        for key, old in self._rules.items():
            if key not in new and self._state[key].raised:
                events.append(AlarmEvent(old.metric, BY_NAME[old.metric].stage, "cleared", None,
                                         old.threshold, self._last_end_s, "rule removed"))
        self._state = {k: self._state.get(k, _RuleState()) for k in new}
        self._rules = new
        return events

    def _value(self, r: AlarmRule, summary: WindowSummary,
               drift: Mapping[str, DriftScore] | None) -> float | None:
        if r.on == "drift":
            ds = (drift or {}).get(r.metric)
            if ds is None or ds.n < r.min_count:
                return None
            return ds.by_baseline.get(r.baseline) if r.baseline else ds.score
        h = summary.hists.get(r.metric)
        if h is None or h.count < r.min_count:
            return None
        return _stat(h, r.stat)

    def update(self, summary: WindowSummary,
               drift: Mapping[str, DriftScore] | None = None) -> list[AlarmEvent]:
        """Feed one closed window (and its drift scores); return the transitions it causes."""
        self._last_end_s = summary.end_s
        events = []
        for key, r in self._rules.items():
            v = self._value(r, summary, drift)
            if v is None:
                continue  # too little evidence: neither raise, clear, nor break a streak
            st = self._state[key]
            breach = v <= r.threshold if r.on == "value_low" else v >= r.threshold
            if breach != st.raised:
                st.streak += 1
            else:
                st.streak = 0
            need = r.clear_after if st.raised else r.raise_after
            if st.streak >= need:
                st.raised, st.streak = not st.raised, 0
                events.append(AlarmEvent(r.metric, BY_NAME[r.metric].stage,
                                         "raised" if st.raised else "cleared", float(v),
                                         float(r.threshold), summary.end_s,
                                         _reason(r, v, st.raised, drift)))
        return events


def _reason(r: AlarmRule, v: float, raised: bool, drift: Mapping[str, DriftScore] | None
            ) -> str:
    n = r.raise_after if raised else r.clear_after
    if r.on == "drift":
        ds = (drift or {})[r.metric]
        what = "JS distance (size-corrected)" if ds.method == "js" else "PSI (size-corrected)"
        against = r.baseline or ds.baseline
        op = ">=" if raised else "<"
        return (f"{r.metric} {what} {v:.3f} {op} {r.threshold:g} against the {against} "
                f"baseline for {n} window(s) in a row")
    unit = BY_NAME[r.metric].unit
    high = r.on == "value_high"
    op = (">=" if high else "<=") if raised else ("<" if high else ">")
    return (f"{r.metric} {r.stat} {v:.4g} {unit} {op} {r.threshold:g} "
            f"for {n} window(s) in a row")
