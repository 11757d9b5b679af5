"""The training baseline: what the monitoring metrics look like on the data the model knows.

The training clips are laid end to end into a long "microphone" stream (pauses, level changes,
a low noise floor, as a device hears them) and run through the very pipeline and monitor the
daemon uses, so audio, VAD and system metrics are measured the same way live and here. The
model-stage metrics (confidence, margin) come from the out-of-fold predictions saved by
training: the shipped model has heard these speakers, so its confidence on them would be too
high to stand for a new voice.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from agent.audio.sources import AudioBlock
from agent.config import DecisionConfig, VadConfig
from agent.monitoring.drift import Baseline
from agent.monitoring.monitor import Monitor
from agent.monitoring.windows import Histogram, WindowSummary, merge_summaries
from agent.recognition.decision import Policy
from agent.recognition.model import ModelRunner
from agent.recognition.pipeline import Pipeline
from agent.training.dataset import Clip, load_audio

OOF_FILE = "oof.npz"
BASELINE_FILE = "baseline.json"


def pink_noise(n: int, rng: np.random.Generator, chunk: int = 1 << 18) -> np.ndarray:
    """Unit-RMS 1/f noise, made in power-of-two chunks (one FFT of an odd length is slow)."""
    k = np.arange(chunk // 2 + 1, dtype=np.float64)
    k[0] = 1.0
    parts = []
    for _ in range(-(-n // chunk)):
        x = np.fft.irfft(np.fft.rfft(rng.standard_normal(chunk)) / np.sqrt(k), chunk)
        parts.append(x / np.sqrt(np.mean(x ** 2)))
    return np.concatenate(parts)[:n].astype(np.float32)


def lay_out(clips: list[np.ndarray], rate: int, seed: int = 0, gap_s: tuple = (1.0, 3.0),
            gain_db: tuple = (-6.0, 3.0), floor_dbfs: float = -60.0) -> np.ndarray:
    """Clips end to end over a pink-noise floor with random pauses and level changes."""
    rnd = random.Random(seed)
    gaps = [int(rnd.uniform(*gap_s) * rate) for _ in clips]
    total = 2 * rate + sum(len(c) for c in clips) + sum(gaps)
    x = pink_noise(total, np.random.default_rng(seed)) * 10 ** (floor_dbfs / 20)
    t = 2 * rate
    for c, g in zip(clips, gaps, strict=True):
        x[t:t + len(c)] += c * 10 ** (rnd.uniform(*gain_db) / 20)
        t += len(c) + g
    return x


def stream_summary(model: ModelRunner, audio: np.ndarray, vad: VadConfig,
                   threshold: float, per_class: tuple[tuple[str, float], ...] = ()
                   ) -> WindowSummary:
    """Run the daemon's pipeline and monitor (its default policy: thresholds and addressing)
    over `audio`; merge every window into one."""
    windows: list[WindowSummary] = []
    m = model.manifest
    pipeline = Pipeline(vad, model, Policy("partial", threshold, m.unknown_label, per_class,
                                           DecisionConfig().addressing()))
    monitor = Monitor(emit=lambda msg: None, device_id="calibration",
                      model_info={"name": m.name}, rate=m.sample_rate, window_s=60.0,
                      unknown_label=m.unknown_label, on_window=windows.append)
    pipeline.observers.append(monitor)
    step = m.sample_rate * 2
    for i in range(0, len(audio), step):
        pipeline.feed(AudioBlock(audio[i:i + step, None], m.sample_rate))
    pipeline.finish()
    monitor.finish(pipeline.clock_s)
    return merge_summaries(windows)


def model_stage_hists(oof_probs: np.ndarray) -> dict[str, Histogram]:
    from agent.monitoring.metric_catalog import BY_NAME

    top2 = np.sort(oof_probs, axis=1)[:, -2:]
    conf = Histogram.for_metric(BY_NAME["confidence"])
    conf.add(top2[:, 1])
    margin = Histogram.for_metric(BY_NAME["margin"])
    margin.add(top2[:, 1] - top2[:, 0])
    digit = Histogram.for_metric(BY_NAME["digit_confidence"])
    digit.add(oof_probs[:, :-1].max(1))  # the known classes (the digits); "unknown" is last
    return {"confidence": conf, "margin": margin, "digit_confidence": digit}


def write_reference(model_dir: Path, clips: list[Clip], calibration_dir: Path, *,
                    log=print) -> Path:
    """Write calibration_dir/head_input_reference.npz (agent.personal.reference): the head
    inputs of the labelled training recordings `clips`, through the daemon's own front end."""
    from agent.personal.reference import REFERENCE_FILE, fit_reference

    model = ModelRunner(model_dir)
    m = model.manifest
    known = tuple(c for c in m.classes if c != m.unknown_label)
    use = [c for c in clips if c.label in known]
    x = np.stack([model.features(load_audio(c.path, m.sample_rate)) for c in use])
    speakers = sorted({c.speaker for c in use})
    ref = fit_reference(x, np.array([c.label for c in use]), known, model=m.ref, sha256=m.sha256,
                        source=f"{len(use)} training recordings of {len(speakers)} speakers")
    calibration_dir.mkdir(parents=True, exist_ok=True)
    out = calibration_dir / REFERENCE_FILE
    ref.save(out)
    log(f"calibrate: wrote {out} (head-input reference from {ref.source})")
    return out


def calibrate(model_dir: Path, clips: list[Clip], calibration_dir: Path, *, seed: int = 0,
              vad: VadConfig | None = None, log=print,
              reference_clips: list[Clip] | None = None) -> Path:
    """Write calibration_dir/baseline.json and the head-input reference for the model in
    model_dir (the reference from `reference_clips`, default `clips`)."""
    write_reference(model_dir, reference_clips if reference_clips is not None else clips,
                    calibration_dir, log=log)
    rate = ModelRunner(model_dir).manifest.sample_rate
    return write_baseline(model_dir, [load_audio(c.path, rate) for c in clips], calibration_dir,
                          seed=seed, vad=vad, log=log)


def write_baseline(model_dir: Path, clips: list[np.ndarray], calibration_dir: Path, *,
                   seed: int = 0, vad: VadConfig | None = None, log=print) -> Path:
    """Write calibration_dir/baseline.json: `clips` (audio at the model's rate) laid out as a
    stream through the daemon's pipeline and monitor; model stage from oof.npz if present."""
    model = ModelRunner(model_dir)
    m = model.manifest
    thresholds = json.loads((calibration_dir / "thresholds.json").read_text())
    audio = lay_out(clips, m.sample_rate, seed)
    log(f"calibrate: {len(clips)} clips laid out as {len(audio) / m.sample_rate / 60:.1f} min "
        "of stream")
    summary = stream_summary(model, audio, vad or VadConfig(), float(thresholds["threshold"]),
                             tuple(sorted((str(k), float(v)) for k, v in
                                          (thresholds.get("per_class") or {}).items())))
    hists = dict(summary.hists)
    oof_path = calibration_dir / OOF_FILE
    source = "stream (shipped model)"
    if oof_path.is_file():
        oof = np.load(oof_path)
        hists.update(model_stage_hists(oof["probabilities"]))
        source = "out-of-fold predictions (leave-one-speaker-out)"
    baseline = Baseline("training", hists, {
        "model": m.ref, "model_sha256": m.sha256, "clips": len(clips),
        "stream_minutes": round(len(audio) / m.sample_rate / 60, 1),
        "utterances": summary.counts.get("utterances", 0), "model_stage_source": source,
        "seed": seed})
    out = calibration_dir / BASELINE_FILE
    baseline.save(out)
    log(f"calibrate: wrote {out} ({summary.counts.get('utterances', 0)} utterances; model "
        f"stage from {source})")
    return out
