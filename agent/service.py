"""The shell around the pure pipeline: builds it from config, runs capture and processing
threads, writes decisions locally, and stops cleanly on a signal or at the end of a file."""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from agent import __version__
from agent.audio.sources import AudioBlock, open_source
from agent.config import Config, to_dict
from agent.decision import Decision, Policy, Thresholds
from agent.drift import Baseline, DeviceBaselineLearner
from agent.errors import AgentError
from agent.metric_catalog import METRICS
from agent.model import ModelRunner
from agent.monitor import Monitor
from agent.pipeline import Pipeline
from agent.resources import calibration_dir, default_model_dir
from agent.telemetry.device_id import resolve_device_id
from agent.telemetry.sinks import Sink, make_sink

log = logging.getLogger("edge-voice-agent")


def load_model(cfg: Config) -> ModelRunner:
    return ModelRunner(cfg.model.path or default_model_dir(), threads=cfg.model.threads)


def load_policy(cfg: Config, model: ModelRunner) -> Policy:
    """The automation mode with its threshold: explicit, or the model's calibrated one."""
    m = model.manifest
    threshold = cfg.decision.threshold
    if threshold < 0:
        path = Path(cfg.model.thresholds) if cfg.model.thresholds else \
            calibration_dir(m.name) / "thresholds.json"
        t = Thresholds.read(path)
        if t.sha256 != m.sha256:
            raise AgentError(f"thresholds file {path} was calibrated for {t.model} "
                             f"(sha256 {t.sha256[:12]}…), not for {m.ref} (sha256 "
                             f"{m.sha256[:12]}…); recalibrate or set decision.threshold")
        threshold = t.threshold
    return Policy(cfg.decision.mode, threshold, m.unknown_label)


def build_pipeline(cfg: Config) -> Pipeline:
    if cfg.decision.mode == "off":
        model = load_model(cfg)  # still loaded: its manifest fixes the pipeline's rate
        return Pipeline(cfg.vad, model, Policy("off", 1.0, model.manifest.unknown_label))
    model = load_model(cfg)
    return Pipeline(cfg.vad, model, load_policy(cfg, model))


def config_digest(cfg: Config) -> str:
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_info(pipeline: Pipeline) -> dict:
    m = pipeline.model.manifest if pipeline.model else None
    return {"name": m.name if m else "none", "version": m.version if m else "",
            "sha256": m.sha256 if m else "", "mode": pipeline.policy.mode,
            "threshold": round(pipeline.policy.threshold, 6)}


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


def load_training_baseline(cfg: Config, pipeline: Pipeline) -> Baseline | None:
    if pipeline.model is None:
        return None
    path = Path(cfg.monitoring.baseline) if cfg.monitoring.baseline else \
        calibration_dir(pipeline.model.manifest.name) / "baseline.json"
    if not path.is_file():
        if cfg.monitoring.baseline:
            raise AgentError(f"training baseline {path} does not exist; run "
                             "'edge-voice-agent calibrate' or fix monitoring.baseline")
        log.warning("no training baseline at %s: drift is scored against the device baseline "
                    "only (run 'edge-voice-agent calibrate')", path)
        return None
    b = Baseline.load(path)
    if b.meta.get("model_sha256") not in (None, pipeline.model.manifest.sha256):
        log.warning("training baseline %s was made for another model build; recalibrate", path)
    return Baseline(name="training", hists=b.hists, meta=b.meta)


def build_monitor(cfg: Config, pipeline: Pipeline, device_id: str, emit) -> Monitor:
    state = cfg.state_path()
    baselines = [b for b in [load_training_baseline(cfg, pipeline)] if b is not None]
    ref = pipeline.model.manifest.ref if pipeline.model else "none"
    learner = DeviceBaselineLearner.resume(
        state / "device-baseline.json", cfg.monitoring.device_baseline_s,
        meta={"model": ref}, min_utterances=cfg.monitoring.device_baseline_min_utterances)
    log.info("device baseline: %s", learner.note)
    return Monitor(emit=emit, device_id=device_id, model_info=model_info(pipeline),
                   rate=pipeline.rate, window_s=cfg.monitoring.window_s,
                   drift_method=cfg.monitoring.drift_method,
                   drift_span_s=cfg.monitoring.drift_span_s, k=cfg.monitoring.k,
                   baselines=baselines, learner=learner, rules=cfg.alarm_rules(),
                   rollup_rules=cfg.rollup_alarm_rules(),
                   unknown_label=pipeline.policy.unknown_label, prefix=cfg.telemetry.prefix)


def build_sink(cfg: Config, device_id: str, birth: dict) -> Sink:
    from agent.telemetry.mqtt import MqttOptions
    from agent.telemetry.outbox import OutboxLimits

    t = cfg.telemetry
    return make_sink(t.sink, device_id=device_id, prefix=t.prefix, state_dir=cfg.state_path(),
                     birth=birth,
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


class DecisionWriter:
    """Decisions as JSON Lines to a local file (appended, flushed per line) or stdout."""

    def __init__(self, target: str) -> None:
        self.target = target
        if target == "-":
            self._f: IO[str] = sys.stdout
        else:
            path = Path(target)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._f = open(path, "a", encoding="utf-8")
            except OSError as e:
                raise AgentError(f"decisions file {path} cannot be opened ({e.strerror}); choose "
                                 "a writable --decisions path or --state-dir") from None
        self.count = 0

    def write(self, decisions: list[Decision]) -> None:
        for d in decisions:
            self._f.write(json.dumps(d.to_json()) + "\n")
            self.count += 1
        if decisions:
            self._f.flush()

    def close(self) -> None:
        if self._f is not sys.stdout:
            self._f.close()


@dataclass
class RunSummary:
    decisions: int
    audio_seconds: float
    dropped_frames: int
    source: str
    windows: int = 0
    drained: bool = True


_END = object()


class Capture(threading.Thread):
    """Reads the source into a bounded queue. A live device never waits for the pipeline:
    when the queue is full the block is dropped and counted. A file waits instead (no loss)."""

    def __init__(self, source, q: queue.Queue, stop: threading.Event) -> None:
        super().__init__(name="capture", daemon=True)
        self.source, self.q, self.stop = source, q, stop
        self._overflow = 0
        self._lock = threading.Lock()

    def take_overflow(self) -> int:
        """Frames dropped on a full queue since the last call."""
        with self._lock:
            n, self._overflow = self._overflow, 0
        return n

    def run(self) -> None:
        try:
            for block in self.source:
                if self.source.live:
                    try:
                        self.q.put_nowait(block)
                    except queue.Full:
                        with self._lock:
                            self._overflow += len(block.samples)
                else:
                    while not self.stop.is_set():
                        try:
                            self.q.put(block, timeout=0.5)
                            break
                        except queue.Full:
                            continue
                if self.stop.is_set():
                    break
        except BaseException as e:  # handed to the pipeline thread, which reports it
            self.q.put(e)
            return
        self.q.put(_END)


def run(cfg: Config, stop: threading.Event | None = None) -> RunSummary:
    """Run until the source ends or `stop` is set; returns what was done."""
    stop = stop or threading.Event()
    pipeline = build_pipeline(cfg)
    source = open_source(cfg.audio.source, cfg.audio.block_ms, cfg.audio.speed,
                         cfg.audio.mic_rate, cfg.audio.mic_channels, stop)
    telemetry_on = cfg.telemetry.sink != "none"
    device_id = resolve_device_id(cfg.agent.device_id) if telemetry_on else \
        (cfg.agent.device_id or "local")
    sink: Sink | None = None
    monitor = build_monitor(cfg, pipeline, device_id, lambda m: sink.publish(m))
    sink = build_sink(cfg, device_id, birth_payload(
        cfg, pipeline, device_id, monitor.boot_id, [b.name for b in monitor.baselines]))
    pipeline.observers.append(monitor)
    writer = DecisionWriter(cfg.decisions_target())
    log.info("listening to %s; model %s; mode %s (threshold %.3f); decisions → %s",
             source.describe(), pipeline.model.manifest.ref if pipeline.model else "none",
             pipeline.policy.mode, pipeline.policy.threshold, writer.target)
    q: queue.Queue = queue.Queue(maxsize=cfg.audio.queue_blocks)
    capture = Capture(source, q, stop)
    capture.start()
    try:
        while True:
            try:
                item = q.get(timeout=0.5)
            except queue.Empty:
                if stop.is_set() and not capture.is_alive():
                    break
                continue
            if item is _END:
                break
            if isinstance(item, BaseException):
                raise item
            lost = capture.take_overflow()
            if lost:  # queue overflow counts as dropped input too
                item = AudioBlock(item.samples, item.rate, item.dropped + lost)
            if source.live or cfg.audio.speed > 0:  # an unpaced file fills the queue on purpose
                monitor.queue_depth = q.qsize()
            writer.write(pipeline.feed(item))
        writer.write(pipeline.finish())
        monitor.finish(pipeline.clock_s)
    finally:
        stop.set()
        writer.close()
        capture.join(timeout=2.0)
        drained = sink.close(cfg.telemetry.drain_timeout_s)
    return RunSummary(writer.count, pipeline.clock_s, pipeline.dropped_frames,
                      source.describe(), monitor.windows_emitted, drained)


def install_signal_handlers(stop: threading.Event) -> None:
    def handler(signum, frame):
        log.info("received %s; finishing", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
