"""`train --vocabulary`: a bad word list is one clear line; a model learned from text alone
recognises a synthetic voice it never trained on and rejects other words; the card states, per
word, how many real and synthetic examples it had."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from agent.errors import ConfigError
from agent.training.words import near_variants, parse_vocabulary, recording_label, spoken
from tests.conftest import eva

pytest.importorskip("sklearn", reason="the train extra is not installed")

WORDS = ("happy", "marvin")
# (engine, voice) pairs that no training set ever uses (agent/training/synth.HELDOUT_VOICES)
HELDOUT = (("flite", "slt"), ("flite", "rms"), ("espeak", "en-gb-scotland"))
OTHERS = ("table", "window", "seven", "yellow")


def test_vocabulary_words_are_validated():
    assert parse_vocabulary("Yes, no,stop") == ("yes", "no", "stop")
    assert parse_vocabulary("hey jarvis,3,wi-fi") == ("hey jarvis", "3", "wi-fi")
    assert spoken("hey jarvis") == "hey jarvis" and spoken("3") == "three"
    assert spoken("12") == "one two"
    assert recording_label("three") == recording_label("3") == "3"
    no = "not a vocabulary word"
    for bad, why in (("yes,,no", "empty word"), ("", "empty word"), ("yes!", no),
                     ("lights_on", no), ("lights  on", no), ("a" * 25, no),
                     ("yes,unknown", "own class"), ("yes,no,yes", "repeats"),
                     ("3,three", "repeats"),
                     (",".join(a + b for a in "abcdef" for b in "abcdef"), "at most")):
        with pytest.raises(ConfigError, match=why):
            parse_vocabulary(bad)


def test_near_variants_are_one_sound_away():
    v = near_variants("h'api")          # espeak-ng's "happy"
    assert "h'api" not in v
    assert "d'api" in v and "h'adi" in v  # a consonant swapped
    assert all(len(x) <= len("h'api") + 2 for x in v)
    assert "p'Vp" in near_variants("'Vp") or "'pVp" in near_variants("'Vp")  # "up" → "pup"


@pytest.mark.parametrize("args, needle", [
    (["--vocabulary", "yes,Yes"], "--vocabulary: 'yes' repeats 'yes'"),
    (["--vocabulary", "yes,no", "--text-only", "stop"], "--text-only: stop not in"),
    (["--text-only", "stop"], "--text-only needs --vocabulary"),
    ([], "train needs --data"),
])
def test_bad_word_list_is_one_line(tmp_path, capsys, args, needle):
    from agent.cli import main

    assert main(["train", *args, "--out", str(tmp_path / "m"), "--model-version", "1.0.0"]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "m").exists()


def _say(engine: str, voice: str, text: str, path) -> np.ndarray:
    from agent.training.dataset import load_audio
    from agent.training.synth import trim

    raw = path.with_suffix(".raw.wav")
    cmd = ["flite", "-voice", voice, "-t", text, "-o", str(raw)] if engine == "flite" else \
        ["espeak-ng", "-v", voice, "-w", str(raw), text]
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)
    return trim(load_audio(raw, 16000))


@pytest.fixture(scope="module")
def text_only(tmp_path_factory):
    """A two-word model from text alone (no recording at all), small recipe."""
    if not all(shutil.which(e) for e in ("espeak-ng", "flite", "text2wave", "sox")):
        pytest.skip("speech synthesis engines (espeak-ng, flite, festival, sox) not installed")
    root = tmp_path_factory.mktemp("vocab")
    r = eva("train", "--vocabulary", ",".join(WORDS), "--small", "--out", str(root / "model"),
            "--cache", str(root / "cache"), timeout=600)
    assert r.returncode == 0, r.stderr
    return root / "model"


def test_text_only_model_recognises_a_voice_it_never_heard(text_only, tmp_path):
    from agent.recognition.decision import Thresholds
    from agent.recognition.model import ModelRunner

    runner = ModelRunner(text_only)
    m = runner.manifest
    assert m.classes == (*WORDS, "unknown") and m.version == "1.0.0"
    th = Thresholds.read(text_only / "calibration" / "thresholds.json")
    per = dict(th.per_class)

    def decide(x: np.ndarray) -> tuple[str, bool]:
        p = runner.predict(runner.features(x)[None])[0]
        label = m.classes[int(p.argmax())]
        return label, label != "unknown" and p.max() >= per.get(label, th.threshold)

    heard = [decide(_say(e, v, w, tmp_path / f"{e}-{v}-{w}.wav"))
             for e, v in HELDOUT for w in WORDS]
    right = [lab == w for (lab, _), w in zip(heard, [w for _ in HELDOUT for w in WORDS],
                                             strict=True)]
    assert sum(right) >= 5, heard                       # top word right for 5 of 6 clips
    assert sum(a and r for (_, a), r in zip(heard, right, strict=True)) >= 3, heard
    others = [decide(_say(e, v, w, tmp_path / f"{e}-{v}-{w}.wav"))
              for e, v in HELDOUT for w in OTHERS]
    assert not any(a for _, a in others), others       # no other word acted on


def test_card_states_real_and_synthetic_counts_per_word(text_only):
    card = (text_only / "MODEL_CARD.md").read_text()
    ev = json.loads((text_only / "evaluation.json").read_text())
    for w in WORDS:
        v = ev["per_word"][w]
        assert v["real"] == 0 and v["synthetic"] > 20 and v["text_only"]
        assert f"| `{w}` (text only) | 0 | 0 | {v['synthetic']} |" in card
    assert "real recordings trained on" in card and "synthetic trained on" in card
    m = json.loads((text_only / "manifest.json").read_text())
    assert m["training"]["counts"]["per_word"]["happy"]["synthetic"] == \
        ev["per_word"]["happy"]["synthetic"]


def test_rejector_weighs_a_words_few_real_clips_like_its_synthetic_ones():
    """A word with 3 real and 30 synthetic clips next to 200 other clips: its real clips
    together weigh as much as its synthetic ones, the words as much as everything else."""
    from agent.training.vocabulary import REAL, TRAIN_SYNTH, Table, rejector_weights

    y = np.r_[np.zeros(3), np.zeros(30), np.ones(10), np.full(200, 2)].astype(int)
    role = np.r_[[REAL] * 3, [TRAIN_SYNTH] * 30, [TRAIN_SYNTH] * 10, [REAL] * 200]
    n = len(y)
    t = Table(np.zeros((n, 2), np.float32), y, np.full(n, "g"), np.full(n, "w"),
              np.full(n, "s"), role, np.zeros(n, bool))
    w = rejector_weights(t, k=2)
    real0, syn0 = (y == 0) & (role == REAL), (y == 0) & (role == TRAIN_SYNTH)
    assert w[real0].sum() == pytest.approx(w[syn0].sum())
    assert w[y < 2].sum() == pytest.approx(w[y == 2].sum())
    assert w[y == 1].sum() < w[y == 0].sum()          # one word's clips are not inflated
    assert w.mean() == pytest.approx(1.0)


def test_balanced_platt_is_the_pools_prior_removed():
    """Fitted as if words and other speech were equally frequent: on a pool with ten times more
    other speech, the same logit reads higher than with the pool's prior, by about log(10)."""
    from agent.training.recipe import fit_platt

    rng = np.random.default_rng(0)
    lg = np.r_[rng.normal(2, 1, 200), rng.normal(-2, 1, 2000)]
    y = np.r_[np.ones(200), np.zeros(2000)]
    a0, b0 = fit_platt(lg, y)
    a1, b1 = fit_platt(lg, y, balanced=True)
    assert a1 == pytest.approx(a0, rel=0.1)
    assert (b1 - b0) == pytest.approx(np.log(10), abs=0.3)
