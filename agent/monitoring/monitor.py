"""On-device monitoring: a pipeline observer that turns measurements into telemetry messages.

per-frame and per-utterance measurements → windows on the audio clock → drift against the
training and device baselines → alarm rules → stats and alarm payloads. Hourly and daily
roll-ups of the same windows are scored against the training baseline with their own rules,
so a slow change that no single window shows still raises an alarm.

Only aggregates leave: per-utterance values exist here in memory, for the length of a window.
"""

from __future__ import annotations

import math
import os
import resource
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.audio.vad import VadBlockStats
from agent.daemon.clock import UtcStamper
from agent.daemon.state_health import StateHealth
from agent.monitoring.drift import (
    AlarmEvent,
    AlarmRule,
    AlarmTracker,
    Baseline,
    DeviceBaselineLearner,
    class_drift,
    score_window,
)
from agent.monitoring.payloads import SinceBoot, alarm_payload, stats_payload
from agent.monitoring.windows import (
    DAY_S,
    HOUR_S,
    RollUp,
    Trailing,
    WindowAggregator,
    WindowSummary,
)
from agent.recognition.pipeline import Outcome
from agent.telemetry.message import DEFAULT_PREFIX, Message, topic

CLIP_LEVEL = 0.999  # |sample| at or above this counts as clipped


@dataclass(frozen=True)
class UtteranceMeasures:
    """Input-stage measurements of one utterance's speech span (not its pre-roll)."""

    rms_dbfs: float
    peak_dbfs: float
    clipping_ratio: float
    length_s: float


def measure_utterance(o: Outcome) -> UtteranceMeasures:
    u = o.utterance
    speech = u.audio[max(0, u.start - u.audio_start):max(0, u.end - u.audio_start)]
    if len(speech) == 0:
        speech = u.audio
    if len(speech) == 0:
        return UtteranceMeasures(-120.0, -120.0, 0.0, 0.0)
    a = np.abs(speech)
    rms = float(np.sqrt(np.mean(np.square(speech, dtype=np.float64))))
    return UtteranceMeasures(20 * math.log10(max(rms, 1e-6)),
                             20 * math.log10(max(float(a.max()), 1e-6)),
                             float(np.mean(a >= CLIP_LEVEL)), (u.end - u.start) / u.rate)


class ProcessProbe:
    """CPU % since the previous call and current RSS, read from the kernel (no psutil)."""

    def __init__(self) -> None:
        self._t = time.monotonic()
        self._cpu = time.process_time()
        self._start = self._t

    def sample(self) -> dict[str, float]:
        now, cpu = time.monotonic(), time.process_time()
        dt = max(now - self._t, 1e-6)
        pct = 100.0 * (cpu - self._cpu) / dt
        self._t, self._cpu = now, cpu
        return {"cpu_percent": round(pct, 1), "rss_mb": round(rss_mb(), 1),
                "uptime_s": round(now - self._start, 1)}


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_statm_fd: int | None = None  # /proc/self/statm, opened once: each window only re-reads it


def _forget_statm() -> None:
    """In a forked child the open file still describes the parent."""
    global _statm_fd
    if _statm_fd is not None:
        os.close(_statm_fd)
        _statm_fd = None


os.register_at_fork(after_in_child=_forget_statm)


def rss_mb() -> float:
    """Current RSS. Reading from offset 0 of the open file makes the kernel regenerate it, so
    a sample costs one pread instead of open, read and close (on the pipeline thread)."""
    global _statm_fd
    try:
        if _statm_fd is None:
            _statm_fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        return int(os.pread(_statm_fd, 256, 0).split()[1]) * _PAGE_SIZE / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Monitor:
    """Observer of the pipeline (see `agent.recognition.pipeline.Observer`); emits `Message`s via
    `emit`."""

    def __init__(self, *, emit: Callable[[Message], None], device_id: str,
                 model_info: Mapping[str, Any], rate: int, window_s: float = 60.0,
                 drift_method: str = "js", drift_span_s: float = 30.0, k: int = 20,
                 baselines: Sequence[Baseline] = (), learner: DeviceBaselineLearner | None = None,
                 rules: Sequence[AlarmRule] = (), rollup_rules: Sequence[AlarmRule] = (),
                 unknown_label: str | None = None, prefix: str = DEFAULT_PREFIX,
                 boot_id: str | None = None, utc_anchor: float | None = None,
                 probe: ProcessProbe | None = None,
                 on_window: Callable[[WindowSummary], None] | None = None,
                 stamper: UtcStamper | None = None, health: StateHealth | None = None,
                 labels: Sequence[str] | None = None) -> None:
        self.emit = emit
        self.on_window = on_window
        self.device_id = device_id
        self.model_info = dict(model_info)
        self.rate = rate
        self.window_s = window_s
        self.drift_method = drift_method
        self.k = k
        self.baselines = list(baselines)
        self.learner = learner
        # the model's classes (manifest order, incl. unknown): the class distribution's bins
        self.labels = list(labels) if labels is not None else None
        if learner is not None and learner.baseline is not None:
            self.baselines.append(learner.baseline)
        self.tracker = AlarmTracker(rules)
        self.rollups = [(RollUp(p), AlarmTracker(rollup_rules), label)
                        for p, label in ((HOUR_S, "hourly"), (DAY_S, "daily"))
                        if p % window_s == 0]
        self.prefix = prefix
        self.boot_id = boot_id or uuid.uuid4().hex[:16]
        self.stamper = stamper or UtcStamper("wall", anchor=utc_anchor)
        self.health = health
        self.probe = probe or ProcessProbe()
        self.unknown_label = unknown_label
        self.agg = WindowAggregator(window_s, unknown_label=unknown_label or "unknown")
        self.trailing = Trailing(max(1, math.ceil(drift_span_s / window_s)))
        self.seq = 0
        self.event_seq = 0  # events: their own sequence (emit_event)
        self.queue_depth: int | None = None  # set by the service for live sources only
        self.noise_floor_db = float("nan")
        self.windows_emitted = 0
        self.since_boot = SinceBoot()
        self.last_payload: dict[str, Any] | None = None
        # Alarms the service raises itself (device lost, reload refused), not a window rule.
        self.held_alarms: set[str] = set()
        # Extra payload sections computed as a window closes (agent.rollout: rollout, experience)
        self.sections: list[Callable[[WindowSummary], dict[str, Any]]] = []
        self.wake_stage = False  # wake mode: the wake stage's metrics go into the payload

    # --- observer interface --------------------------------------------------------------
    def on_block(self, clock_s: float, stats: VadBlockStats, dropped: int) -> None:
        n = len(stats.frame_db)
        frame_s = stats.frame / self.rate
        t0 = stats.start / self.rate
        if dropped:
            self.agg.count("dropped_frames", dropped, t0)
        i = 0
        while i < n:  # split the block's frames at window boundaries, by each frame's time
            t = t0 + i * frame_s
            self._process(self.agg.advance(t))
            j = min(n, i + max(1, math.ceil((self.agg.window_end_s - t) / frame_s - 1e-9)))
            sp = stats.speech[i:j]
            self.agg.count("frames", j - i, t)
            self.agg.count("speech_frames", int(sp.sum()), t)
            quiet = stats.frame_db[i:j][~sp]
            if len(quiet):
                self.agg.observe("noise_floor_dbfs", quiet, t)
            i = j
        if not math.isnan(stats.noise_floor_db):
            self.noise_floor_db = stats.noise_floor_db
        if self.queue_depth is not None and n:
            # only a block that carried frames: the end-of-stream flush is an empty block at
            # the final clock, and a value there opened a zero-length window on paced files
            self.agg.observe("queue_depth", self.queue_depth, t0)
        self._take_health(clock_s)
        self._process(self.agg.advance(clock_s))

    def _take_health(self, clock_s: float) -> None:
        """State-directory faults reported by the parts that own files (any thread) become
        window counts and system alarms here, on the pipeline thread."""
        if self.health is None:
            return
        errors, quarantined, events = self.health.take()
        if errors:
            self.agg.count("state_write_errors", errors, clock_s)
        if quarantined:
            self.agg.observe("state_files_quarantined", [1.0] * quarantined, clock_s)
        for e in events:
            self.service_alarm(AlarmEvent(e.metric, "system", e.state, e.value, 0.0, clock_s,
                                          e.reason))

    def on_outcome(self, o: Outcome) -> None:
        d = o.decision
        t = d.decided_at
        m = measure_utterance(o)
        self.agg.count("utterances", 1, t)
        self.agg.observe("input_rms_dbfs", m.rms_dbfs, t)
        self.agg.observe("input_peak_dbfs", m.peak_dbfs, t)
        self.agg.observe("clipping_ratio", m.clipping_ratio, t)
        self.agg.observe("utterance_length_s", m.length_s, t)
        if not math.isnan(self.noise_floor_db):
            self.agg.observe("snr_db", m.rms_dbfs - self.noise_floor_db, t)
        self.agg.observe("eou_latency_ms", (d.decided_at - d.end) * 1000.0, t)
        self.agg.observe("compute_latency_ms", d.latency_ms, t)
        if d.label is not None:
            self.agg.record_decision(d.label, d.accepted, t, confidence=d.confidence,
                                     margin=d.margin)
        if o.wake is not None:
            self.agg.observe("wake_score", o.wake.score, t)
            if o.wake.heard:
                self.agg.count("wakes", 1, t)
                self.agg.observe("wake_latency_ms",
                                 (o.utterance.emitted_at - o.wake.wake_end) * 1000.0 / self.rate,
                                 t)
            if o.wake.awake and d.accepted:
                self.agg.count("wake_commands", 1, t)
        if d.confidence is not None and d.margin is not None:
            # the best word (a digit for the digit model): the top class, or the runner-up when
            # the top class is "unknown"; the metric keeps its schema-1 name
            best_word = d.confidence - d.margin if d.label == self.unknown_label else \
                d.confidence
            self.agg.observe("digit_confidence", best_word, t)

    def on_wakes_unused(self, n: int, clock_s: float) -> None:
        """Wake windows that closed with no command acted on (agent/recognition/wake.py)."""
        self.agg.count("wakes_unused", n, clock_s)

    # --- windows → drift → alarms → messages ---------------------------------------------
    def finish(self, clock_s: float) -> None:
        """End of stream or shutdown: publish the last, partial window."""
        self._take_health(clock_s)
        self._process(self.agg.finish(clock_s))
        for rollup, tracker, label in self.rollups:
            for s in rollup.finish():
                # a roll-up cut short by the end of the stream speaks for its period only
                # when it covers at least half of it
                if s.end_s - s.start_s >= rollup.period_s / 2:
                    self._score_rollup(s, tracker, label)

    def replace_rules(self, rules: Sequence[AlarmRule],
                      rollup_rules: Sequence[AlarmRule] | None = None) -> None:
        for e in self.tracker.replace_rules(rules):
            self._emit_alarm(e)
        for _, tracker, _ in self.rollups if rollup_rules is not None else ():
            for e in tracker.replace_rules(rollup_rules):
                self._emit_alarm(e)

    @property
    def active_alarms(self) -> frozenset[str]:
        """Metrics with a raised alarm: window rules plus those the service holds."""
        return self.tracker.active | self.held_alarms

    def service_alarm(self, e: AlarmEvent) -> None:
        """Publish a transition decided by the service itself (not by a window rule) and hold
        it in the stats payloads' drift states until it is cleared."""
        if e.state == "raised":
            self.held_alarms.add(e.metric)
        else:
            self.held_alarms.discard(e.metric)
        self._emit_alarm(e)

    def observe(self, metric: str, value: float, clock_s: float) -> None:
        """One value of a catalogue metric measured by the service (e.g. an outage length)."""
        self.agg.observe(metric, value, clock_s)
        self._process(self.agg.advance(clock_s))

    def _process(self, closed: list[WindowSummary]) -> None:
        for s in closed:
            if self.on_window is not None:
                self.on_window(s)
            view = self.trailing.add(s)
            drift = score_window(view, self.baselines, self.drift_method)
            if self.labels is not None:  # the window's own classes, k-gated (not the view's)
                cd = class_drift(s, self.baselines, self.labels, self.drift_method, self.k)
                if cd is not None:
                    drift[cd.metric] = cd
            events = self.tracker.update(view, drift)
            anchor, synced = self.stamper.current()
            self.last_payload = stats_payload(
                s, drift, device_id=self.device_id, boot_id=self.boot_id, seq=self._next(),
                model=self.model_info, process=self.probe.sample(), utc_anchor=anchor,
                k=self.k, active_alarms=self.active_alarms, utc_source=self.stamper.source,
                utc_synced=synced, since_boot=self.since_boot.add(s),
                wake_stage=self.wake_stage)
            for section in self.sections:
                self.last_payload.update(section(s))
            self.emit(Message(topic(self.prefix, self.device_id, "stats"), self.last_payload))
            self.windows_emitted += 1
            for e in events:
                self._emit_alarm(e)
            if self.learner is not None:
                learned = self.learner.add(s)
                if learned is not None:
                    self.baselines.append(learned)
            for rollup, tracker, label in self.rollups:
                for r in rollup.add(s):
                    self._score_rollup(r, tracker, label)

    def set_labels(self, labels: Sequence[str] | None) -> str:
        """A model switch: score the class distribution over the new model's classes. A device
        baseline counted for another vocabulary no longer counts for it; returns one log line
        saying so ("" when nothing is discarded)."""
        self.labels = list(labels) if labels is not None else None
        stale = [b.name for b in self.baselines
                 if b.classes and b.meta.get("labels") != self.labels]
        if not stale:
            return ""
        return (f"class distribution drift: the {', '.join(stale)} baseline was counted for "
                f"another vocabulary; its class distribution is discarded (relearned with the "
                f"device baseline after a restart)")

    def _score_rollup(self, s: WindowSummary, tracker: AlarmTracker, label: str) -> None:
        training = [b for b in self.baselines if b.name == "training"]
        drift = score_window(s, training, self.drift_method)
        for e in tracker.update(s, drift):
            self._emit_alarm(AlarmEvent(e.metric, e.stage, e.state, e.value, e.threshold,
                                        e.window_end_s, f"{label} roll-up: {e.reason}"))

    def emit_event(self, event: Mapping[str, Any]) -> None:
        """Publish one `{prefix}/{device_id}/event` (docs/event.schema.json), e.g. a rollout
        step; stamped with this boot's identity and its own event sequence: the stats/alarm
        `seq` the fleet counts gaps in stays contiguous (an event drawn from it was counted as
        a missing message)."""
        p = {"schema": 1, "device_id": self.device_id, "boot_id": self.boot_id,
             "seq": self.event_seq, **event}
        self.event_seq += 1
        self.emit(Message(topic(self.prefix, self.device_id, "event"), p))

    def _emit_alarm(self, e: AlarmEvent) -> None:
        p = alarm_payload(e, device_id=self.device_id, boot_id=self.boot_id, seq=self._next())
        self.emit(Message(topic(self.prefix, self.device_id, "alarm"), p))

    def _next(self) -> int:
        n = self.seq
        self.seq += 1
        return n
