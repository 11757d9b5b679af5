"""`train --vocabulary`: data → speaker-grouped evaluation → final fit → a model directory
the daemon runs like the digit model (classes: the words + `unknown`), with its thresholds,
out-of-fold predictions, baseline, head-input reference and card."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from agent.recognition.vocabulary import UNKNOWN
from agent.training import vocab_card
from agent.training import vocabulary as V
from agent.training.calibrate import OOF_FILE, write_baseline
from agent.training.export import (
    check_against_sklearn,
    constant_head,
    head_to_onnx,
    rejector_to_onnx,
)
from agent.training.train import TrainResult, measure_latency, public, write_decision_files
from agent.training.words import spoken


def train_vocabulary(vocabulary: tuple[str, ...], data_dir: Path | None, out_dir: Path,
                     calibration_dir: Path, *, name: str, version: str = "1.0.0",
                     seed: int = 0, text_only: tuple[str, ...] = (),
                     recipe: V.VocabRecipe | None = None, cache: Path,
                     workers: int = 2, speech_commands: Path | None = None,
                     talk: Path | None = None, command: str = "", log=print) -> TrainResult:
    from agent.personal.reference import REFERENCE_FILE, fit_reference
    from agent.recognition.frontend import FrontendParams
    from agent.training.modeldir import write_model_directory

    t0 = time.perf_counter()
    r = recipe or V.VocabRecipe()
    out_dir, calibration_dir = Path(out_dir), Path(calibration_dir)
    dim = FrontendParams().dim
    d = V.build(vocabulary, data_dir, cache, r, seed, text_only, workers, log, speech_commands,
                talk)
    report = V.evaluate(d, r, seed, workers, log)
    temp, platt = report["calibration"]["temperature"], tuple(report["calibration"]["platt"])
    m = V.train_mask(d, None, r)
    log(f"train: final fit on {int(m.sum())} examples "
        f"({int((m & (d.table.y < d.k)).sum())} of the words)")
    head, rejector = V.fit(d, m, r, seed)
    k = d.k
    head_blob = constant_head(dim) if head is None else head_to_onnx(head, temp, dim)
    rej_blob = rejector_to_onnx(rejector, platt, dim, n_known=k)
    probe = d.table.x[np.random.default_rng(seed).permutation(len(d.table.y))[:256]]
    gap = check_against_sklearn(head_blob, head, temp, rej_blob, rejector, platt, probe, k)
    if gap > 1e-4:
        raise SystemExit(f"train: ONNX export differs from scikit-learn by {gap:.2e}")
    pub = public(report)
    sources = set(d.table.source[d.table.role == V.REAL])
    data = "synthetic speech (espeak-ng, flite, festival)"
    if "fsdd" in sources:
        data += " + Free Spoken Digit Dataset (CC BY-SA 4.0)"
    if "speech-commands" in sources:
        data += " + Speech Commands (CC BY 4.0, Warden 2018)"
    if "talk" in sources:
        data += " + speechocean762 read sentences as negatives (CC BY 4.0, Speechocean/Xiaomi)"
    manifest = write_model_directory(
        out_dir, name=name, version=version, classes=(*vocabulary, UNKNOWN),
        unknown_label=UNKNOWN, heads={"head": head_blob, "rejector": rej_blob},
        training={"data": data, "vocabulary": list(vocabulary),
                  "spoken": {w: spoken(w) for w in vocabulary},
                  "text_only": list(d.text_only), "counts": d.counts, "seed": seed,
                  "recipe": r.to_dict(),
                  "head": "constant (one word)" if head is None else
                  " → ".join(type(s).__name__ for _, s in head.steps) + " → temperature softmax",
                  "rejector": " → ".join(type(s).__name__ for _, s in rejector.steps) +
                  " → Platt sigmoid", "composition": "P(word k) = p_in * P_head(k), "
                  "P(unknown) = 1 - p_in", "temperature": temp, "platt": list(platt),
                  "onnx_max_abs_diff": gap})
    th = pub["threshold"]
    real = pub["real"]
    write_decision_files(out_dir, calibration_dir, manifest, pub, report["_oof"],
                         th["max_other_rate"], {
        "coverage": real["coverage"], "precision": real["precision"],
        "other_accepted": real["other_accepted"],
        "nested_worst_group_precision": th["nested_worst_precision"],
        "nested_worst_group_other_accepted": th["nested_worst_other"],
        "method": "agent/training/thresholds.py choose_thresholds over "
        f"{OOF_FILE} (pool_probabilities, pool_labels, pool_groups): the words' precision "
        "target and max_word_rate hold in every held-out group (real speaker groups, "
        "held-out synthetic voices, synthetic open set)"})
    # the head-input reference (enrollment, adaptation): the words' training examples
    t = d.table
    use = m & ~t.aug & (t.y < k)
    ref = fit_reference(t.x[use], np.array([vocabulary[i] for i in t.y[use]]), vocabulary,
                        model=manifest.ref, sha256=manifest.sha256,
                        source=f"{int(use.sum())} training examples (real and synthetic)")
    ref.save(calibration_dir / REFERENCE_FILE)
    write_baseline(out_dir, d.baseline_audio, calibration_dir, seed=seed, log=log)
    latency = measure_latency(out_dir, d.baseline_audio[:20] or [np.zeros(16000, np.float32)])
    secs = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in out_dir.glob("*.onnx"))
    (out_dir / "MODEL_CARD.md").write_text(vocab_card.render(
        manifest.to_dict(), pub, r.to_dict(), size, latency, secs, command))
    log(f"train: wrote {out_dir} ({size / 1e6:.2f} MB of graphs, {latency:.2f} ms per "
        f"utterance) and {calibration_dir} in {secs / 60:.1f} min")
    return TrainResult(out_dir, calibration_dir, report, size, latency, secs)
