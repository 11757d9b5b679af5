"""The shell around the pure pipeline: builds it from config, runs capture and processing
threads, writes decisions locally, and stops cleanly on a signal or at the end of a file."""

from __future__ import annotations

import json
import logging
import queue
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from agent.audio.sources import AudioBlock, open_source
from agent.config import Config
from agent.decision import Decision, Policy, Thresholds
from agent.errors import AgentError
from agent.model import ModelRunner
from agent.pipeline import Pipeline
from agent.resources import calibration_dir, default_model_dir

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
            writer.write(pipeline.feed(item))
        writer.write(pipeline.finish())
    finally:
        stop.set()
        writer.close()
        capture.join(timeout=2.0)
    return RunSummary(writer.count, pipeline.clock_s, pipeline.dropped_frames,
                      source.describe())


def install_signal_handlers(stop: threading.Event) -> None:
    def handler(signum, frame):
        log.info("received %s; finishing", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
