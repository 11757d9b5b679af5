"""Recordings → data → leave-one-speaker-out evaluation → final fit → the shipped artefacts.

One seeded run writes everything the daemon and the operator need: `models/<name>/` with the
pretrained front-end graphs, `head.onnx` (calibrated probabilities inside), `manifest.json`,
`NOTICE`, `MODEL_CARD.md`, `evaluation.json`, and
`calibration/<name>/thresholds.json`, `oof.npz` and `baseline.json`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.frontend import FrontendParams
from agent.model import ModelRunner
from agent.training import card
from agent.training.calibrate import OOF_FILE, calibrate
from agent.training.dataset import load_audio
from agent.training.evaluate import build_dataset, loso
from agent.training.export import check_against_sklearn, to_onnx_bytes
from agent.training.modeldir import write_model_directory
from agent.training.recipe import CLASSES, UNKNOWN, Recipe, fit

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / \
    "edge-voice-agent"

# The targets, as (label, threshold, how to read the report, higher is better).
TARGETS = [
    ("accuracy, clean", 0.95, lambda r: r["conditions"]["clean"]["mean"], True),
    ("accuracy, worst single speaker", 0.90, lambda r: r["conditions"]["clean"]["worst"], True),
    ("accuracy, white noise at 10 dB SNR", 0.85, lambda r: r["conditions"]["snr10"]["mean"],
     True),
    ("accuracy, input 20 dB quieter", 0.95, lambda r: r["conditions"]["quiet20"]["mean"], True),
    ("precision of accepted decisions", 0.99, lambda r: r["threshold"]["precision"], True),
    ("coverage at the threshold", 0.85, lambda r: r["threshold"]["coverage"], True),
    ("false accepts on non-digit negatives", 0.02, lambda r: r["negatives"]["false_accepts"],
     False),
    ("expected calibration error", 0.03, lambda r: r["calibration"]["ece"], False),
]


@dataclass
class TrainResult:
    model_dir: Path
    calibration_dir: Path
    report: dict[str, Any]
    size_bytes: int
    latency_ms: float
    seconds: float


def public(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if not k.startswith("_")}


def target_table(report: dict[str, Any], size: int, latency: float) -> dict[str, tuple]:
    out = {}
    for name, target, get, higher in TARGETS:
        v = get(report)
        ok = v is not None and (v >= target if higher else v <= target)
        out[name] = (f"{'≥' if higher else '≤'} {target:g}", f"{v:.3f}", ok)
    out["ONNX model size"] = ("≤ 5 MB", f"{size / 1e6:.2f} MB", size <= 5e6)
    out["features + inference per utterance"] = ("≤ 2 ms", f"{latency:.2f} ms", latency <= 2)
    return out


def measure_latency(model_dir: Path, clips: list[np.ndarray], n: int = 200) -> float:
    """Median features + inference time per utterance, one ONNX Runtime thread."""
    runner = ModelRunner(model_dir, threads=1)
    times = []
    for x in (clips * (1 + n // max(1, len(clips))))[:n]:
        t0 = time.perf_counter()
        runner.predict(runner.features(x)[None])
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def train(data_dir: str | Path, out_dir: str | Path, calibration_dir: str | Path, *,
          name: str = "fsdd-digits", version: str = "2.0.0", seed: int = 0,
          speakers: set[str] | None = None, limit_per_class: int | None = None,
          recipe: Recipe | None = None, cache: Path | None = None, workers: int = 2,
          log=print) -> TrainResult:
    t0 = time.perf_counter()
    r = recipe or Recipe()
    out_dir, calibration_dir = Path(out_dir), Path(calibration_dir)
    params = FrontendParams()
    ds = build_dataset(Path(data_dir), cache or DEFAULT_CACHE, r, seed, speakers,
                       limit_per_class, workers, log)
    report = loso(ds, r, seed, workers, log)
    t = report["calibration"]["temperature"]
    x, y = ds.train_set([str(s) for s in np.unique(ds.speakers)],
                        [*[str(s) for s in np.unique(ds.speakers)], "negA", "negB",
                         "synthetic"])
    log(f"train: final fit on {len(y)} examples")
    model = fit(x, y, r, seed)
    blob = to_onnx_bytes(model, t, params.dim)
    gap = check_against_sklearn(blob, model, t, ds.test["clean"][:256])
    if gap > 1e-4:
        raise SystemExit(f"train: ONNX export differs from scikit-learn by {gap:.2e}")
    calibration_dir.mkdir(parents=True, exist_ok=True)
    pub = public(report)
    manifest = write_model_directory(
        out_dir, name=name, version=version, classes=CLASSES, unknown_label=UNKNOWN,
        heads={"head": blob}, head_io={"head": ("features", "probabilities")}, params=params,
        training={"data": "Free Spoken Digit Dataset (CC BY-SA 4.0) + synthetic speech",
                  "counts": ds.counts, "speakers": pub["speakers"], "seed": seed,
                  "recipe": r.to_dict(), "classifier": " → ".join(
                      type(s).__name__ for _, s in model.steps) + " → temperature softmax",
                  "temperature": t, "onnx_max_abs_diff": gap,
                  "loso_accuracy": {k: round(v["mean"], 4)
                                    for k, v in pub["conditions"].items()}})
    digest = manifest.sha256
    (out_dir / "evaluation.json").write_text(json.dumps(pub, indent=1) + "\n")
    th = pub["threshold"]
    (calibration_dir / "thresholds.json").write_text(json.dumps({
        "model": manifest.ref, "sha256": digest, "threshold": round(th["value"], 6),
        "target_precision": th["target_precision"],
        "out_of_fold": {"coverage": round(th["coverage"], 4),
                        "precision": round(th["precision"], 4),
                        "method": "leave-one-speaker-out"}}, indent=2) + "\n")
    np.savez_compressed(calibration_dir / OOF_FILE, **report["_oof"])
    clips = ds.clips
    calibrate(out_dir, clips, calibration_dir, seed=seed, log=log)
    latency = measure_latency(out_dir, [load_audio(c.path, params.sample_rate)
                                        for c in clips[::25]])
    secs = time.perf_counter() - t0
    size = sum((out_dir / c.file).stat().st_size for c in manifest.components)
    (out_dir / "MODEL_CARD.md").write_text(card.render(
        manifest.to_dict(), pub, r.to_dict(), size, latency, secs,
        target_table(pub, size, latency)))
    log(f"train: wrote {out_dir} ({size / 1e6:.2f} MB, {latency:.2f} ms per utterance) and "
        f"{calibration_dir} in {secs / 60:.1f} min")
    return TrainResult(out_dir, calibration_dir, report, size, latency, secs)
