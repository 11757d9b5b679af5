"""Recordings → data → speaker-grouped evaluation → final fit → the shipped artefacts.

One seeded run writes everything the daemon and the operator need: `models/<name>/` (the two
front-end graphs taken from the pinned wheel, `head.onnx` and `rejector.onnx` with their
calibration inside, `manifest.json` listing every component, `MODEL_CARD.md`,
`evaluation.json`) and `calibration/<name>/thresholds.json`, `oof.npz` and `baseline.json`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.recognition.model import ModelRunner
from agent.training import card
from agent.training.calibrate import OOF_FILE, calibrate
from agent.training.dataset import load_audio
from agent.training.evaluate import build_dataset, loso
from agent.training.export import check_against_sklearn, head_to_onnx, rejector_to_onnx
from agent.training.recipe import CLASSES, UNKNOWN, Recipe, fit_head, fit_rejector

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / \
    "edge-voice-agent"


def _sc(r: dict, key: str) -> float | None:
    return r.get("speech_commands", {}).get(key)


def _fa(r: dict, kind: str) -> float | None:
    return r.get("false_activations", {}).get(kind, {}).get("per_hour")


# The targets, as (label, threshold, how to read the report, higher is better).
TARGETS = [
    ("accuracy, mean speaker (LOSO)", 0.99, lambda r: r["conditions"]["clean"]["mean"], True),
    ("accuracy, worst speaker (LOSO)", 0.97, lambda r: r["conditions"]["clean"]["worst"], True),
    ("accuracy, white noise 10 dB SNR", 0.93, lambda r: r["conditions"]["white10"]["mean"],
     True),
    ("accuracy, babble 10 dB SNR", 0.93, lambda r: r["conditions"]["babble10"]["mean"], True),
    ("accuracy, full-band synthetic voices never trained on", 0.95,
     lambda r: r["heldout_voices"]["accuracy"], True),
    ("precision of accepted decisions, worst held-out group (thresholds chosen without it)",
     0.99, lambda r: r["threshold"].get("nested_worst"), True),
    ("precision of accepted decisions, worst group", 0.99,
     lambda r: r["threshold"].get("worst_group"), True),
    ("non-digit words accepted, worst held-out group (thresholds chosen without it)", 0.005,
     lambda r: r["threshold"].get("nested_words_worst"), False),
    ("coverage at the thresholds (FSDD, LOSO)", 0.90, lambda r: r["threshold"]["coverage"],
     True),
    ("Speech Commands held-out speakers: digits covered (correct and accepted)", 0.85,
     lambda r: _sc(r, "digits_covered"), True),
    ("Speech Commands held-out speakers: non-digit words accepted", 0.005,
     lambda r: _sc(r, "words_accepted"), False),
    ("false activations per hour, real people talking (held-out speakers)", 2.0,
     lambda r: _fa(r, "talk"), False),
    ("false activations per hour, real command words (held-out speakers)", 2.0,
     lambda r: _fa(r, "words"), False),
    ("false activations per hour, music", 0.5, lambda r: _fa(r, "music"), False),
    ("false activations per hour, noise", 0.5, lambda r: _fa(r, "noise"), False),
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


def target_table(report: dict[str, Any], seconds: float) -> dict[str, tuple]:
    out = {}
    for name, target, get, higher in TARGETS:
        v = get(report)
        if v is None:
            out[name] = (f"{'≥' if higher else '≤'} {target:g}", "not measured", False)
            continue
        ok = v >= target if higher else v <= target
        out[name] = (f"{'≥' if higher else '≤'} {target:g}", f"{v:.3f}", ok)
    out["training time, 2 cores"] = ("≤ 30 min", f"{seconds / 60:.1f} min", seconds <= 1800)
    return out


def write_decision_files(out_dir: Path, calibration_dir: Path, manifest, pub: dict,
                         oof: dict, max_word_rate: float, out_of_fold: dict) -> None:
    """evaluation.json beside the model; thresholds.json (the model's build, its thresholds
    and how they were chosen, `out_of_fold`) and the out-of-fold pool they were chosen on
    (OOF_FILE) in the calibration directory."""
    calibration_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "evaluation.json").write_text(json.dumps(pub, indent=1) + "\n")
    th = pub["threshold"]
    (calibration_dir / "thresholds.json").write_text(json.dumps({
        "model": manifest.ref, "sha256": manifest.sha256, "threshold": round(th["value"], 6),
        "per_class": {k: round(v, 6) for k, v in th["per_class"].items()},
        "target_precision": th["target_precision"], "max_word_rate": max_word_rate,
        "out_of_fold": out_of_fold}, indent=2) + "\n")
    np.savez_compressed(calibration_dir / OOF_FILE, **oof)


def measure_latency(model_dir: Path, clips: list[np.ndarray], n: int = 100) -> float:
    """Median front end + head + rejector time per utterance, one ONNX Runtime thread."""
    runner = ModelRunner(model_dir, threads=1)
    times = []
    for x in (clips * (1 + n // max(1, len(clips))))[:n]:
        t0 = time.perf_counter()
        runner.predict(runner.features(x)[None])
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def train(data_dir: str | Path, out_dir: str | Path, calibration_dir: str | Path, *,
          name: str = "fsdd-digits", version: str = "3.0.0", seed: int = 0,
          speakers: set[str] | None = None, limit_per_class: int | None = None,
          recipe: Recipe | None = None, cache: Path | None = None, workers: int = 2,
          speech_commands: Path | None = None, talk: Path | None = None,
          log=print) -> TrainResult:
    from agent.recognition.frontend import FrontendParams
    from agent.training.modeldir import write_model_directory

    t0 = time.perf_counter()
    r = recipe or Recipe()
    out_dir, calibration_dir = Path(out_dir), Path(calibration_dir)
    dim = FrontendParams().dim
    ds = build_dataset(Path(data_dir), cache or DEFAULT_CACHE, r, seed, speakers,
                       limit_per_class, workers, log, speech_commands, talk)
    report = loso(ds, r, seed, workers, log)
    t, platt = report["calibration"]["temperature"], tuple(report["calibration"]["platt"])
    sc_speakers = sorted({str(s) for s in ds.sc.group}) if ds.sc is not None else []
    talk_speakers = sorted(ds.talk.hours) if ds.talk is not None else []
    xh, yh, xr, yr = ds.train_sets(ds.speakers, sc_speakers, talk_speakers)
    log(f"train: final fit on {len(yh)} digit examples, rejector on {len(yr)}")
    head, rejector = fit_head(xh, yh, r, seed), fit_rejector(xr, yr, r, seed)
    head_blob, rej_blob = head_to_onnx(head, t, dim), rejector_to_onnx(rejector, platt, dim)
    probe = np.concatenate([ds.fsdd.x[:128], ds.words.x[:128], ds.sounds.x[:64]])
    gap = check_against_sklearn(head_blob, head, t, rej_blob, rejector, platt, probe)
    if gap > 1e-4:
        raise SystemExit(f"train: ONNX export differs from scikit-learn by {gap:.2e}")
    pub = public(report)
    data = "Free Spoken Digit Dataset (CC BY-SA 4.0) + synthetic speech"
    if ds.sc is not None:
        data += " + Speech Commands (CC BY 4.0, Warden 2018)"
    if ds.talk is not None:
        data += " + speechocean762 read sentences as negatives (CC BY 4.0, Speechocean/Xiaomi)"
    manifest = write_model_directory(
        out_dir, name=name, version=version, classes=CLASSES, unknown_label=UNKNOWN,
        heads={"head": head_blob, "rejector": rej_blob},
        training={"data": data, "counts": ds.counts, "speakers": pub["speakers"],
                  "seed": seed, "recipe": r.to_dict(),
                  "head": " → ".join(type(s).__name__ for _, s in head.steps) +
                  " → temperature softmax",
                  "rejector": " → ".join(type(s).__name__ for _, s in rejector.steps) +
                  " → Platt sigmoid", "composition": "P(digit k) = p_in * P_head(k), "
                  "P(unknown) = 1 - p_in", "temperature": t, "platt": list(platt),
                  "onnx_max_abs_diff": gap,
                  "loso_accuracy": {k: round(v["mean"], 4)
                                    for k, v in pub["conditions"].items()}})
    th = pub["threshold"]
    write_decision_files(out_dir, calibration_dir, manifest, pub, report["_oof"],
                         th["max_word_rate"], {
        "coverage": round(th["coverage"], 4), "precision": round(th["precision"] or 0.0, 4),
        "worst_group_precision": th["worst_group"],
        "nested_worst_group_precision": th["nested_worst"],
        "nested_worst_group_words_accepted": th["nested_words_worst"],
        "method": "agent/training/thresholds.py choose_thresholds over "
        f"{OOF_FILE} (pool_probabilities, pool_labels, pool_groups): the digits' precision "
        "target and max_word_rate hold in every held-out group (each FSDD speaker, each "
        "Speech Commands speaker group)"})
    calibrate(out_dir, ds.clips, calibration_dir, seed=seed, log=log)
    latency = measure_latency(out_dir, [load_audio(c.path, 16000) for c in ds.clips[::50]])
    secs = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in out_dir.glob("*.onnx"))
    (out_dir / "MODEL_CARD.md").write_text(card.render(
        manifest.to_dict(), pub, r.to_dict(), size, latency, secs, target_table(pub, secs)))
    log(f"train: wrote {out_dir} ({size / 1e6:.2f} MB of graphs, {latency:.2f} ms per "
        f"utterance) and {calibration_dir} in {secs / 60:.1f} min")
    return TrainResult(out_dir, calibration_dir, report, size, latency, secs)
