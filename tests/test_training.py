"""The training pipeline end to end on a small subset, its artefacts, `evaluate`, the exported
graphs against scikit-learn, and the shipped model's open-set rule on sounds it never heard."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from agent.recognition.model import ModelRunner
from agent.resources import calibration_dir, default_model_dir, demo_audio
from tests.conftest import eva

pytest.importorskip("sklearn", reason="the train extra is not installed")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fsdd, speech_commands, talk):
    """A small model trained by the CLI on three FSDD speakers, a few Speech Commands clips and
    a few sentences of people talking (few synthetic clips)."""
    root = tmp_path_factory.mktemp("train")
    r = eva("train", "--data", str(fsdd), "--speech-commands", str(speech_commands), "--small",
            "--talk", str(talk),
            "--limit-per-class", "3", "--speakers", "theo,lucas,jackson", "--out",
            str(root / "model"), "--calibration-out", str(root / "calib"), "--cache",
            str(root / "cache"), "--name", "tiny", "--model-version", "3.0.0", timeout=600)
    assert r.returncode == 0, r.stderr
    return root, r.stderr


def test_training_writes_every_artefact(trained):
    root, log = trained
    for f in ("model/head.onnx", "model/rejector.onnx", "model/melspectrogram.onnx",
              "model/embedding_model.onnx", "model/NOTICE", "model/manifest.json",
              "model/MODEL_CARD.md", "model/evaluation.json", "calib/thresholds.json",
              "calib/baseline.json", "calib/oof.npz"):
        assert (root / f).is_file(), f
    m = json.loads((root / "model/manifest.json").read_text())
    assert m["classes"][-1] == "unknown" and m["unknown_label"] == "unknown"
    assert m["version"] == "3.0.0"
    assert m["training"]["speakers"] == ["jackson", "lucas", "theo"]
    assert m["training"]["onnx_max_abs_diff"] < 1e-4   # ONNX == scikit-learn (checked in train)
    assert m["training"]["counts"]["speech_commands_words"] > 0
    card = (root / "model/MODEL_CARD.md").read_text()
    for needle in ("CC BY-SA 4.0", "CC BY 4.0", "Warden", "leave-one-speaker-out",
                   "Apache-2.0", "CC BY-NC-SA 4.0"):
        assert needle in card, needle
    for s in ("jackson", "lucas", "theo"):
        assert f"| {s} |" in card
    assert "LOSO clean" in log


def test_exported_graphs_match_scikit_learn():
    """Head (temperature) and rejector (Platt) graphs give scikit-learn's calibrated numbers."""
    from dataclasses import replace

    from agent.training.export import _run, check_against_sklearn, head_to_onnx, rejector_to_onnx
    from agent.training.recipe import (
        Recipe,
        fit_head,
        fit_rejector,
        head_scores,
        rejector_logit,
        sigmoid,
        softmax,
    )

    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 30)).astype(np.float32)
    y = rng.integers(0, 10, 400)
    x[np.arange(400), y] += 2.0
    r = replace(Recipe(), rejector_hidden=(16,), rejector_max_iter=50)
    head = fit_head(x, y, r, 0)
    y12 = np.where(rng.random(400) < 0.3, 10 + rng.integers(0, 2, 400), y)  # digit/word/sound
    rej = fit_rejector(x, y12, r, 0)
    hb, rb = head_to_onnx(head, 0.6, 30), rejector_to_onnx(rej, (0.8, -0.3), 30)
    np.testing.assert_allclose(_run(hb, x[:50]), softmax(head_scores(head, x[:50]), 0.6),
                               atol=1e-5)
    np.testing.assert_allclose(_run(rb, x[:50])[:, 1],
                               sigmoid(0.8 * rejector_logit(rej, x[:50]) - 0.3), atol=1e-5)
    assert check_against_sklearn(hb, head, 0.6, rb, rej, (0.8, -0.3), x[:100]) < 1e-5


def _shipped() -> tuple[ModelRunner, list[float]]:
    model = default_model_dir()
    thr = json.loads((calibration_dir("fsdd-digits") / "thresholds.json").read_text())
    return ModelRunner(model), [float(thr["per_class"][str(d)]) for d in range(10)]


@pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("flite") is None,
                    reason="the open-set test synthesises speech with espeak-ng and flite")
def test_shipped_open_set_rule_rejects_synthetic_non_digits_and_keeps_digits(tmp_path):
    """Voices and words the shipped model never trained on: held-out voices saying digits are
    acted on; held-out words are mostly rejected, music and noise always."""
    from agent.training import augment as A
    from agent.training import synth as S
    from agent.training.evaluate import word_group

    runner, thr = _shipped()
    digit_jobs = [("flite", "slt", 1.0, 170.0, w) for w in S.DIGIT_WORDS] + \
                 [("espeak", "en-gb-scotland", 150, 50, w) for w in S.DIGIT_WORDS]
    heldout_words = [w for w in S.NEG_WORDS if word_group(w) == "B"][::3][:16]
    word_jobs = [("espeak", "en-us+m3", 160, 40, w) for w in heldout_words]
    clips = [S.run_job(j) for j in digit_jobs + word_jobs]
    assert all(c is not None for c in clips)
    rng = np.random.default_rng(7)
    sounds = [A.music(rng) for _ in range(8)] + [A.noise(rng) for _ in range(8)]

    def decide(x: np.ndarray) -> tuple[int, bool]:
        p = runner.predict(runner.features(x)[None])[0]
        k = int(p.argmax())
        return k, k < 10 and float(p[k]) >= thr[k]

    digits = [decide(c) for c in clips[:len(digit_jobs)]]
    kept = sum(acc and k == i % 10 for i, (k, acc) in enumerate(digits))
    assert kept >= 0.8 * len(digit_jobs), digits
    accepted = [w for w, c in zip(heldout_words, clips[len(digit_jobs):], strict=True)
                if decide(c)[1]]
    # the evaluation measures 0.21 of held-out synthetic words accepted (target 0.01, not met;
    # see the model card): most are rejected, digits are kept
    assert len(accepted) <= len(heldout_words) // 4, accepted
    assert sum(decide(s)[1] for s in sounds) == 0


def _replay_thresholds(calib) -> None:
    """thresholds.json is what choose_thresholds gives on the out-of-fold decisions stored next
    to it, and every held-out group reaches the target precision there."""
    from agent.training.thresholds import choose_thresholds, group_precision

    thr = json.loads((calib / "thresholds.json").read_text())
    oof = np.load(calib / "oof.npz")
    p, y, g = oof["pool_probabilities"], oof["pool_labels"], oof["pool_groups"]
    assert len(set(g)) >= 3 and len(p) == len(y) == len(g)
    glob, per = choose_thresholds(p, y, g, thr["target_precision"],
                                  max_words=thr["max_word_rate"])
    assert round(glob, 6) == thr["threshold"]
    assert [round(float(v), 6) for v in per] == [thr["per_class"][str(d)] for d in range(10)]
    for name, (prec, n, _, words) in group_precision(p, y, g, per).items():
        assert n == 0 or prec >= thr["target_precision"], (name, prec, n)
        assert words is None or words <= thr["max_word_rate"], (name, words)
    assert thr["out_of_fold"]["worst_group_precision"] >= thr["target_precision"]


def test_shipped_thresholds_are_reproducible_from_calibration():
    _replay_thresholds(calibration_dir("fsdd-digits"))


def test_trained_thresholds_are_reproducible_from_calibration(trained):
    _replay_thresholds(trained[0] / "calib")


def test_threshold_file_is_produced_and_loaded(trained, tmp_path):
    root, _ = trained
    thr = json.loads((root / "calib/thresholds.json").read_text())
    runner = ModelRunner(root / "model")
    assert thr["sha256"] == runner.manifest.sha256
    assert 0.0 < thr["threshold"] <= 1.0 and thr["target_precision"] == 0.99
    r = eva("run", "--source", str(demo_audio()), "--decisions", "-", "--model",
            str(root / "model"), "--model-thresholds", str(root / "calib/thresholds.json"),
            "--monitoring-baseline", str(root / "calib/baseline.json"), "--log-level", "INFO")
    assert r.returncode == 0, r.stderr
    assert f"threshold {thr['threshold']:.3f}" in r.stderr
    decisions = [json.loads(x) for x in r.stdout.splitlines()]
    assert decisions and all(d["model"] == "tiny@3.0.0" for d in decisions)
    per = thr["per_class"]
    assert all(d["accepted"] == (d["label"] != "unknown" and d["confidence"] >= per[d["label"]]
                                 and d.get("addressed", True)) for d in decisions)
    # a thresholds file for another model build is refused, not silently used
    other = dict(thr, sha256="0" * 64)
    (tmp_path / "t.json").write_text(json.dumps(other))
    r = eva("run", "--source", str(demo_audio()), "--decisions", "-", "--model",
            str(root / "model"), "--model-thresholds", str(tmp_path / "t.json"))
    assert r.returncode == 1 and "calibrated for" in r.stderr


def test_evaluate_reports_every_number(fsdd, speech_commands, talk, trained):
    root, _ = trained
    args = ("evaluate", "--data", str(fsdd), "--speech-commands", str(speech_commands),
            "--talk", str(talk),
            "--small", "--limit-per-class", "3", "--speakers", "theo,lucas,jackson", "--cache",
            str(root / "cache"))
    r = eva(*args, "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["method"] == "leave-one-speaker-out"
    assert rep["speakers"] == ["jackson", "lucas", "theo"]
    for cond in ("clean", "white10", "babble10"):
        c = rep["conditions"][cond]
        assert set(c["per_speaker"]) == {"jackson", "lucas", "theo"}
        assert 0 <= c["worst"] <= c["mean"] <= 1
    assert set(rep["per_class"]) == {str(d) for d in range(10)}
    assert set(rep["per_accent"]) == {"USA", "DEU/German"}
    counts = np.array(rep["confusion"]["counts"])
    assert counts.shape == (10, 11) and counts.sum() == 3 * 10 * 3
    assert 0 <= rep["calibration"]["ece"] <= 1 and rep["calibration"]["temperature"] > 0
    th = rep["threshold"]
    assert {"value", "precision", "coverage", "target_precision", "per_class", "by_group",
            "by_source", "worst_group", "nested", "nested_worst"} <= set(th)
    # precision per held-out group: each FSDD speaker and each Speech Commands speaker group
    assert {"jackson", "lucas", "theo", "sc0", "sc1", "sc2"} == set(th["by_group"])
    assert set(th["by_source"]) == {"fsdd", "speech-commands"}
    fa = rep["false_activations"]
    for kind in ("talk", "words", "music", "noise"):
        assert fa[kind]["hours"] > 0 and fa[kind]["per_hour"] >= 0, kind
        assert fa[kind]["per_hour"] <= fa[kind]["per_hour_model"]  # the rule only removes
    neg = rep["negatives"]
    assert 0 <= neg["false_accepts"] <= 1
    assert {"synthetic words", "babble", "music", "noise", "tv"} <= set(neg["by_kind"])
    sc = rep["speech_commands"]
    assert sc["digits"] > 0 and sc["words"] > 0 and 0 <= sc["words_accepted"] <= 1
    assert 0 <= rep["heldout_voices"]["accuracy"] <= 1
    assert {"head_only_fsdd", "with_rejector_fsdd"} <= set(rep["open_set_cost"])
    human = eva(*args, timeout=600)
    assert human.returncode == 0
    for needle in ("accuracy clean", "babble 10 dB", "per accent", "per class", "ECE",
                   "coverage", "false accepts", "Speech Commands", "open-set cost",
                   "confusion", "precision by held-out group", "precision by source",
                   "false activations per hour", "talk", "music", "noise"):
        assert needle in human.stdout
