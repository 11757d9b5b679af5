"""The enrollment slice (issue 16): what enrolling one recording per word does for a speaker the
model never heard, scored with the daemon's own code (agent.personal: Enrollment, Rescorer,
fit_reference) at the model's own thresholds.

For each FSDD speaker: the *out-of-fold* probabilities of the shipped recipe
(calibration/<model>/oof.npz: the leave-one-speaker-out models, which never heard that
speaker), a head-input reference fitted without that speaker (the other FSDD speakers and the
Speech Commands digits), one random recording per word enrolled and the rest scored, `reps`
draws. `edge-voice-agent evaluate --enrollment` prints it; benchmarks/bench_personal.py adds
device adaptation and a weight sweep.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from agent.errors import ConfigError
from agent.personal.enrollment import Enrollment, Rescorer
from agent.personal.reference import fit_reference
from agent.recognition.decision import Thresholds
from agent.recognition.model import ModelRunner
from agent.resources import calibration_dir, default_model_dir

DIGITS = tuple(str(d) for d in range(10))


def shared_head_inputs(model: ModelRunner, fsdd: Path, speech_commands: Path | None
                       ) -> dict[str, np.ndarray]:
    """Head inputs, labels and speakers of every FSDD (and Speech Commands) recording through
    `model`'s front end; cached per model build (the front end is the slow part)."""
    from agent.training.dataset import discover, discover_speech_commands, load_audio

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / \
        "edge-voice-agent" / f"personal-bench-{model.manifest.sha256[:16]}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    out = {}
    sources = [("fsdd", discover(fsdd))]
    if speech_commands is not None:
        sources.append(("sc", discover_speech_commands(speech_commands)))
    for name, clips in sources:
        print(f"front end over {len(clips)} {name} recordings ...", file=sys.stderr, flush=True)
        out[f"{name}_x"] = np.stack([model.features(load_audio(c.path, 16000)) for c in clips])
        out[f"{name}_label"] = np.array([c.label for c in clips])
        out[f"{name}_speaker"] = np.array([c.speaker for c in clips])
    if speech_commands is not None:  # only a complete set is worth keeping
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **out)
    return out


def class_thresholds(t: Thresholds, classes: tuple[str, ...]) -> np.ndarray:
    """The threshold of each class as the daemon applies it (per class where given)."""
    per = dict(t.per_class)
    return np.array([per.get(c, t.threshold) for c in classes])


def out_of_fold(model: ModelRunner) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bundled model's per-class thresholds, and its recipe's out-of-fold FSDD
    probabilities and labels (calibration/<model>/: thresholds.json, oof.npz)."""
    m = model.manifest
    cal = calibration_dir(m.name)
    thr = class_thresholds(Thresholds.read(cal / "thresholds.json"), m.classes)
    with np.load(cal / "oof.npz") as z:
        return thr, z["probabilities"], z["labels"]


def bundled_slice(fsdd: Path, speech_commands: Path | None, reps: int, weight: float) -> dict:
    """The enrollment slice of the bundled model, as `evaluate --enrollment` reports it."""
    model = ModelRunner(default_model_dir())
    m = model.manifest
    thr, oof, oof_labels = out_of_fold(model)
    f = shared_head_inputs(model, fsdd, speech_commands)
    if len(oof) != len(f["fsdd_x"]) or \
            [m.classes[i] for i in oof_labels] != f["fsdd_label"].tolist():
        raise ConfigError(f"--data {fsdd} has {len(f['fsdd_x'])} recordings, the out-of-fold "
                          f"probabilities of {m.ref} ({calibration_dir(m.name) / 'oof.npz'}) "
                          f"{len(oof)}: give the FSDD folder it was trained on")
    return {"model": m.ref, "enrollment_weight": weight, "reps": reps,
            "enrollment": enrollment_slice(f, oof, model, thr, reps, weight)}


def rates(p: np.ndarray, y: np.ndarray, thr: np.ndarray, unknown: int) -> dict[str, float]:
    """Top-label accuracy, and coverage and precision of what would be acted on."""
    top = p.argmax(1)
    acc = top == y
    a = (top != unknown) & (p.max(1) >= thr[top])
    return {"accuracy": float(acc.mean()), "coverage": float(a.mean()),
            "precision": float(acc[a].mean()) if a.any() else float("nan"),
            "wrong_accepted": int((a & ~acc).sum()), "n": int(len(y))}


def summarise(rs: list[dict]) -> dict:
    """Mean and worst draw of each figure."""
    keys = ("accuracy", "coverage", "precision")
    d = {k: round(float(np.nanmean([r[k] for r in rs])), 4) for k in keys}
    d.update({f"worst_{k}": round(float(np.nanmin([r[k] for r in rs])), 4) for k in keys})
    d["wrong_accepted_per_draw"] = round(float(np.mean([r["wrong_accepted"] for r in rs])), 2)
    d["scored_per_draw"] = rs[0]["n"]
    return d


def enrollment_slice(f: dict, oof: np.ndarray, model: ModelRunner, thr: np.ndarray, reps: int,
                     weight: float, seed: int = 0) -> dict:
    """speaker → {"before", "after"}: `summarise`d figures over `reps` enrollments."""
    m = model.manifest
    unknown = m.classes.index(m.unknown_label)
    fx, fy, fs = f["fsdd_x"], f["fsdd_label"], f["fsdd_speaker"]
    y = np.array([m.classes.index(v) for v in fy])
    scd = np.array([v in DIGITS for v in f.get("sc_label", np.array([], str))], bool)
    sc_x = f["sc_x"][scd] if "sc_x" in f else np.empty((0, fx.shape[1]), fx.dtype)
    sc_y = f["sc_label"][scd] if "sc_label" in f else np.array([], fy.dtype)
    rng = np.random.default_rng(seed)
    out = {}
    for s in sorted(set(fs)):
        other = fs != s
        ref = fit_reference(np.concatenate([fx[other], sc_x]), np.concatenate([fy[other], sc_y]),
                            DIGITS, model=m.ref, sha256=m.sha256)
        idx = np.flatnonzero(fs == s)
        before, after = [], []
        for _ in range(reps):
            enr = np.array([rng.choice(idx[fy[idx] == d]) for d in DIGITS])
            rest = np.setdiff1d(idx, enr)
            e = Enrollment(fx[enr], tuple(fy[enr]), "evaluate", m.ref)
            r = Rescorer(e, ref, m.classes, m.unknown_label, weight)
            q = np.stack([r.rescore(oof[i], fx[i]) for i in rest])
            before.append(rates(oof[rest], y[rest], thr, unknown))
            after.append(rates(q, y[rest], thr, unknown))
        out[str(s)] = {k: summarise(v) for k, v in (("before", before), ("after", after))}
    return out


def render(report: dict) -> str:
    """The slice as the table `evaluate --enrollment` prints."""
    lines = [f"{report['model']}, enrollment weight {report['enrollment_weight']:g}: one "
             f"recording per digit enrolled, the rest scored ({report['reps']} draws); "
             "accuracy / precision / coverage at the model's thresholds, mean (worst draw)",
             "| FSDD speaker (held out) | plain | enrolled | target |",
             "| --- | --- | --- | --- |"]
    for s, v in report["enrollment"].items():
        b, a = v["before"], v["after"]
        ok = a["accuracy"] >= 0.98 and a["precision"] >= 0.99 and a["coverage"] >= 0.93
        lines.append(f"| {s} | {b['accuracy']:.3f} / {b['precision']:.3f} / {b['coverage']:.3f} "
                     f"| {a['accuracy']:.3f} ({a['worst_accuracy']:.3f}) / {a['precision']:.3f} "
                     f"({a['worst_precision']:.3f}) / {a['coverage']:.3f} "
                     f"({a['worst_coverage']:.3f}) | {'met' if ok else 'not met'} |")
    return "\n".join(lines)
