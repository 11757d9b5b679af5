"""The shell around the pure pipeline: builds it from config, runs capture and processing
threads, writes decisions locally, and lives as a systemd service.

Lifecycle, all driven from the pipeline thread (signal handlers only set flags):

* systemd: READY=1 once model, audio source and sinks are up; STATUS= summaries at most every
  STATUS_INTERVAL_S (and at once on device loss/return or a reload); WATCHDOG=1 from the
  pipeline loop itself, also while it waits on an empty queue, so only a stuck loop (or a live
  device stuck in a driver read for STALL_S) stops the pings; RELOADING=1 … READY=1 around
  SIGHUP; STOPPING=1 on shutdown.
* SIGTERM/SIGINT: capture stops; audio already captured is processed for up to
  DRAIN_ON_STOP_S; the utterance in progress is *decided* if it already holds vad.min_speech_ms
  of speech (the same rule as for any utterance, so a word cut by the stop is still answered)
  and dropped otherwise; the current partial window is published; exit within STOP_BUDGET_S.
* SIGHUP: the config file is read again and the model, policy, alarm rules, training baseline
  and action table are built completely before one swap between two blocks; anything that
  fails leaves the old parts running, logs one line and raises a `config_reload_ok` system
  alarm. Settings that cannot change live are named as needing a restart.
* Device loss (live sources): capture keeps retrying with bounded exponential back-off and
  finds the device again by name; the pipeline logs once, raises an `audio_outage_s` audio alarm
  and clears it on return. The audio clock keeps counting through the outage (the time away
  is a gap of dropped frames), so windows stay aligned with wall time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent import __version__
from agent.actions.decision_log import DecisionWriter
from agent.actions.outlets import Outlets, load_table
from agent.actions.table import ActionTable
from agent.audio.sources import (
    AudioBlock,
    DeviceNotFound,
    FileSource,
    MicOpener,
    waits_for_devices,
)
from agent.config import RULE_SECTIONS, Config, to_dict
from agent.daemon.clock import UtcStamper
from agent.daemon.sdnotify import Notifier
from agent.daemon.state_health import StateHealth
from agent.errors import AgentError, one_line
from agent.monitoring.drift import AlarmEvent, AlarmRule, Baseline, DeviceBaselineLearner
from agent.monitoring.metric_catalog import METRICS
from agent.monitoring.monitor import Monitor
from agent.monitoring.payloads import WAKE_CLASS_NAMES_BUDGET, class_names_bytes
from agent.personal.adaptation import AdaptationParams
from agent.personal.device import (
    FILE_MICROPHONE,
    Personalizer,
    build_personalizer,
    microphone_identity,
)
from agent.recognition.decision import Policy, Thresholds
from agent.recognition.model import ModelRunner
from agent.recognition.pipeline import Pipeline
from agent.recognition.wake import WakeModel, WakeStage
from agent.resources import calibration_dir, default_model_dir
from agent.rollout.hooks import attach_rollout
from agent.rollout.resolve import slot_of, store_config
from agent.rollout.switch import retarget
from agent.telemetry.device_id import resolve_device_id
from agent.telemetry.sinks import Sink, make_sink

log = logging.getLogger("edge-voice-agent")


def load_model(cfg: Config) -> ModelRunner:
    return ModelRunner(cfg.model.path or default_model_dir(), threads=cfg.model.threads)


def load_policy(cfg: Config, model: ModelRunner) -> Policy:
    """The automation mode with its threshold: explicit, or the model's calibrated one."""
    m = model.manifest
    threshold = cfg.decision.threshold
    per_class: tuple[tuple[str, float], ...] = ()  # an explicit threshold is for every class
    if threshold < 0:
        path = Path(cfg.model.thresholds) if cfg.model.thresholds else \
            calibration_dir(m.name) / "thresholds.json"
        t = Thresholds.read(path)
        if t.sha256 != m.sha256:
            raise AgentError(f"thresholds file {path} was calibrated for {t.model} "
                             f"(sha256 {t.sha256[:12]}…), not for {m.ref} (sha256 "
                             f"{m.sha256[:12]}…); recalibrate or set decision.threshold")
        threshold, per_class = t.threshold, t.per_class
    return Policy(cfg.decision.mode, threshold, m.unknown_label, per_class,
                  cfg.decision.addressing())


def load_wake(cfg: Config, model: ModelRunner) -> WakeStage | None:
    """The wake stage for `addressing.mode = "wake"` (None for "always"), on `model`'s front
    end (agent/recognition/wake.py)."""
    a = cfg.addressing
    if a.mode != "wake":
        return None
    m = model.manifest
    if class_names_bytes(m.classes) > WAKE_CLASS_NAMES_BUDGET:
        raise AgentError(f"addressing.mode = \"wake\": the words of {m.ref} take "
                         f"{class_names_bytes(m.classes)} bytes of the stats payload, and beside "
                         f"the wake stage at most {WAKE_CLASS_NAMES_BUDGET} fit in its 8 KB; use "
                         "a model with fewer or shorter words (docs/wake.md), or mode = "
                         "\"always\"")
    return WakeStage(WakeModel(a.wake_model, model, cfg.model.threads, a.wake_threshold),
                     a.window_s)


def build_pipeline(cfg: Config) -> Pipeline:
    if cfg.decision.mode == "off":
        model = load_model(cfg)  # still loaded: its manifest fixes the pipeline's rate
        return Pipeline(cfg.vad, model, Policy("off", 1.0, model.manifest.unknown_label))
    model = load_model(cfg)
    pipeline = Pipeline(cfg.vad, model, load_policy(cfg, model))
    pipeline.wake = load_wake(cfg, model)
    return pipeline


def personalize(cfg: Config, model: ModelRunner | None, *, microphone: str = FILE_MICROPHONE,
                health: StateHealth | None = None, learn: bool = True) -> Personalizer | None:
    """Device adaptation and enrollment for `model` from the state directory (None when off,
    when the model runs no decisions, or when the model has no head-input reference). A file
    source (`microphone` FILE_MICROPHONE) adapts in memory only: replays stay exact."""
    if model is None or cfg.decision.mode == "off":
        return None
    p = cfg.personal
    return build_personalizer(
        model=model, state_dir=cfg.state_path(), microphone=microphone,
        adaptation=p.adaptation, enrollment=p.enrollment,
        params=AdaptationParams(p.adaptation_min_utterances, p.adaptation_prior,
                                p.adaptation_horizon, p.adaptation_max_shift),
        enrollment_weight=p.enrollment_weight, health=health, learn=learn,
        persist=microphone != FILE_MICROPHONE)


def personal_section(pipeline: Pipeline) -> dict:
    """The stats payload's `personal` section: aggregates only (docs/stats.schema.json)."""
    personal = pipeline.personal
    if isinstance(personal, Personalizer):
        return personal.section()
    return {"personal": {"enrolled": False, "adaptation": {"active": False, "utterances": 0}}}


def config_digest(cfg: Config) -> str:
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_info(pipeline: Pipeline) -> dict:
    m = pipeline.model.manifest if pipeline.model else None
    return {"name": m.name if m else "none", "version": m.version if m else "",
            "sha256": m.sha256 if m else "", "mode": pipeline.policy.mode,
            "threshold": round(pipeline.policy.threshold, 6),
            "slot": slot_of(pipeline.model.directory) if pipeline.model else "none"}


def birth_payload(cfg: Config, pipeline: Pipeline, device_id: str, boot_id: str,
                  baselines: list[str]) -> dict:
    """Everything a consumer needs to decode this boot's stats: versions and metric schema."""
    return {"schema": 1, "device_id": device_id, "boot_id": boot_id,
            "agent_version": __version__, "model": model_info(pipeline),
            "config_digest": config_digest(cfg), "window_s": cfg.monitoring.window_s,
            "drift_method": cfg.monitoring.drift_method, "k": cfg.monitoring.k,
            "baselines": baselines,
            "metrics": {m.name: {"stage": m.stage, "unit": m.unit, "edges": list(m.edges)}
                        for m in METRICS}}


def load_training_baseline(cfg: Config, model: ModelRunner | None) -> Baseline | None:
    if model is None:
        return None
    path = Path(cfg.monitoring.baseline) if cfg.monitoring.baseline else \
        calibration_dir(model.manifest.name) / "baseline.json"
    if not path.is_file():
        if cfg.monitoring.baseline:
            raise AgentError(f"training baseline {path} does not exist; run "
                             "'edge-voice-agent calibrate' or fix monitoring.baseline")
        log.warning("no training baseline at %s: drift is scored against the device baseline "
                    "only (run 'edge-voice-agent calibrate')", path)
        return None
    b = Baseline.load(path)
    if b.meta.get("model_sha256") not in (None, model.manifest.sha256):
        log.warning("training baseline %s was made for another model build; recalibrate", path)
    return Baseline(name="training", hists=b.hists, meta=b.meta)


def build_monitor(cfg: Config, pipeline: Pipeline, device_id: str, emit, *,
                  health: StateHealth | None = None, live: bool = True) -> Monitor:
    state = cfg.state_path()
    baselines = [b for b in [load_training_baseline(cfg, pipeline.model)] if b is not None]
    ref = pipeline.model.manifest.ref if pipeline.model else "none"
    labels = list(pipeline.model.manifest.classes) if pipeline.model else None
    learner = DeviceBaselineLearner.resume(
        state / "device-baseline.json", cfg.monitoring.device_baseline_s,
        meta={"model": ref, "labels": labels},
        min_utterances=cfg.monitoring.device_baseline_min_utterances, health=health)
    log.info("device baseline: %s", learner.note)
    return Monitor(emit=emit, device_id=device_id, model_info=model_info(pipeline),
                   rate=pipeline.rate, window_s=cfg.monitoring.window_s,
                   drift_method=cfg.monitoring.drift_method,
                   drift_span_s=cfg.monitoring.drift_span_s, k=cfg.monitoring.k,
                   baselines=baselines, learner=learner, rules=cfg.alarm_rules(),
                   rollup_rules=cfg.rollup_alarm_rules(),
                   unknown_label=pipeline.policy.unknown_label, prefix=cfg.telemetry.prefix,
                   stamper=UtcStamper("wall" if live else "file"), health=health,
                   labels=labels)


def build_sink(cfg: Config, device_id: str, birth: dict,
               health: StateHealth | None = None) -> Sink:
    t = cfg.telemetry
    if not t.sink.startswith("mqtt"):  # paho and sqlite3 only when they are used
        return make_sink(t.sink, device_id=device_id, prefix=t.prefix, birth=birth)
    from agent.telemetry.mqtt import MqttOptions
    from agent.telemetry.outbox import OutboxLimits

    return make_sink(t.sink, device_id=device_id, prefix=t.prefix, state_dir=cfg.state_path(),
                     birth=birth, health=health,
                     mqtt=MqttOptions(username=t.username, password_file=t.password_file,
                                      ca_file=t.ca_file, cert_file=t.cert_file,
                                      key_file=t.key_file, keepalive_s=t.keepalive_s,
                                      protocol=t.mqtt_protocol,
                                      reconnect_min_s=t.reconnect_min_s,
                                      reconnect_max_s=t.reconnect_max_s,
                                      max_inflight=t.max_inflight,
                                      historical_on_reconnect=t.historical_on_reconnect),
                     outbox=OutboxLimits(max_messages=t.outbox_max_messages,
                                         max_bytes=t.outbox_max_bytes,
                                         max_age_s=t.outbox_max_age_s, sync=t.outbox_sync))


STATUS_INTERVAL_S = 2.0   # STATUS= at most this often (sooner on a device or reload event)
STOP_BUDGET_S = 4.0       # signal → exit; the promise is 5 s (the unit's TimeoutStopSec is 15)
DRAIN_ON_STOP_S = 1.0     # of that budget: processing audio already captured
TICK_S = 0.25             # longest the loop waits for audio before pinging, polling signals
# A live device that neither delivers nor fails for this long is stuck in a driver read; the
# loop then withholds WATCHDOG=1 so systemd restarts the service (WatchdogSec later).
STALL_S = 10.0
# Settings a SIGHUP applies; every other difference is reported as needing a restart (the
# source, rates, VAD state and windows are tied to the running clock, sinks to open files).
LIVE_SECTIONS = ("model", "decision", "addressing", "personal", "actions", *RULE_SECTIONS)
LIVE_KEYS = frozenset({"monitoring.baseline", "monitoring.k"})
REASON_MAX = 200          # alarm.schema.json: reason maxLength
ACTIONS_AT_END_S = 10.0   # at the end of a file source, queued actions may finish for this long
UNPACED_FILE_QUEUE = 4    # blocks queued ahead for a file read as fast as possible


@dataclass
class RunSummary:
    decisions: int
    audio_seconds: float      # audio heard (the clock minus the time the device was away)
    dropped_frames: int
    source: str
    windows: int = 0
    drained: bool = True
    stopped: bool = False     # ended by a signal (or the caller's stop), not by the source
    clock_s: float = 0.0      # the pipeline's audio clock, outages included
    outage_s: float = 0.0
    reloads: int = 0
    state_failing: dict[str, str] = dataclasses.field(default_factory=dict)  # part -> cause


class Source(Protocol):
    """What capture needs: blocks, whether it is live, and a description for logs."""

    live: bool

    def __iter__(self) -> Iterator[AudioBlock]: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class SourceLost:
    """Capture lost a live source (open or read failed); sent once per outage."""

    reason: str


@dataclass(frozen=True)
class SourceBack:
    """Capture reopened the source after `outage_s` seconds away."""

    description: str
    outage_s: float


@dataclass(frozen=True)
class Gap:
    """`seconds` of wall time without audio, while the source is away: the clock moves on."""

    seconds: float


@dataclass(frozen=True)
class Retry:
    """Reopening a lost live source: wait first_s, doubling up to max_s. No jitter: one local
    device, no fleet to desynchronise. Time away is reported every tick_s so windows keep
    closing on schedule during a long outage."""

    first_s: float = 0.5
    max_s: float = 30.0
    tick_s: float = 1.0

    def delay(self, attempt: int) -> float:
        return min(self.max_s, self.first_s * 2.0 ** min(attempt, 30))


_END = object()



class Capture(threading.Thread):
    """Reads the source into a bounded queue. A live device never waits for the pipeline:
    when the queue is full the block is dropped and counted. A file waits instead (no loss).

    A live source that fails (open or read) is reopened through `opener` with back-off; the
    pipeline hears SourceLost once, Gap ticks while it is away, then SourceBack.
    """

    def __init__(self, opener: Callable[[], Source], q: queue.Queue, stop: threading.Event, *,
                 live: bool, source: Source | None, error: str = "", retry: Retry = Retry(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name="capture", daemon=True)
        self.opener, self.q, self.stop, self.live = opener, q, stop, live
        self.source, self.error, self.retry, self.clock = source, error, retry, clock
        self._overflow = 0
        self._lock = threading.Lock()
        self._mark = 0.0  # clock up to which time away has been reported

    def take_overflow(self) -> int:
        """Frames dropped on a full queue since the last call."""
        with self._lock:
            n, self._overflow = self._overflow, 0
        return n

    def run(self) -> None:
        try:
            if self.live:
                self._run_live()
            else:
                assert self.source is not None
                self._pump(self.source)
        except BaseException as e:  # handed to the pipeline thread, which reports it
            self._put(e, force=True)
            return
        self._put(_END, force=True)

    def _put(self, item: object, force: bool = False) -> bool:
        """Blocking put that gives up once stopped (after ~2 s when `force`d)."""
        give_up = None
        while True:
            try:
                self.q.put(item, timeout=0.2)
                return True
            except queue.Full:
                if self.stop.is_set():
                    if not force:
                        return False
                    give_up = give_up or time.monotonic() + 2.0
                    if time.monotonic() > give_up:
                        return False

    def _pump(self, source: Source) -> str | None:
        """Blocks into the queue until stopped (None) or the source fails (the reason)."""
        it = iter(source)
        try:
            for block in it:
                if source.live:
                    try:
                        self.q.put_nowait(block)
                    except queue.Full:
                        with self._lock:
                            self._overflow += len(block.samples)
                elif not self._put(block):
                    return None
                if self.stop.is_set():
                    return None
        except Exception as e:
            if not source.live:
                raise
            return one_line(e)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # release the device before any reopen
        return None if self.stop.is_set() or not source.live else \
            "the device stopped delivering audio"

    def _run_live(self) -> None:
        source = self.source
        reason = self.error
        while not self.stop.is_set():
            if source is None:
                source = self._reopen(reason)
                if source is None:
                    return
            reason = self._pump(source)
            if reason is None:
                return
            source = None

    def _reopen(self, reason: str) -> Source | None:
        lost_at = self._mark = self.clock()
        self._put(SourceLost(reason))
        attempt = 0
        while not self.stop.is_set():
            self._wait(self.retry.delay(attempt))
            if self.stop.is_set():
                return None
            attempt += 1
            try:
                source = self.opener()
            except Exception:  # noqa: BLE001 - logged once, as SourceLost; keep trying
                continue
            now = self.clock()
            self._report_gap(now)
            self._put(SourceBack(source.describe(), now - lost_at))
            return source
        return None

    def _wait(self, seconds: float) -> None:
        end = self.clock() + seconds
        while not self.stop.is_set():
            left = end - self.clock()
            if left <= 0:
                return
            self.stop.wait(min(left, self.retry.tick_s))
            self._report_gap(self.clock())

    def _report_gap(self, now: float) -> None:
        if now > self._mark:
            self._put(Gap(now - self._mark))
            self._mark = now


class Signals:
    """Flags the signal handlers set. A handler only writes an attribute (safe at any point of
    the interrupted code, unlike taking a lock); the pipeline loop polls them every tick and
    does the work."""

    def __init__(self) -> None:
        self.stop_signal = ""
        self.reloads_requested = 0

    def install(self) -> Signals:
        def on_stop(signum: int, frame: object) -> None:
            self.stop_signal = signal.Signals(signum).name

        def on_hup(signum: int, frame: object) -> None:
            self.reloads_requested += 1

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        return self


def install_signal_handlers() -> Signals:
    """SIGTERM/SIGINT → stop, SIGHUP → reload (main thread only)."""
    return Signals().install()


@dataclass
class LiveParts:
    """What a SIGHUP replaces, built completely before the swap."""

    cfg: Config
    model: ModelRunner | None
    policy: Policy
    rules: list[AlarmRule]
    rollup_rules: list[AlarmRule]
    training: Baseline | None
    actions: ActionTable
    wake: WakeStage | None = None


def build_live_parts(cfg: Config, rate: int | None) -> LiveParts:
    """Load and check everything a reload swaps in; raises (AgentError) on any problem.
    `rate` None accepts a model at another rate (a rollout switch rebuilds the segmenter)."""
    model = load_model(cfg)
    m = model.manifest
    if rate is not None and m.sample_rate != rate:
        raise AgentError(f"model {m.ref} runs at {m.sample_rate} Hz but the running pipeline at "
                         f"{rate} Hz; a model with another rate needs a restart")
    policy = Policy("off", 1.0, m.unknown_label) if cfg.decision.mode == "off" else \
        load_policy(cfg, model)
    return LiveParts(cfg, model, policy, cfg.alarm_rules(), cfg.rollup_alarm_rules(),
                     load_training_baseline(cfg, model), load_table(cfg, m.classes),
                     None if cfg.decision.mode == "off" else load_wake(cfg, model))


def restart_needed(running: Config, new: Config) -> list[str]:
    """Changed settings that a reload cannot apply."""
    a, b = to_dict(running), to_dict(new)
    out = []
    for section, values in a.items():
        if section in LIVE_SECTIONS or not isinstance(values, dict):
            continue
        for key, value in values.items():
            name = f"{section}.{key}"
            if name not in LIVE_KEYS and b[section][key] != value:
                out.append(name)
    return out


def merge_live(running: Config, new: Config) -> Config:
    """The configuration actually running after a reload: live settings from `new`."""
    return dataclasses.replace(
        running, model=new.model, decision=new.decision, addressing=new.addressing,
        personal=new.personal,
        actions=new.actions, alarms=new.alarms,
        rollup_alarms=new.rollup_alarms,
        monitoring=dataclasses.replace(running.monitoring, baseline=new.monitoring.baseline,
                                       k=new.monitoring.k))


def open_configured_source(cfg: Config, stop: threading.Event
                           ) -> tuple[Callable[[], Source], bool]:
    """(opener, live) for audio.source: a file opens once; a microphone reopens by name."""
    a = cfg.audio
    if a.source == "mic" or a.source.startswith("mic:"):
        if a.speed:
            raise AgentError("--speed applies to file sources only; remove it for the microphone")
        return MicOpener(a.source[4:] or None, a.mic_rate, a.mic_channels, a.block_ms, stop), True
    return (lambda: FileSource(a.source, a.block_ms, a.speed, stop)), False


class Service:
    """One run of the daemon; every method runs on the pipeline (calling) thread."""

    def __init__(self, cfg: Config, stop: threading.Event, *, signals: Signals,
                 load_config: Callable[[], Config] | None, notifier: Notifier,
                 opener: Callable[[], Source] | None, live: bool, retry: Retry) -> None:
        self.base_cfg = cfg  # as configured; self.cfg has the store's active model filled in
        cfg = store_config(cfg)
        self.cfg, self.stop, self.signals = cfg, stop, signals
        self.load_config, self.notifier, self.retry = load_config, notifier, retry
        self.pipeline = build_pipeline(cfg)
        if opener is None:
            opener, live = open_configured_source(cfg, stop)
        self.opener, self.live = opener, live
        source: Source | None = None
        error = ""
        try:
            source = opener()
        except Exception as e:
            if not live or (isinstance(e, DeviceNotFound) and not waits_for_devices()):
                raise  # from a terminal a name that matches nothing is refused, not awaited
            error = one_line(e)  # a live device may come later: capture keeps trying
        describe = getattr(opener, "describe", None)
        self.source_desc = source.describe() if source is not None else \
            (describe() if describe else "live source")
        telemetry_on = cfg.telemetry.sink != "none"
        self.device_id = resolve_device_id(cfg.agent.device_id) if telemetry_on else \
            (cfg.agent.device_id or "local")
        self.sink: Sink | None = None
        self.health = StateHealth()  # full/read-only/corrupt state: one picture, see docs/faults.md
        self.monitor = build_monitor(cfg, self.pipeline, self.device_id,
                                     lambda msg: self.sink.publish(msg), health=self.health,
                                     live=live)
        self.sink = build_sink(cfg, self.device_id, self._birth(), self.health)
        self.microphone = microphone_identity(self.source_desc) if live else FILE_MICROPHONE
        self.pipeline.personal = personalize(cfg, self.pipeline.model,
                                             microphone=self.microphone, health=self.health)
        self.monitor.sections.append(lambda s: personal_section(self.pipeline))
        self.monitor.wake_stage = self.pipeline.wake is not None
        self.pipeline.observers.append(self.monitor)
        self.writer = DecisionWriter(cfg.decisions_target(), self.health)
        m = self.pipeline.model.manifest if self.pipeline.model else None
        self.outlets = Outlets.build(cfg, load_table(cfg, m.classes if m else None),
                                     self.pipeline.policy.unknown_label)
        if self.outlets.socket_error:  # held for the boot: no reader can get decisions
            self.monitor.service_alarm(AlarmEvent(
                "socket_dropped", "system", "raised", 1.0, 0.0, 0.0,
                self.outlets.socket_error[:REASON_MAX]))
        # An unpaced file waits for the pipeline anyway (nothing to drop): a short queue of its
        # large blocks is enough, and 100 of them held ~6 MiB of audio for nothing.
        depth = cfg.audio.queue_blocks if live or cfg.audio.speed > 0 else \
            min(cfg.audio.queue_blocks, UNPACED_FILE_QUEUE)
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.capture = Capture(opener, self.q, stop, live=live, source=source, error=error,
                               retry=retry)
        self.audio_down = False
        self.outage_s = 0.0
        self.reloads = 0
        self._sink_restarts = 0
        self._reloads_seen = signals.reloads_requested
        self._gap_carry = 0.0
        self._status_at = -1e9
        self._status_sent = ""
        self.ended = False
        self._last_audio = time.monotonic()
        self._stall_logged = False
        interval = notifier.watchdog_interval
        self.tick = min(TICK_S, interval / 2) if interval else TICK_S
        self.rollout = attach_rollout(self, pinned=bool(self.base_cfg.model.path))

    # --- status -----------------------------------------------------------------------------
    def _birth(self) -> dict:
        return birth_payload(self.cfg, self.pipeline, self.device_id, self.monitor.boot_id,
                             [b.name for b in self.monitor.baselines])

    def status_text(self) -> str:
        p = self.pipeline
        ref = p.model.manifest.ref if p.model else "none"
        src = f"audio lost, retrying ({self.source_desc})" if self.audio_down else self.source_desc
        alarms = ", ".join(sorted(self.monitor.active_alarms)) or "none"
        return (f"{src}; model {ref}; mode {p.policy.mode} (threshold {p.policy.threshold:.3f}); "
                f"{self.writer.count} decisions; alarms: {alarms}")

    def _status(self, now: float, force: bool = False) -> None:
        if not force and now - self._status_at < STATUS_INTERVAL_S:
            return
        text = self.status_text()
        self._status_at = now
        if text != self._status_sent:
            self._status_sent = text
            self.notifier.status(text)

    # --- the loop ---------------------------------------------------------------------------
    def start(self) -> None:
        p = self.pipeline
        log.info("listening to %s; model %s; mode %s (threshold %.3f); decisions → %s",
                 self.source_desc, p.model.manifest.ref if p.model else "none", p.policy.mode,
                 p.policy.threshold, self.writer.target)
        log.info("%s", self.outlets.describe())
        self.capture.start()
        self._status_sent = self.status_text()
        self._status_at = time.monotonic()
        self.notifier.ready(self._status_sent)

    def loop(self) -> None:
        """Until the source ends or a stop: blocks in, decisions out, pings and flags polled."""
        while True:
            self._poll_signals()
            if self.stop.is_set():
                return
            now = time.monotonic()
            if not self._stalled(now):
                self.notifier.maybe_ping(now)
            self._status(now)
            self._count_sink_restarts()
            self.outlets.report(self.monitor, self.pipeline.clock_s)
            if self.signals.reloads_requested != self._reloads_seen:
                self._reloads_seen = self.signals.reloads_requested
                self.reload()
            self.rollout.poll()
            try:
                item = self.q.get(timeout=self.tick)
            except queue.Empty:
                continue
            if item is _END:
                self.ended = True
                return
            self.handle(item)

    def decided(self, decisions: list) -> None:
        """Decisions out: the decisions file first, then the socket and the actions."""
        self.writer.write(decisions)
        self.outlets.publish(decisions)

    def _count_sink_restarts(self) -> None:
        """The sink restarts its own dead network thread; the count goes into the system
        metrics here, on the pipeline thread that owns the monitor."""
        n = getattr(self.sink, "restarts", 0)
        while self._sink_restarts < n:
            self._sink_restarts += 1
            self.monitor.observe("telemetry_restarts", 1.0, self.pipeline.clock_s)

    def _stalled(self, now: float) -> bool:
        if not self.live or self.audio_down or now - self._last_audio < STALL_S:
            return False
        if not self._stall_logged:
            self._stall_logged = True
            log.error("capture stalled: no audio and no error from %s for %.0f s; withholding "
                      "watchdog pings so systemd restarts the service", self.source_desc,
                      now - self._last_audio)
        return True

    def _poll_signals(self) -> None:
        if self.writer.reader_gone and not self.stop.is_set():
            log.info("decisions: stdout was closed by its reader; stopping")
            self.stop.set()
        if self.signals.stop_signal and not self.stop.is_set():
            log.info("%s received: stopping capture; the utterance in progress is decided if it "
                     "already has %d ms of speech (vad.min_speech_ms), else dropped; the current "
                     "window is flushed", self.signals.stop_signal, self.cfg.vad.min_speech_ms)
            self.stop.set()

    def handle(self, item: object) -> None:
        if isinstance(item, AudioBlock):
            self._last_audio = time.monotonic()
            lost = self.capture.take_overflow()
            if lost:  # queue overflow counts as dropped input too
                item = AudioBlock(item.samples, item.rate, item.dropped + lost)
            if self.live or self.cfg.audio.speed > 0:  # an unpaced file fills the queue
                self.monitor.queue_depth = self.q.qsize()
            self.decided(self.pipeline.feed(item))
            self.rollout.after_decisions()  # shadow and samples: after the active decisions
        elif isinstance(item, Gap):
            self._gap_carry += item.seconds * self.pipeline.rate
            n = int(self._gap_carry)
            self._gap_carry -= n
            self.outage_s += n / self.pipeline.rate
            self.decided(self.pipeline.skip(n))
        elif isinstance(item, SourceLost):
            self._on_lost(item)
        elif isinstance(item, SourceBack):
            self._on_back(item)
        elif isinstance(item, BaseException):
            raise item

    def _on_lost(self, ev: SourceLost) -> None:
        if self.audio_down:
            return  # one line and one alarm per outage
        self.audio_down = True
        # What was heard before the loss is complete: run the resampler's tail through now, so
        # the alarm carries the audio clock of the loss itself (not minus the filter delay).
        self.decided(self.pipeline.skip(0))
        log.warning("audio source %s lost (%s); retrying with back-off up to %g s, resuming "
                    "when it returns (logged once per outage)", self.source_desc, ev.reason,
                    self.retry.max_s)
        self.monitor.service_alarm(AlarmEvent(
            "audio_outage_s", "audio", "raised", 0.0, 0.0, self.pipeline.clock_s,
            f"capture lost: {ev.reason}"[:REASON_MAX]))
        self._status(time.monotonic(), force=True)

    def _on_back(self, ev: SourceBack) -> None:
        self.audio_down = False
        self._last_audio = time.monotonic()
        self.source_desc = ev.description
        mic = microphone_identity(ev.description)
        if mic != self.microphone and mic != FILE_MICROPHONE:
            self.microphone = mic
            if isinstance(self.pipeline.personal, Personalizer):
                self.pipeline.personal.new_microphone(mic)
        log.info("audio source back after %.1f s: %s", ev.outage_s, ev.description)
        clock = self.pipeline.clock_s
        self.monitor.observe("audio_outage_s", ev.outage_s, clock)
        self.monitor.service_alarm(AlarmEvent(
            "audio_outage_s", "audio", "cleared", round(ev.outage_s, 3), 0.0, clock,
            f"capture resumed after {ev.outage_s:.1f} s: {ev.description}"[:REASON_MAX]))
        self._status(time.monotonic(), force=True)

    # --- SIGHUP -----------------------------------------------------------------------------
    def reload(self) -> None:
        """Build the new parts completely, then swap them between two blocks; on any failure
        keep the running ones, log one line and raise the config_reload_ok alarm."""
        self.notifier.reloading()
        self.notifier.maybe_ping()
        t0 = time.monotonic()
        clock = self.pipeline.clock_s
        try:
            if self.load_config is None:
                raise AgentError("this run has no config loader to reload from")
            self.base_cfg = self.load_config()
            new = store_config(self.base_cfg)
            parts = build_live_parts(new, self.pipeline.rate)
        except Exception as e:  # noqa: BLE001 - whatever went wrong, the old config keeps running
            log.error("reload refused, the previous configuration keeps running: %s",
                      one_line(e))
            self.monitor.observe("config_reload_ok", 0.0, clock)
            if "config_reload_ok" not in self.monitor.held_alarms:
                self.monitor.service_alarm(AlarmEvent(
                    "config_reload_ok", "system", "raised", 0.0, 1.0, clock,
                    f"reload refused: {one_line(e)}"[:REASON_MAX]))
            self.notifier.ready(self.status_text())
            return
        pending = restart_needed(self.cfg, new)
        self._swap(parts)
        self.outlets.replace(parts.actions, parts.policy.unknown_label)
        p, mon = self.pipeline, self.monitor
        mon.replace_rules(parts.rules, parts.rollup_rules)
        mon.k = parts.cfg.monitoring.k
        self.cfg = merge_live(self.cfg, new)
        self.reloads += 1
        mon.observe("config_reload_ok", 1.0, clock)
        if "config_reload_ok" in mon.held_alarms:
            mon.service_alarm(AlarmEvent("config_reload_ok", "system", "cleared", 1.0, 1.0,
                                         clock, "reload applied"))
        update_birth = getattr(self.sink, "update_birth", None)
        if update_birth is not None:
            update_birth(self._birth())
        self.rollout.on_reload()
        log.info("reloaded at audio %.3f s in %.0f ms: model %s, mode %s (threshold %.3f), "
                 "addressing %s, %d alarm rules, actions: %s", clock,
                 (time.monotonic() - t0) * 1000, p.model.manifest.ref if p.model else "none",
                 p.policy.mode, p.policy.threshold,
                 f"wake ({p.wake.model.ref})" if p.wake is not None else "always",
                 len(parts.rules), parts.actions.describe())
        if pending:
            log.warning("changed settings need a restart and were not applied: %s",
                        ", ".join(pending))
        self.notifier.ready(self.status_text())

    def _swap(self, parts: LiveParts) -> None:
        """Put a new model and policy in, between two blocks; another rate rebuilds the
        segmenter on the same audio clock (agent.rollout.switch)."""
        old = self.pipeline.personal
        self.pipeline, decisions = retarget(self.pipeline, parts.model, parts.policy)
        self.decided(decisions)
        self.pipeline.wake = parts.wake  # a new wake stage starts with no window open
        if isinstance(old, Personalizer):
            old.close()  # its state is saved; another model starts adaptation afresh
        self.pipeline.personal = personalize(parts.cfg, self.pipeline.model,
                                             microphone=self.microphone, health=self.health)
        mon = self.monitor
        mon.rate = self.pipeline.rate
        mon.model_info = model_info(self.pipeline)
        mon.wake_stage = parts.wake is not None
        mon.agg.unknown_label = parts.policy.unknown_label or "unknown"
        note = mon.set_labels(list(self.pipeline.model.manifest.classes)
                              if self.pipeline.model else None)
        if note:
            log.info("%s", note)
        mon.baselines = [b for b in mon.baselines if b.name != "training"] + \
            ([parts.training] if parts.training is not None else [])

    def switch_model(self) -> None:
        """A rollout moved the store's pointers: run what they now name (raises AgentError,
        leaving the running model in place, when it cannot be loaded)."""
        new = store_config(self.base_cfg)
        parts = build_live_parts(new, None)
        self._swap(parts)
        self.outlets.replace(parts.actions, parts.policy.unknown_label)
        self.cfg = merge_live(self.cfg, new)
        update_birth = getattr(self.sink, "update_birth", None)
        if update_birth is not None:
            update_birth(self._birth())
        log.info("model switched to %s (%s)", self.pipeline.model.manifest.ref
                 if self.pipeline.model else "none", self.monitor.model_info.get("slot"))
        self._status(time.monotonic(), force=True)

    # --- shutdown ---------------------------------------------------------------------------
    def drain(self) -> None:
        """After a stop: process what capture already queued, for at most DRAIN_ON_STOP_S;
        anything left after that is dropped (the stop promise wins over the last blocks)."""
        deadline = time.monotonic() + DRAIN_ON_STOP_S
        while time.monotonic() < deadline:
            self.notifier.maybe_ping()
            try:
                item = self.q.get(timeout=0.05)
            except queue.Empty:
                if not self.capture.is_alive():
                    return
                continue
            if item is _END:
                return
            if not isinstance(item, BaseException):
                self.handle(item)

    def close(self, stopped: bool, t_stop: float) -> bool:
        """Decide the utterance in progress, publish the last window, close files and sinks."""
        self.decided(self.pipeline.finish())
        if isinstance(self.pipeline.personal, Personalizer):
            self.pipeline.personal.close()
        # a stop leaves queued actions a short grace; the end of a file lets them run
        self.outlets.close(min(1.0, self.cfg.actions.timeout_s) if stopped else
                           ACTIONS_AT_END_S)
        self.outlets.report(self.monitor, self.pipeline.clock_s)
        self.monitor.finish(self.pipeline.clock_s)
        self.writer.close()
        self.capture.join(timeout=0.5)
        timeout = self.cfg.telemetry.drain_timeout_s
        if stopped:
            timeout = min(timeout, max(0.2, STOP_BUDGET_S - (time.monotonic() - t_stop)))
        assert self.sink is not None
        drained = self.sink.close(timeout)
        if not drained and stopped:
            log.warning("telemetry not delivered within %.1f s of the stop; it stays in the "
                        "outbox in %s and is sent on the next start", timeout,
                        self.cfg.state_path())
        return drained


def run(cfg: Config, stop: threading.Event | None = None, *, signals: Signals | None = None,
        load_config: Callable[[], Config] | None = None, notifier: Notifier | None = None,
        opener: Callable[[], Source] | None = None, live: bool = False,
        retry: Retry | None = None) -> RunSummary:
    """Run until the source ends or `stop` is set (or a stop signal is flagged in `signals`).

    `opener`/`live` replace the configured audio source (tests inject failing fakes);
    `load_config` re-reads the configuration on SIGHUP.
    """
    stop = stop or threading.Event()
    signals = signals or Signals()
    notifier = notifier or Notifier()
    svc = Service(cfg, stop, signals=signals, load_config=load_config, notifier=notifier,
                  opener=opener, live=live, retry=retry or Retry())
    t_stop = 0.0
    drained = False
    try:
        svc.start()
        svc.loop()
        stopped = not svc.ended
        t_stop = time.monotonic()
        notifier.stopping()
        if stopped:
            svc.drain()
    finally:
        stop.set()
        if not t_stop:  # an error: still try to publish what was measured
            t_stop = time.monotonic()
            stopped = True
        try:
            drained = svc.close(stopped, t_stop)
        finally:
            notifier.close()
    clock = svc.pipeline.clock_s
    return RunSummary(svc.writer.count, clock - svc.outage_s, svc.pipeline.dropped_frames,
                      svc.source_desc, svc.monitor.windows_emitted, drained, stopped, clock,
                      svc.outage_s, svc.reloads, svc.health.failing)
