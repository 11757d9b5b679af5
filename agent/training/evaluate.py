"""Data assembly and leave-one-speaker-out evaluation of the recipe.

For every recorded speaker, a model is trained on the other speakers (plus all synthetic
voices and the negatives that share nothing with the test side) and tested on that speaker's
recordings under four conditions (clean, white noise at 10 dB SNR, 20 dB quieter, VAD-like
padding) and on negatives it never saw. Out-of-fold scores give the temperature, the
calibration error (with a nested fit, so no speaker calibrates itself) and the threshold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np

from agent.audio.resample import Resampler
from agent.frontend import DEFAULT as _PARAMS
from agent.frontend import features
from agent.training import augment as A
from agent.training import synth as S
from agent.training.dataset import ACCENTS, discover, load_audio
from agent.training.pretrained import fetch, training_embedder
from agent.training.recipe import (
    CLASSES,
    DIGITS,
    UNKNOWN_INDEX,
    Recipe,
    ece,
    fit,
    fit_temperature,
    scores,
    softmax,
    threshold_for_precision,
)


def _feature_job(args: tuple) -> np.ndarray:
    x, seed, aug = args
    if seed is not None:
        x = A.random_augment(x, np.random.default_rng(seed), aug)
    return features(x, training_embedder())


def featurize(pool, audio: list[np.ndarray], seeds: list[int] | None = None,
              aug: A.AugmentParams | None = None) -> np.ndarray:
    seeds = seeds if seeds is not None else [None] * len(audio)
    out = pool.map(_feature_job, [(x, s, aug) for x, s in zip(audio, seeds, strict=True)],
                   chunksize=64)
    return np.stack(out).astype(np.float32)


def _to_model_rate(clips: list[np.ndarray]) -> list[np.ndarray]:
    """Synthetic clips are made at S.SR; the front end runs at 16 kHz (same soxr as load_audio)."""
    out = []
    for x in clips:
        r = Resampler(S.SR, _PARAMS.sample_rate)
        out.append(np.concatenate([r.process(np.asarray(x, np.float32)), r.flush()]))
    return out


@dataclass
class DataSet:
    """Features of everything training and evaluation use, with the groups that keep folds
    honest (a negative made from a speaker's voice stays on that speaker's side)."""

    y: np.ndarray                      # real clips: digit index
    speakers: np.ndarray
    test: dict[str, np.ndarray]        # condition → features of the real clips
    real_aug: list[np.ndarray]
    synth_x: np.ndarray
    synth_y: np.ndarray
    neg_clean: np.ndarray
    neg_aug: np.ndarray
    neg_group: np.ndarray
    neg_kind: np.ndarray
    clips: list = field(default_factory=list)  # the recordings used (dataset.Clip)
    counts: dict[str, int] = field(default_factory=dict)

    def train_set(self, speakers: list[str], neg_groups: list[str]
                  ) -> tuple[np.ndarray, np.ndarray]:
        tr = np.isin(self.speakers, speakers)
        ntr = np.isin(self.neg_group, neg_groups)
        x = [self.test["clean"][tr], *[a[tr] for a in self.real_aug], self.synth_x,
             self.neg_aug[ntr]]
        y = [self.y[tr]] * (1 + len(self.real_aug)) + [self.synth_y,
                                                       np.full(ntr.sum(), UNKNOWN_INDEX)]
        return np.concatenate(x), np.concatenate(y)


def build_dataset(data_dir: Path, cache: Path, r: Recipe, seed: int = 0,
                  speakers: set[str] | None = None, limit_per_class: int | None = None,
                  workers: int = 2, log=print) -> DataSet:
    t0 = time.perf_counter()
    fetch(log=log)  # once, before the workers need the verified graphs
    clips = discover(data_dir, speakers)
    if limit_per_class:
        seen: dict[tuple, int] = {}
        keep = []
        for c in clips:
            k = (c.speaker, c.label)
            if seen.get(k, 0) < limit_per_class:
                seen[k] = seen.get(k, 0) + 1
                keep.append(c)
        clips = keep
    real = [load_audio(c.path, _PARAMS.sample_rate) for c in clips]
    y = np.array([int(c.label) for c in clips])
    spk = np.array([c.speaker for c in clips])
    sa, sy = S.synthesize(cache, "digits", S.DIGIT_WORDS, r.n_espeak, r.n_flite, r.n_festival,
                          0, workers, log)
    na, nw = S.synthesize(cache, "negatives", S.NEG_WORDS, r.n_neg_words_espeak,
                          r.n_neg_words_flite, r.n_neg_words_festival, 1, workers, log)
    sa, na = _to_model_rate(sa), _to_model_rate(na)
    rng = np.random.default_rng(seed)
    negs: list[tuple[np.ndarray, str, str]] = [
        (x, "negA" if w % 2 == 0 else "negB", "word") for x, w in zip(na, nw, strict=True)]
    src = [(x, s) for x, s in zip(real, spk, strict=True)] + [(x, "synthetic") for x in sa]
    for i in rng.choice(len(src), min(r.n_neg_reversed, len(src)), replace=False):
        negs.append((A.reverse(src[i][0]), src[i][1], "reversed"))
    for i in rng.choice(len(src), min(r.n_neg_shuffled, len(src)), replace=False):
        negs.append((A.time_shuffle(src[i][0], rng), src[i][1], "shuffled"))
    negs += [(A.tone(rng), "synthetic", "tone") for _ in range(r.n_neg_tones)]
    negs += [(A.noise_burst(rng), "synthetic", "noise") for _ in range(r.n_neg_noise)]
    aug = r.augment
    with Pool(workers) as pool:
        test = {c: featurize(pool, [A.condition(x, c, i) for i, x in enumerate(real)])
                for c in A.CONDITIONS}
        real_aug = [featurize(pool, real, [seed * 7919 + 1_000_000 * (k + 1) + i
                                           for i in range(len(real))], aug)
                    for k in range(r.aug_copies)]
        syn = [featurize(pool, sa)] + [
            featurize(pool, sa, [seed * 7919 + 2_000_000 * (k + 1) + i
                                 for i in range(len(sa))], aug)
            for k in range(r.synth_aug_copies)]
        neg_audio = [a for a, _, _ in negs]
        neg_clean = featurize(pool, neg_audio)
        neg_aug = featurize(pool, neg_audio, [seed * 7919 + 3_000_000 + i
                                              for i in range(len(negs))], aug)
    ds = DataSet(y=y, speakers=spk, test=test, real_aug=real_aug,
                 synth_x=np.concatenate(syn), synth_y=np.concatenate([sy] * len(syn)),
                 neg_clean=neg_clean, neg_aug=neg_aug,
                 neg_group=np.array([g for _, g, _ in negs]),
                 neg_kind=np.array([k for _, _, k in negs]), clips=clips,
                 counts={"real": len(real), "synthetic_digits": len(sa),
                         "negatives": len(negs), "speakers": len(set(spk))})
    log(f"data: {len(real)} recordings of {len(set(spk))} speakers, {len(sa)} synthetic "
        f"digits, {len(negs)} negatives; features in {time.perf_counter() - t0:.0f} s")
    return ds


def _fold(args: tuple) -> tuple[str, dict[str, np.ndarray]]:
    ds, s, r, seed = args
    others = [x for x in np.unique(ds.speakers) if x != s]
    x, y = ds.train_set(others, [*others, "negA", "synthetic"])
    model = fit(x, y, r, seed)
    te = ds.speakers == s
    z = {c: scores(model, ds.test[c][te]) for c in ds.test}
    neg = np.isin(ds.neg_group, [s, "negB"])  # never seen by this fold's model
    z["neg"] = scores(model, ds.neg_clean[neg])
    z["neg_kind"] = ds.neg_kind[neg]
    return s, z


def loso(ds: DataSet, r: Recipe, seed: int = 0, workers: int = 2, log=print) -> dict[str, Any]:
    """The full report; numbers are fractions in 0..1."""
    t0 = time.perf_counter()
    speakers = [str(s) for s in np.unique(ds.speakers)]
    if len(speakers) < 2:
        raise SystemExit("evaluate: leave-one-speaker-out needs at least two speakers")
    with Pool(min(workers, len(speakers))) as p:
        res = dict(p.map(_fold, [(ds, s, r, seed) for s in speakers]))
    y = {s: ds.y[ds.speakers == s] for s in speakers}
    # temperature: nested (fit on the other speakers' out-of-fold scores) for an honest ECE;
    # the shipped one is fitted on all of them.
    nested = []
    for s in speakers:
        zo = np.concatenate([res[o]["clean"] for o in speakers if o != s])
        yo = np.concatenate([y[o] for o in speakers if o != s])
        nested.append(softmax(res[s]["clean"], fit_temperature(zo, yo)))
    z_all = np.concatenate([res[s]["clean"] for s in speakers])
    y_all = np.concatenate([y[s] for s in speakers])
    t = fit_temperature(z_all, y_all)
    p_all = softmax(z_all, t)
    thr, coverage, precision = threshold_for_precision(p_all, y_all, r.target_precision)

    def acc(s: str, cond: str) -> float:
        return float((res[s][cond].argmax(1) == y[s]).mean())

    conditions = {}
    for c in A.CONDITIONS:
        per = {s: acc(s, c) for s in speakers}
        conditions[c] = {"mean": float(np.mean(list(per.values()))),
                         "worst": float(min(per.values())), "per_speaker": per}
    pred = p_all.argmax(1)
    confusion = np.zeros((len(DIGITS), len(CLASSES)), int)
    np.add.at(confusion, (y_all, pred), 1)
    per_class = {d: float(confusion[i, i] / max(1, confusion[i].sum()))
                 for i, d in enumerate(DIGITS)}
    accents: dict[str, list[float]] = {}
    for s in speakers:
        accents.setdefault(ACCENTS.get(s, "unknown"), []).append(
            conditions["clean"]["per_speaker"][s])
    p_neg = np.concatenate([softmax(res[s]["neg"], t) for s in speakers])
    kinds = np.concatenate([res[s]["neg_kind"] for s in speakers])
    fa = (p_neg.argmax(1) != UNKNOWN_INDEX) & (p_neg.max(1) >= thr)
    accepted = (pred != UNKNOWN_INDEX) & (p_all.max(1) >= thr)
    report = {
        "method": "leave-one-speaker-out",
        "speakers": speakers,
        "accuracy": conditions["clean"]["mean"],
        "worst_speaker": conditions["clean"]["worst"],
        "conditions": conditions,
        "per_class": per_class,
        "per_accent": {a: float(np.mean(v)) for a, v in accents.items()},
        "confusion": {"rows": list(DIGITS), "columns": list(CLASSES),
                      "counts": confusion.tolist()},
        "calibration": {"temperature": t, "ece_uncalibrated": ece(softmax(z_all), y_all),
                        "ece": ece(np.concatenate(nested), y_all), "method": "temperature "
                        "scaling on out-of-fold scores; ECE with a nested fit"},
        "threshold": {"value": thr, "target_precision": r.target_precision,
                      "precision": precision, "coverage": coverage,
                      "accepted_accuracy": float((pred[accepted] == y_all[accepted]).mean())
                      if accepted.any() else None},
        "rejected_as_unknown": float((pred == UNKNOWN_INDEX).mean()),
        "negatives": {"n": int(len(p_neg)), "false_accepts": float(fa.mean()),
                      "by_kind": {k: float(fa[kinds == k].mean()) for k in np.unique(kinds)}},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    report["_oof"] = {"probabilities": p_all.astype(np.float32), "labels": y_all}
    log(f"evaluate: LOSO clean {report['accuracy']:.3f} (worst {report['worst_speaker']:.3f}), "
        f"10 dB {conditions['snr10']['mean']:.3f}, -20 dB {conditions['quiet20']['mean']:.3f}, "
        f"padded {conditions['padded']['mean']:.3f}; ECE {report['calibration']['ece']:.3f}; "
        f"threshold {thr:.3f}: precision {precision:.3f} coverage {coverage:.3f}; "
        f"false accepts {report['negatives']['false_accepts']:.3f}")
    return report
