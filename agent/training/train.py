"""Recordings → features → leave-one-speaker-out evaluation → final fit → ONNX + manifest.

Model selection and every quoted accuracy use leave-one-speaker-out folds: the device meets
voices it never heard, and takes of one speaker are near-duplicates, so a random split would
flatter the model. The acceptance threshold is fixed on the same out-of-fold predictions.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.features import FeatureParams, extract_batch
from agent.model import MANIFEST, ONNX_FILE, Manifest, sha256_file
from agent.training.dataset import Clip, discover, load_audio

DIGITS = tuple(str(d) for d in range(10))


@dataclass
class TrainResult:
    model_dir: Path
    thresholds_path: Path
    loso: dict[str, float]
    threshold: float
    coverage: float
    precision: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def make_classifier(seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000,
                                                              random_state=seed))


def loso_predictions(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int
                     ) -> np.ndarray:
    """Out-of-fold probabilities, each speaker predicted by a model that never heard them."""
    oof = np.zeros((len(y), len(DIGITS)), np.float32)
    for g in np.unique(groups):
        test = groups == g
        clf = make_classifier(seed).fit(x[~test], y[~test])
        oof[test] = clf.predict_proba(x[test])
    return oof


def threshold_for_precision(conf: np.ndarray, correct: np.ndarray, target: float
                            ) -> tuple[float, float, float]:
    """Lowest confidence threshold whose accepted decisions reach `target` precision.

    Returns (threshold, coverage, precision). Scans thresholds from the most confident down and
    keeps the largest accepted set that still meets the target.
    """
    order = np.argsort(-conf)
    hits = np.cumsum(correct[order])
    n = np.arange(1, len(conf) + 1)
    prec = hits / n
    ok = np.flatnonzero(prec >= target)
    if len(ok) == 0:
        return 1.0, 0.0, float("nan")
    k = ok[-1]
    thr = float(conf[order[k]])
    accepted = conf >= thr
    return thr, float(accepted.mean()), float(correct[accepted].mean())


def train(data_dir: str | Path, out_dir: str | Path, calibration_dir: str | Path, *,
          name: str = "fsdd-digits", version: str = "0.1.0", seed: int = 0,
          speakers: set[str] | None = None, limit_per_class: int | None = None,
          target_precision: float = 0.99, log=print) -> TrainResult:
    t0 = time.perf_counter()
    params = FeatureParams()
    clips = discover(data_dir, speakers)
    if limit_per_class:
        clips = _subset(clips, limit_per_class)
    log(f"train: {len(clips)} clips from {len({c.speaker for c in clips})} speakers")
    x = extract_batch([load_audio(c.path, params.sample_rate) for c in clips], params)
    y = np.array([c.label for c in clips])
    groups = np.array([c.speaker for c in clips])
    if len(np.unique(groups)) < 2:
        raise SystemExit("train: leave-one-speaker-out needs clips from at least two speakers")
    oof = loso_predictions(x, y, groups, seed)
    pred = np.array(DIGITS)[oof.argmax(1)]
    correct = pred == y
    loso = {str(g): float(correct[groups == g].mean()) for g in np.unique(groups)}
    loso["mean"] = float(np.mean([loso[g] for g in np.unique(groups)]))
    loso["worst"] = float(min(loso[g] for g in np.unique(groups)))
    thr, cov, prec = threshold_for_precision(oof.max(1), correct, target_precision)
    log(f"train: LOSO accuracy mean {loso['mean']:.3f} worst {loso['worst']:.3f}; threshold "
        f"{thr:.3f} → coverage {cov:.3f} at precision {prec:.3f}")

    clf = make_classifier(seed).fit(x, y)
    if list(clf.classes_) != list(DIGITS):
        raise SystemExit(f"train: classes {list(clf.classes_)} are not the ten digits")
    model_dir, thr_path = export(clf, params, Path(out_dir), Path(calibration_dir), name=name,
                                 version=version, seed=seed, clips=clips, loso=loso,
                                 threshold=thr, coverage=cov, precision=prec,
                                 target_precision=target_precision, x_check=x[:64])
    secs = time.perf_counter() - t0
    log(f"train: wrote {model_dir} and {thr_path} in {secs:.1f} s")
    return TrainResult(model_dir, thr_path, loso, thr, cov, prec, secs)


def _subset(clips: list[Clip], per_class: int) -> list[Clip]:
    seen: dict[tuple[str, str], int] = {}
    out = []
    for c in clips:
        k = (c.speaker, c.label)
        if seen.get(k, 0) < per_class:
            seen[k] = seen.get(k, 0) + 1
            out.append(c)
    return out


def export(clf, params: FeatureParams, out_dir: Path, calibration_dir: Path, *, name: str,
           version: str, seed: int, clips: list[Clip], loso: dict[str, float], threshold: float,
           coverage: float, precision: float, target_precision: float,
           x_check: np.ndarray) -> tuple[Path, Path]:
    """Write model.onnx, manifest.json and thresholds.json; verify ONNX equals scikit-learn."""
    import onnxruntime as ort
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    out_dir.mkdir(parents=True, exist_ok=True)
    calibration_dir.mkdir(parents=True, exist_ok=True)
    onx = to_onnx(clf, initial_types=[("features", FloatTensorType([None, params.dim]))],
                  options={id(clf.steps[-1][1]): {"zipmap": False}}, target_opset=17)
    onnx_path = out_dir / ONNX_FILE
    onnx_path.write_bytes(onx.SerializeToString())
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(["probabilities"], {"features": x_check.astype(np.float32)})[0]
    want = clf.predict_proba(x_check)
    gap = float(np.abs(got - want).max())
    if gap > 1e-4:
        raise SystemExit(f"train: ONNX export differs from scikit-learn by {gap:.2e}")
    digest = sha256_file(onnx_path)
    manifest = Manifest(
        name=name, version=version, classes=DIGITS, sample_rate=params.sample_rate,
        features=params, sha256=digest,
        training={"data": "Free Spoken Digit Dataset (CC BY-SA 4.0)", "clips": len(clips),
                  "speakers": sorted({c.speaker for c in clips}), "seed": seed,
                  "classifier": " → ".join(type(s).__name__ for _, s in clf.steps),
                  "loso_accuracy": {k: round(v, 4) for k, v in loso.items()},
                  "onnx_max_abs_diff": gap})
    (out_dir / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    thr_path = calibration_dir / "thresholds.json"
    thr_path.write_text(json.dumps({
        "model": manifest.ref, "sha256": digest, "threshold": round(threshold, 6),
        "target_precision": target_precision,
        "out_of_fold": {"coverage": round(coverage, 4), "precision": round(precision, 4),
                        "method": "leave-one-speaker-out"}}, indent=2) + "\n")
    return out_dir, thr_path
