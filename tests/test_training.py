"""The training pipeline end to end on a small subset, its artefacts, and `evaluate`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.model import ModelRunner
from agent.resources import demo_audio
from tests.conftest import eva

pytest.importorskip("sklearn", reason="the train extra is not installed")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fsdd):
    """A small model trained by the CLI on three speakers (real data, few synthetic clips)."""
    root = tmp_path_factory.mktemp("train")
    r = eva("train", "--data", str(fsdd), "--small", "--limit-per-class", "5", "--speakers",
            "theo,lucas,jackson", "--out", str(root / "model"), "--calibration-out",
            str(root / "calib"), "--cache", str(root / "cache"), "--name", "tiny",
            timeout=600)
    assert r.returncode == 0, r.stderr
    return root, r.stderr


def test_training_writes_every_artefact(trained):
    root, log = trained
    for f in ("model/head.onnx", "model/melspectrogram.onnx", "model/embedding_model.onnx",
              "model/NOTICE", "model/manifest.json", "model/MODEL_CARD.md",
              "model/evaluation.json", "calib/thresholds.json", "calib/baseline.json",
              "calib/oof.npz"):
        assert (root / f).is_file(), f
    m = json.loads((root / "model/manifest.json").read_text())
    assert m["classes"][-1] == "unknown" and m["unknown_label"] == "unknown"
    assert m["training"]["speakers"] == ["jackson", "lucas", "theo"]
    assert m["training"]["onnx_max_abs_diff"] < 1e-4   # ONNX == scikit-learn (checked in train)
    card = (root / "model/MODEL_CARD.md").read_text()
    assert "CC BY-SA 4.0" in card and "leave-one-speaker-out" in card
    for s in ("jackson", "lucas", "theo"):
        assert f"| {s} |" in card
    assert "LOSO clean" in log


def test_exported_onnx_matches_scikit_learn(tmp_path):
    from dataclasses import replace

    from agent.training.export import check_against_sklearn, to_onnx_bytes
    from agent.training.recipe import Recipe, fit, scores, softmax

    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 30)).astype(np.float32)
    y = rng.integers(0, 11, 400)
    model = fit(x, y, replace(Recipe(), hidden=(16,), max_iter=50), 0)
    blob = to_onnx_bytes(model, 0.6, 30)
    assert check_against_sklearn(blob, model, 0.6, x[:100]) < 1e-5
    p = softmax(scores(model, x[:5]), 0.6)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)


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
    assert decisions and all(d["model"] == "tiny@2.0.0" for d in decisions)
    assert all(d["accepted"] == (d["confidence"] >= thr["threshold"] and d["label"] != "unknown")
               for d in decisions)
    # a thresholds file for another model build is refused, not silently used
    other = dict(thr, sha256="0" * 64)
    (tmp_path / "t.json").write_text(json.dumps(other))
    r = eva("run", "--source", str(demo_audio()), "--decisions", "-", "--model",
            str(root / "model"), "--model-thresholds", str(tmp_path / "t.json"))
    assert r.returncode == 1 and "calibrated for" in r.stderr


def test_evaluate_reports_every_number(fsdd, trained):
    root, _ = trained
    r = eva("evaluate", "--data", str(fsdd), "--small", "--limit-per-class", "4", "--speakers",
            "theo,lucas", "--cache", str(root / "cache"), "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["method"] == "leave-one-speaker-out" and rep["speakers"] == ["lucas", "theo"]
    for cond in ("clean", "snr10", "quiet20", "padded"):
        c = rep["conditions"][cond]
        assert set(c["per_speaker"]) == {"lucas", "theo"} and 0 <= c["worst"] <= c["mean"] <= 1
    assert set(rep["per_class"]) == {str(d) for d in range(10)}
    assert set(rep["per_accent"]) == {"USA", "DEU/German"}
    counts = np.array(rep["confusion"]["counts"])
    assert counts.shape == (10, 11) and counts.sum() == 2 * 10 * 4
    assert 0 <= rep["calibration"]["ece"] <= 1 and rep["calibration"]["temperature"] > 0
    th = rep["threshold"]
    assert {"value", "precision", "coverage", "target_precision"} <= set(th)
    assert 0 <= rep["negatives"]["false_accepts"] <= 1 and rep["negatives"]["by_kind"]
    human = eva("evaluate", "--data", str(fsdd), "--small", "--limit-per-class", "4",
                "--speakers", "theo,lucas", "--cache", str(root / "cache"), timeout=600)
    assert human.returncode == 0
    for needle in ("accuracy clean", "per accent", "per class", "ECE", "coverage",
                   "false accepts", "confusion"):
        assert needle in human.stdout
