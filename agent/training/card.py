"""MODEL_CARD.md from the evaluation report: what the model is, how it was made, how good it is
on voices it never heard, how far to trust its confidence, and where it fails."""

from __future__ import annotations

from typing import Any


def _head_dim(manifest: dict[str, Any]) -> int:
    f = manifest["frontend"]
    return (f["n_embeddings"] + 2) * f["embedding_dim"]


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def render(manifest: dict[str, Any], report: dict[str, Any], recipe: dict[str, Any],
           size_bytes: int, latency_ms: float, train_seconds: float,
           targets: dict[str, Any]) -> str:
    c = report["conditions"]
    spk = report["speakers"]
    lines = [
        f"# Model card: {manifest['name']} {manifest['version']}",
        "",
        "Recognises the spoken English digits zero to nine, plus `unknown` for anything else, "
        "from one utterance cut out by the agent's VAD (16 kHz mono). Runs in ONNX Runtime on a "
        "CPU; calibrated probabilities come straight out of the graph.",
        "",
        "## Data",
        "",
        "* **Free Spoken Digit Dataset** (FSDD), Jakobovski et al., "
        "https://github.com/Jakobovski/free-spoken-digit-dataset, licensed **CC BY-SA 4.0** "
        "(https://creativecommons.org/licenses/by-sa/4.0/): the subset of "
        f"{len(spk)} speakers ({', '.join(spk)}), 50 takes of each digit each. All male; "
        "accents USA, Belgian French, German. The recordings are not redistributed here.",
        f"* **Synthetic speakers** made on the training machine: {recipe['n_espeak']} digits "
        f"from espeak-ng (8 English accents x voice variants, random speed and pitch), "
        f"{recipe['n_flite']} from flite (6 voices, random duration and F0), "
        f"{recipe['n_festival']} from festival; {recipe['synth_aug_copies']} augmented copies "
        "each.",
        "* **Negatives** for the `unknown` class: synthetic non-digit words (commands, "
        "common words, near misses such as \"ten\", \"hero\", \"seventy\"), reversed and "
        "time-shuffled speech, tones and noise bursts.",
        "",
        "## Method",
        "",
        "Front end (`agent/frontend.py`, shared with the daemon): Google's pretrained "
        "speech_embedding (see NOTICE) on a 1.5 s window at 16 kHz, band-limited to 4 kHz, the "
        "utterance centred and padded with background noise; 9 embedding frames flattened plus "
        f"their mean and max ({_head_dim(manifest)} values). "
        f"Augmentation of each real clip ({recipe['aug_copies']} copies): speed 0.85-1.15 "
        "(pitch and vocal-tract warp), gain -20..+6 dB, white noise 5-30 dB SNR (70 %), "
        "VAD-like padding (50 %). Classifier: StandardScaler → MLP "
        f"({', '.join(map(str, recipe['hidden']))} ReLU units, alpha {recipe['alpha']}, "
        f"{recipe['max_iter']} epochs), exported with skl2onnx; temperature scaling appended to "
        "the graph (Log → Div → Softmax).",
        "",
        "Model selection and every figure below: **leave-one-speaker-out** cross-validation "
        "(train on four recorded speakers plus all synthetic voices, test on the fifth); never "
        "a random split, since the takes of one speaker are near-duplicates.",
        "",
        "## Results (leave-one-speaker-out)",
        "",
        "| speaker | accent | clean | 10 dB SNR | 20 dB quieter | VAD padding |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    from agent.training.dataset import ACCENTS

    for s in spk:
        lines.append(f"| {s} | {ACCENTS.get(s, '?')} | " + " | ".join(
            pct(c[k]["per_speaker"][s]) for k in ("clean", "snr10", "quiet20", "padded")) + " |")
    lines.append("| **mean** | | " + " | ".join(
        f"**{pct(c[k]['mean'])}**" for k in ("clean", "snr10", "quiet20", "padded")) + " |")
    lines.append("| worst | | " + " | ".join(
        pct(c[k]["worst"]) for k in ("clean", "snr10", "quiet20", "padded")) + " |")
    th = report["threshold"]
    cal = report["calibration"]
    neg = report["negatives"]
    lines += [
        "",
        "Per class (clean): " + ", ".join(f"{d}: {pct(v)}" for d, v in
                                          report["per_class"].items()) + ".",
        "",
        "Per accent (clean): " + ", ".join(f"{a}: {pct(v)}" for a, v in
                                           report["per_accent"].items()) + ".",
        "",
        "Confusion matrix (rows: spoken digit, columns: decided class; clean, all folds):",
        "",
        "| | " + " | ".join(report["confusion"]["columns"]) + " |",
        "| --- " * (len(report["confusion"]["columns"]) + 1) + "|",
    ]
    for d, row in zip(report["confusion"]["rows"], report["confusion"]["counts"], strict=True):
        lines.append(f"| **{d}** | " + " | ".join(str(v) for v in row) + " |")
    lines += [
        "",
        "## Calibration and automation",
        "",
        f"Temperature {cal['temperature']:.3f} fitted on the out-of-fold scores. Expected "
        f"calibration error (15 bins; temperature fitted without the tested speaker): "
        f"**{cal['ece']:.3f}** (uncalibrated {cal['ece_uncalibrated']:.3f}).",
        "",
        f"Acceptance threshold **{th['value']:.3f}** (`calibration/{manifest['name']}/"
        f"thresholds.json`), chosen for a precision of {pct(th['target_precision'])} of accepted "
        f"decisions: out of fold it gives precision **{pct(th['precision'])}** at coverage "
        f"**{pct(th['coverage'])}** of digits. In the default `partial` mode the agent acts at "
        "or above it and abstains (asks again) below it.",
        "",
        f"Open set: false accepts on {neg['n']} non-digit negatives never seen in training: "
        f"**{pct(neg['false_accepts'])}** (" + ", ".join(
            f"{k}: {pct(v)}" for k, v in neg["by_kind"].items()) + "). Digits rejected as "
        f"`unknown`: {pct(report['rejected_as_unknown'])}.",
        "",
        "## Targets",
        "",
        "| measure | target | reached |",
        "| --- | --- | --- |",
    ]
    for name, (target, value, ok) in targets.items():
        lines.append(f"| {name} | {target} | {value} {'✓' if ok else '✗'} |")
    lines += [
        "",
        f"Model file {size_bytes / 1e6:.2f} MB; features + inference {latency_ms:.2f} ms per "
        f"utterance (one core); training {train_seconds / 60:.1f} min on a 2-core machine "
        "(`edge-voice-agent train --data ../shared/data/fsdd/recordings`, seed "
        f"{manifest['training'].get('seed', 0)}; synthesising the speech on a first run, "
        "before it is cached, adds about 3.5 min).",
        "",
        "## Known limits",
        "",
        "* Five male recorded speakers: women's and children's voices are covered only by the "
        "synthetic voices; expect lower accuracy and more abstentions for them until real "
        "recordings are added.",
        "* White noise at 10 dB SNR costs about ten points; babble and music were not tested.",
        "* `unknown` is learned from synthetic words and signal tricks; real-world sounds "
        "(TV, coughs) are only approximated. Sequences of digits spoken without pauses are one "
        "utterance for the VAD and are not supported.",
        "* The confidence is calibrated on these speakers; under drift (a new microphone, a new "
        "population of voices) the estimated accuracy published in telemetry is optimistic.",
        "",
        "## What was tried and did not help (leave-one-speaker-out)",
        "",
        "* Measured during model selection (digits only, no `unknown` class): hand-built MFCC "
        "pooling 0.74-0.79; log-mel + DCT + SVC 0.85 (real speakers only); + synthetic voices "
        "0.90; + new trimming and spectral noise subtraction 0.87 on real only; + noisier "
        "augmentation, 2-3 copies, SVC on 96-128 PCA dims **0.910** (worst speaker 0.888, 10 dB "
        "0.80): the best accuracy found, but 6.8 MB, 2.6 ms per utterance, and vote-based "
        "scores that cannot be calibrated (coverage 0.03 at 99 % precision), so not shipped. The "
        "same recipe with an MLP: 0.888.",
        "* No gain (within noise): per-band normalisation (0.64-0.77, hurts), linear versus "
        "spectral-change alignment alone, log-floor and trim thresholds, MLP width and "
        "regularisation, an ensemble of 5 MLPs, PCA-whitened MLP input, wider speed ranges.",
        "* The `unknown` class costs 3-5 points of plain accuracy (5 % of clean digits are "
        "rejected as unknown) in exchange for an explicit open-set outcome.",
        "* Run-to-run noise: one MLP's per-speaker accuracy moved by up to 4.4 points between two "
        "trainings that differed only in converter dither; read per-speaker figures as ±3 points "
        "and the mean as ±1.",
        "",
    ]
    return "\n".join(lines)
