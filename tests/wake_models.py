"""Wake models learned from text alone, for tests and benchmarks/bench_wake.py.

`make_wake_model(dst, word)` synthesises the wake word and other words with espeak-ng and
flite (agent/training/synth.py, held-out voices excluded), trains a logistic-regression head on
the same head inputs the daemon computes — the centred window of a clip (`features`) and the
80 ms sliding windows (`sliding_head_inputs`) over "WORD, pause, digit" said in one breath, over
other words and over synthetic sentences (running speech) —
and writes a model directory with classes [WORD, unknown] and `calibration/thresholds.json`
inside, the front end copied from the bundled model (so it shares its embedding). It stands
in for `edge-voice-agent train --vocabulary WORD` (issue 18b) where that is not available.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from agent.recognition.frontend import sliding_head_inputs
from agent.recognition.model import (
    MANIFEST,
    Component,
    Manifest,
    ModelRunner,
    build_digest,
    sha256_file,
)
from agent.resources import default_model_dir
from agent.training import synth as S

WAKE_WORD = "jarvis"
# words one or two sounds away from the wake word, and everyday words
NEAR = ("jar", "service", "nervous", "harvest", "marvel", "travis", "carcass", "jealous",
        "chances", "garbage", "java", "curious", "jarring", "harness", "jervis", "davis")


def synth(words: list[str], n_espeak: int, n_flite: int, seed: int, cache: Path,
          n_festival: int = 0) -> list[np.ndarray]:
    """Clips of `words` from the training voices (never HELDOUT_VOICES), cached in `cache`."""
    kind = "wake-" + "-".join(w.replace(" ", "_") for w in words[:2])
    return list(S.synthesize(cache, kind, words, n_espeak, n_flite, n_festival, seed,
                             log=lambda *_: None).split(heldout=False).audio)


def one_breath(wake: np.ndarray, command: np.ndarray, gap_s: float) -> np.ndarray:
    gap = np.zeros(int(gap_s * S.SR), np.float32)
    return np.concatenate([wake, gap, command]).astype(np.float32)


def training_set(runner: ModelRunner, text: str, n_pos: int, n_neg: int, seed: int,
                 cache: Path, extra_negatives: list[np.ndarray] = (), festival: bool = False,
                 sliding_per_clip: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(head inputs, 1 for the wake phrase) from synthetic voices (+ real negative clips)."""
    rng = np.random.default_rng(seed)
    pos = synth([text], n_pos, max(4, n_pos // 6), seed, cache,
                n_pos // 6 if festival else 0)
    neg_words = sorted(set(S.DIGIT_WORDS) | set(NEAR) | set(S.NEG_WORDS))
    neg = synth(neg_words, n_neg, max(10, n_neg // 6), seed + 1, cache,
                n_neg // 6 if festival else 0)
    digits = synth(S.DIGIT_WORDS, 40, 10, seed + 2, cache)
    neg = neg + list(extra_negatives)
    x, y = [], []
    for a in pos:
        x.append(runner.features(a))
        y.append(1)
    sentences = synth(S.SENTENCES, max(12, n_neg // 10), max(6, n_neg // 40), seed + 3, cache)
    for a in neg:
        x.append(runner.features(a))
        y.append(0)
    # every position of the head sliding over other speech is "not the wake phrase": a few
    # windows of each clip, every window of running speech (synthetic sentences)
    for a in neg:
        h, _ = sliding_head_inputs(a, runner.embedder)
        x.extend(h[rng.choice(len(h), min(len(h), sliding_per_clip), replace=False)])
        y.extend([0] * min(len(h), sliding_per_clip))
    for a in sentences:
        h, _ = sliding_head_inputs(a, runner.embedder)
        x.extend(h)
        y.extend([0] * len(h))
    for a in pos:  # one breath: the windows at the wake word are positives, those at the
        d = digits[int(rng.integers(len(digits)))]   # digit negatives
        seg = one_breath(a, d, float(rng.uniform(0.05, 0.25)))
        h, centres = sliding_head_inputs(seg, runner.embedder)
        wake_c, cmd_c = len(a) // 2, len(seg) - len(d) // 2
        for hi, c in zip(h, centres, strict=True):
            if abs(c - wake_c) <= 1280:
                x.append(hi)
                y.append(1)
            elif abs(c - cmd_c) <= 2560:
                x.append(hi)
                y.append(0)
    return np.stack(x), np.array(y)


def write_wake_model(dst: Path, word: str, head_blob: bytes, threshold: float,
                     training: dict) -> Path:
    """A model directory with the bundled model's front end, `head_blob` as its head,
    classes [word, unknown] and calibration/thresholds.json inside."""
    src = default_model_dir()
    m = Manifest.read(src / MANIFEST)
    dst.mkdir(parents=True)
    comps = []
    for c in m.components:
        if c.role in ("melspectrogram", "embedding", "embedding_source"):
            shutil.copy(src / c.file, dst / c.file)
            comps.append(c)
    (dst / "head.onnx").write_bytes(head_blob)
    comps.append(Component(name="head", file="head.onnx", role="head", version="1.0.0",
                           licence="same as the project", sha256=sha256_file(dst / "head.onnx"),
                           source=f"tests/wake_models.py, text only: {word}"))
    wm = Manifest(name="wake-" + word.replace(" ", "-"), version="1.0.0", classes=(word, "unknown"),
                  sample_rate=m.sample_rate, frontend=m.frontend, components=tuple(comps),
                  unknown_label="unknown", training=training)
    (dst / MANIFEST).write_text(json.dumps(wm.to_dict(), indent=2) + "\n")
    (dst / "calibration").mkdir()
    (dst / "calibration" / "thresholds.json").write_text(json.dumps(
        {"model": wm.ref, "sha256": build_digest(comps), "threshold": threshold,
         "target_precision": 0.99}, indent=1) + "\n")
    return dst


def make_wake_model(dst: Path, text: str = WAKE_WORD, *, cache: Path | None = None,
                    n_pos: int = 60, n_neg: int = 160, seed: int = 0, threshold: float = 0.5,
                    c: float = 0.05, extra_negatives: list[np.ndarray] = (),
                    festival: bool = False, runner: ModelRunner | None = None) -> Path:
    """Train and write a wake model for `text` (classes [text, unknown])."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from agent.training.export import head_to_onnx

    runner = runner or ModelRunner(default_model_dir())
    x, y = training_set(runner, text, n_pos, n_neg, seed, cache or dst.parent / "synth-cache",
                        extra_negatives, festival)
    clf = make_pipeline(StandardScaler(), LogisticRegression(
        C=c, max_iter=500, class_weight="balanced", random_state=seed)).fit(x, 1 - y)
    # classes_ of the fit are [0 = word, 1 = unknown]: the graph's columns in manifest order
    blob = head_to_onnx(clf, 1.0, x.shape[1])
    return write_wake_model(dst, text, blob, threshold,
                            {"text_only": True, "positives": int(y.sum()),
                             "negatives": int(len(y) - y.sum()), "seed": seed})


def lay_out(parts: list[tuple[str, np.ndarray | float]], seed: int = 0, floor_dbfs: float = -60.0
            ) -> tuple[np.ndarray, list[dict]]:
    """A 16 kHz stream from ("name", clip) and ("pause", seconds) parts over a low noise floor;
    returns (audio, truth: one {"name", "start", "end"} per clip, seconds)."""
    rng = np.random.default_rng(seed)
    chunks, truth, t = [], [], 0
    for name, part in parts:
        if isinstance(part, float | int):
            chunks.append(np.zeros(int(part * S.SR), np.float32))
        else:
            a = np.asarray(part, np.float32)
            a = a * np.float32(0.3 / max(1e-6, float(np.abs(a).max())))
            truth.append({"name": name, "start": t / S.SR, "end": (t + len(a)) / S.SR})
            chunks.append(a)
        t += len(chunks[-1])
    x = np.concatenate(chunks)
    x = x + rng.standard_normal(len(x)).astype(np.float32) * np.float32(10 ** (floor_dbfs / 20))
    return x.astype(np.float32), truth
