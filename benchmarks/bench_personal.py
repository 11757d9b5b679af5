#!/usr/bin/env python3
"""Device adaptation and enrollment on real speakers the scoring model never heard.

    python benchmarks/bench_personal.py [--shared ../shared] [--reps 10] [--json]

Head inputs of every FSDD and Speech Commands recording come from the bundled model's front end
(cached per model build). Everything personal is scored with the daemon's own code
(agent.personal: Adapter, Rescorer, fit_reference) at the shipped threshold.

1. Enrollment slice (issue 16's target): for each FSDD speaker, the *out-of-fold* probabilities
   of the shipped recipe (calibration/<model>/oof.npz: the leave-one-speaker-out models, which
   never heard that speaker), a head-input reference fitted without that speaker (the other
   FSDD speakers + the Speech Commands digits), one random recording per digit enrolled and the
   rest scored; `--reps` draws. Accuracy (top label of 11 classes), precision and coverage of
   accepted decisions before/after, mean over draws and the worst draw.
2. Device adaptation, label-free, streamed in a random order through `Adapter` exactly as the
   daemon applies it (decision first, then the utterance joins the running mean; inactive
   before `min_utterances`). The bundled head has heard every shared speaker, so this part
   refits the shipped head's recipe (StandardScaler → LogisticRegression, C as in the
   manifest; 10 digits + "unknown" from Speech Commands words; no rejector, no synthetic data)
   without the evaluated speakers: FSDD leave-one-speaker-out, and Speech Commands in 5
   speaker-grouped folds (speakers with ≥ 10 clips and ≥ 3 digits are scored; their words stream
   through the adapter too, as on a device: in a random order, and "words first" as on a device
   that has heard the person before the digits are scored). On the same FSDD fold heads,
   enrollment alone and enrollment with adaptation (3 draws). Needs the 'train' extra
   (scikit-learn), offline only; about 8 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.personal.adaptation import AdaptationParams, AdaptationState, Adapter  # noqa: E402
from agent.personal.enrollment import Enrollment, Rescorer  # noqa: E402
from agent.personal.reference import fit_reference  # noqa: E402
from agent.recognition.model import ModelRunner  # noqa: E402
from agent.resources import default_model_dir  # noqa: E402
from agent.training.enrollment_slice import (  # noqa: E402
    DIGITS,
    enrollment_slice,
    out_of_fold,
    rates,
    shared_head_inputs,
    summarise,
)


def stream(head, x: np.ndarray, ref_mean: np.ndarray, ref_scale: np.ndarray,
           params: AdaptationParams, unknown: int, rescorer: Rescorer | None = None
           ) -> np.ndarray:
    """Probabilities as the daemon decides them: with the shift learned *before* each
    utterance (and the enrollment's rescoring, if any), then the utterance joins the mean
    unless the decision is "unknown"."""
    ad = Adapter(params, AdaptationState.fresh(x.shape[1]))
    out = np.zeros((len(x), len(head.classes_)))
    for i, xi in enumerate(x):
        shift = ad.shift(ref_mean, ref_scale)
        p = head.predict_proba((xi if shift is None else xi - shift)[None])[0]
        if rescorer is not None:
            p = rescorer.rescore(p, xi)
        out[i] = p
        if p.argmax() != unknown:
            ad.observe(xi)
    return out


def fit_head(x: np.ndarray, y: np.ndarray, c: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=500)).fit(x, y)


def adaptation(f: dict, model: ModelRunner, thr: np.ndarray, params: AdaptationParams,
               weight: float, draws: int = 3, seed: int = 0) -> dict:
    m = model.manifest
    unknown = m.classes.index(m.unknown_label)
    c = float(m.training.get("recipe", {}).get("head_c", 0.05))
    fx, fs = f["fsdd_x"], f["fsdd_speaker"]
    fy = np.array([m.classes.index(v) for v in f["fsdd_label"]])
    sx, ss = f["sc_x"], f["sc_speaker"]
    sy = np.array([m.classes.index(v) if v in DIGITS else unknown for v in f["sc_label"]])
    rng = np.random.default_rng(seed)
    out: dict = {"fsdd": {}, "speech_commands": {}, "speech_commands_words_first": {},
                 "fsdd_enrolled": {}}
    scd = np.array([v in DIGITS for v in f["sc_label"]])

    def one(head, x, y, mean, scale, words_first=False):
        order = rng.permutation(len(x))
        if words_first:  # a device in use: it heard the speaker's other words before
            order = order[np.argsort(y[order] != unknown, kind="stable")]
        x, y = x[order], y[order]
        plain = head.predict_proba(x)
        adapted = stream(head, x, mean, scale, params, unknown)
        d = y != unknown
        return rates(plain[d], y[d], thr, unknown), rates(adapted[d], y[d], thr, unknown)

    for s in sorted(set(fs)):
        tr_x = np.concatenate([fx[fs != s], sx])
        tr_y = np.concatenate([fy[fs != s], sy])
        head = fit_head(tr_x, tr_y, c)
        dig = tr_y != unknown
        mean, scale = tr_x[dig].mean(0), np.maximum(tr_x[dig].std(0), 1e-3)
        b, a = one(head, fx[fs == s], fy[fs == s], mean, scale)
        out["fsdd"][s] = {"before": b, "after": a}
        # enrollment (one clip per digit) alone, and with adaptation, on the same fold head
        ref = fit_reference(np.concatenate([fx[fs != s], sx[scd]]),
                            np.concatenate([f["fsdd_label"][fs != s], f["sc_label"][scd]]),
                            DIGITS, model=m.ref, sha256=m.sha256)
        idx = np.flatnonzero(fs == s)
        enrolled, both = [], []
        for _ in range(draws):
            enr = np.array([rng.choice(idx[f["fsdd_label"][idx] == d]) for d in DIGITS])
            rest = rng.permutation(np.setdiff1d(idx, enr))
            r = Rescorer(Enrollment(fx[enr], tuple(f["fsdd_label"][enr]), "bench", m.ref), ref,
                         m.classes, m.unknown_label, weight)
            plain = head.predict_proba(fx[rest])
            enrolled.append(rates(np.stack([r.rescore(p, x) for p, x in zip(plain, fx[rest],
                                                                            strict=True)]),
                                  fy[rest], thr, unknown))
            both.append(rates(stream(head, fx[rest], mean, scale, params, unknown, r), fy[rest],
                              thr, unknown))
        out["fsdd_enrolled"][s] = {"enrolled": summarise(enrolled),
                                   "enrolled_and_adapted": summarise(both)}
        print(f"adaptation: FSDD {s} done", file=sys.stderr, flush=True)
    speakers = np.array(sorted(set(ss)))
    n_all = {s: int((ss == s).sum()) for s in speakers}
    n_dig = {s: int(((ss == s) & (sy != unknown)).sum()) for s in speakers}
    scored = [s for s in speakers if n_all[s] >= 10 and n_dig[s] >= 3]
    fold = {s: i % 5 for i, s in enumerate(rng.permutation(speakers))}
    for k in range(5):
        test = np.array([fold[s] == k for s in ss])
        tr_x, tr_y = np.concatenate([fx, sx[~test]]), np.concatenate([fy, sy[~test]])
        head = fit_head(tr_x, tr_y, c)
        dig = tr_y != unknown
        mean, scale = tr_x[dig].mean(0), np.maximum(tr_x[dig].std(0), 1e-3)
        for s in scored:
            if fold[s] != k:
                continue
            b, a = one(head, sx[ss == s], sy[ss == s], mean, scale)
            out["speech_commands"][s] = {"before": b, "after": a}
            b, a = one(head, sx[ss == s], sy[ss == s], mean, scale, words_first=True)
            out["speech_commands_words_first"][s] = {"before": b, "after": a}
        print(f"adaptation: Speech Commands fold {k} done", file=sys.stderr, flush=True)
    return out


def pooled(per: dict, which: str) -> dict:
    rows = [v[which] for v in per.values()]
    n = sum(r["n"] for r in rows)
    acc = sum(r["accuracy"] * r["n"] for r in rows) / n
    cov = sum(r["coverage"] * r["n"] for r in rows) / n
    wrong = sum(r["wrong_accepted"] for r in rows)
    acc_n = cov * n
    return {"mean_speaker_accuracy": round(float(np.mean([r["accuracy"] for r in rows])), 4),
            "mean_speaker_coverage": round(float(np.mean([r["coverage"] for r in rows])), 4),
            "pooled_accuracy": round(acc, 4), "pooled_coverage": round(cov, 4),
            "pooled_precision": round(1 - wrong / acc_n, 4) if acc_n else None,
            "speakers": len(rows), "digits": n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get(
        "EVA_SHARED", ROOT.parent / "shared")))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--weight", type=float, default=None,
                    help="enrollment weight [personal.enrollment_weight's default]")
    ap.add_argument("--sweep", action="store_true", help="also sweep the enrollment weight")
    ap.add_argument("--skip-adaptation", action="store_true")
    ap.add_argument("--adaptation-min-utterances", type=int, default=None,
                    help="[personal.adaptation_min_utterances' default]")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from agent.config import PersonalConfig

    pc = PersonalConfig()
    weight = pc.enrollment_weight if args.weight is None else args.weight
    model = ModelRunner(default_model_dir())
    m = model.manifest
    thr, oof, _ = out_of_fold(model)
    f = shared_head_inputs(model, args.shared / "data" / "fsdd" / "recordings",
                           args.shared / "data" / "speech-commands")
    report: dict = {"model": m.ref, "thresholds": thr.round(4).tolist(),
                    "enrollment_weight": weight}
    report["enrollment"] = enrollment_slice(f, oof, model, thr, args.reps, weight)
    if args.sweep:
        report["sweep"] = {}
        for w in (0.1, 0.25, 0.5, 1.0, 2.0):
            sl = enrollment_slice(f, oof, model, thr, args.reps, w)
            report["sweep"][w] = {k: v["after"] for k, v in sl.items()}
    if not args.skip_adaptation:
        params = AdaptationParams(args.adaptation_min_utterances or pc.adaptation_min_utterances,
                                  pc.adaptation_prior,
                                  pc.adaptation_horizon, pc.adaptation_max_shift)
        ad = adaptation(f, model, thr, params, weight)
        report["enrollment_with_adaptation"] = ad.pop("fsdd_enrolled")
        report["adaptation"] = ad
        report["adaptation_pooled"] = {
            part: {w: pooled(ad[part], w) for w in ("before", "after")} for part in ad}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{m.ref}, thresholds per class {thr.min():.3f}-{thr.max():.3f}, enrollment weight "
          f"{weight:g}")
    print("\nEnrollment slice (FSDD, out-of-fold recipe models; one clip per digit enrolled, "
          f"the rest scored; {args.reps} draws): accuracy / precision / coverage, mean "
          "(worst draw)")
    for s, v in report["enrollment"].items():
        b, a = v["before"], v["after"]
        print(f"  {s:10s} before {b['accuracy']:.3f} / {b['precision']:.3f} / "
              f"{b['coverage']:.3f}   after {a['accuracy']:.3f} ({a['worst_accuracy']:.3f}) / "
              f"{a['precision']:.3f} ({a['worst_precision']:.3f}) / {a['coverage']:.3f} "
              f"({a['worst_coverage']:.3f})")
    for w, per in report.get("sweep", {}).items():
        print(f"  weight {w:<5g} " + "  ".join(
            f"{s[:6]} {v['accuracy']:.3f}/{v['precision']:.3f}/{v['coverage']:.3f}"
            for s, v in per.items()))
    if "adaptation" in report:
        print("\nDevice adaptation (label-free; recipe head refit without the speakers scored): "
              "accuracy / precision / coverage at the threshold, before → after")
        for part, per in report["adaptation"].items():
            for s, v in per.items() if part == "fsdd" else ():
                b, a = v["before"], v["after"]
                print(f"  {part[:5]} {s:12s} n={b['n']:<4d} {b['accuracy']:.3f} / "
                      f"{b['precision']:.3f} / {b['coverage']:.3f}  →  {a['accuracy']:.3f} / "
                      f"{a['precision']:.3f} / {a['coverage']:.3f}")
            if part == "fsdd":
                print("  with enrollment (one clip per digit, 3 draws, the rest streamed): "
                      "enrolled only → enrolled and adapted")
                for s, v in report["enrollment_with_adaptation"].items():
                    e, b = v["enrolled"], v["enrolled_and_adapted"]
                    print(f"  fsdd  {s:12s}        {e['accuracy']:.3f} / {e['precision']:.3f} / "
                          f"{e['coverage']:.3f}  →  {b['accuracy']:.3f} / {b['precision']:.3f} / "
                          f"{b['coverage']:.3f}")
            pb, pa = (report["adaptation_pooled"][part][w] for w in ("before", "after"))
            print(f"  {part}: mean per-speaker accuracy {pb['mean_speaker_accuracy']:.3f} → "
                  f"{pa['mean_speaker_accuracy']:.3f}, coverage "
                  f"{pb['mean_speaker_coverage']:.3f} → {pa['mean_speaker_coverage']:.3f}, "
                  f"pooled precision {pb['pooled_precision']} → {pa['pooled_precision']} "
                  f"({pb['speakers']} speakers, {pb['digits']} digits)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
