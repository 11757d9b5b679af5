"""What a model's training data looks like in head-input space: the reference that device
adaptation shifts towards and enrollment compares in.

A `Reference` holds, for one model build (its sha256):

* `mean`, `scale`: per-dimension mean and standard deviation of the head inputs of the training
  recordings (the front end is frozen, so these say where the head expects its input to be);
* `projection`: a linear discriminant projection (standardised head input → `k` dimensions,
  within-class covariance whitened), fitted on the same recordings, where a distance between two
  utterances means "how differently the model's classes would see them";
* `class_means`: each known class's mean in that projected space, `within`: the mean squared
  distance of a training utterance to its class mean there (the unit distances are scaled by).

It ships in the model's calibration folder (`head_input_reference.npz`, next to
`thresholds.json`), written by `edge-voice-agent calibrate` from the training recordings
(`fit_reference` is pure numpy, so the daemon never needs scikit-learn). Reading it is strict:
a reference made for another build is refused like a wrong thresholds file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.errors import AgentError

REFERENCE_FILE = "head_input_reference.npz"
FORMAT = 1
SHRINKAGE = 0.1   # within-class covariance shrunk toward its mean variance (few speakers)
MIN_SCALE = 1e-3  # a dimension that never varies in training is not divided by ~0


@dataclass(frozen=True)
class Reference:
    model: str
    sha256: str
    classes: tuple[str, ...]       # the known classes class_means are for, in that order
    mean: np.ndarray               # (dim,)
    scale: np.ndarray              # (dim,)
    projection: np.ndarray         # (dim, k)
    class_means: np.ndarray        # (len(classes), k)
    within: float                  # mean squared distance to the class mean, projected
    source: str = ""

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def standardise(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float32) - self.mean) / self.scale

    def project(self, x: np.ndarray) -> np.ndarray:
        """Head input(s) (..., dim) → the discriminant space (..., k)."""
        return self.standardise(x) @ self.projection

    def save(self, path: Path) -> None:
        meta = {"format": FORMAT, "model": self.model, "sha256": self.sha256,
                "classes": list(self.classes), "within": self.within, "source": self.source}
        with open(path, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), mean=self.mean.astype(np.float32),
                     scale=self.scale.astype(np.float32),
                     projection=self.projection.astype(np.float32),
                     class_means=self.class_means.astype(np.float32))

    @classmethod
    def load(cls, path: Path) -> Reference:
        fix = "run 'edge-voice-agent calibrate --reference-only --data DIR' for this model"
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                r = cls(model=str(meta["model"]), sha256=str(meta["sha256"]),
                        classes=tuple(str(c) for c in meta["classes"]),
                        mean=z["mean"].astype(np.float32), scale=z["scale"].astype(np.float32),
                        projection=z["projection"].astype(np.float32),
                        class_means=z["class_means"].astype(np.float32),
                        within=float(meta["within"]), source=str(meta.get("source", "")))
        except FileNotFoundError:
            raise AgentError(f"head-input reference {path} is missing; {fix}") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise AgentError(f"head-input reference {path} is unreadable "
                             f"({' '.join(str(e).split())[:120]}); {fix}") from None
        d, k = r.projection.shape if r.projection.ndim == 2 else (-1, -1)
        if (r.mean.shape != (d,) or r.scale.shape != (d,) or r.class_means.shape !=
                (len(r.classes), k) or not np.all(np.isfinite(r.projection))
                or not np.all(r.scale > 0) or not r.within > 0):
            raise AgentError(f"head-input reference {path} has inconsistent shapes or values; "
                             f"{fix}")
        return r


def fit_reference(x: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], *, model: str,
                  sha256: str, source: str = "") -> Reference:
    """Mean, scale and a shrunk linear discriminant projection of labelled head inputs.

    `labels` are class names; every class in `classes` needs at least two examples."""
    x = np.asarray(x, np.float64)
    labels = np.asarray(labels).astype(str)
    missing = [c for c in classes if (labels == c).sum() < 2]
    if missing:
        raise AgentError(f"the reference needs at least two training recordings of every class; "
                         f"too few for {', '.join(missing)}")
    keep = np.isin(labels, classes)
    x, labels = x[keep], labels[keep]
    mean = x.mean(0)
    scale = np.maximum(x.std(0), MIN_SCALE)
    z = (x - mean) / scale
    means = np.stack([z[labels == c].mean(0) for c in classes])
    idx = np.array([classes.index(str(c)) for c in labels])
    centred = z - means[idx]
    sw = centred.T @ centred / len(z)
    sw = (1.0 - SHRINKAGE) * sw + SHRINKAGE * np.trace(sw) / sw.shape[0] * np.eye(sw.shape[0])
    counts = np.array([(labels == c).sum() for c in classes], np.float64)
    grand = (counts[:, None] * means).sum(0) / counts.sum()
    diff = means - grand
    sb = (diff * (counts / counts.sum())[:, None]).T @ diff
    ew, ev = np.linalg.eigh(sw)
    whiten = ev / np.sqrt(np.maximum(ew, 1e-12))
    bw, bv = np.linalg.eigh(whiten.T @ sb @ whiten)
    k = max(1, len(classes) - 1)
    projection = whiten @ bv[:, ::-1][:, :k]
    u_means = means @ projection
    u = z @ projection
    within = float(np.mean(np.sum((u - u_means[idx]) ** 2, axis=1)))
    return Reference(model=model, sha256=sha256, classes=tuple(classes),
                     mean=mean.astype(np.float32), scale=scale.astype(np.float32),
                     projection=projection.astype(np.float32),
                     class_means=u_means.astype(np.float32), within=within, source=source)
