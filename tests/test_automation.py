"""The five levels of automation, each as specified, through the real pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.errors import AgentError
from agent.recognition.decision import Policy
from agent.resources import demo_audio
from tests.conftest import eva

CLASSES = ("0", "1", "2", "unknown")


def probs(*p: float) -> np.ndarray:
    return np.array(p, np.float32)


@pytest.mark.parametrize("mode,expect", [
    ("full", [True, True, False]),
    ("partial", [True, False, False]),
    ("assist", [False, False, False]),
    ("shadow", [False, False, False]),
])
def test_policy_acts_by_mode(mode, expect):
    pol = Policy(mode, threshold=0.9, unknown_label="unknown")
    cases = [probs(0.95, 0.03, 0.01, 0.01),   # confident digit
             probs(0.60, 0.30, 0.05, 0.05),   # unsure digit
             probs(0.01, 0.01, 0.01, 0.97)]   # confident "not one of my words"
    got = [pol.decide(p, CLASSES)[3] for p in cases]
    assert got == expect
    label, conf, margin, _ = pol.decide(cases[1], CLASSES)
    assert (label, round(conf, 2), round(margin, 2)) == ("0", 0.6, 0.3)


def test_unknown_mode_is_refused():
    with pytest.raises(AgentError, match="allowed: off, shadow, assist, partial, full"):
        Policy("auto", 0.5)


def run_demo(mode: str) -> list[dict]:
    r = eva("run", "--source", str(demo_audio()), "--decisions", "-", "--mode", mode,
            "--log-level", "WARNING")
    assert r.returncode == 0, r.stderr
    return [json.loads(x) for x in r.stdout.splitlines()]


def test_modes_end_to_end():
    partial, full = run_demo("partial"), run_demo("full")
    assist, shadow, off = run_demo("assist"), run_demo("shadow"), run_demo("off")
    n = len(partial)
    assert n and all(len(x) == n for x in (full, assist, shadow, off))
    # the model's view is the same in every mode that runs it
    for other in (full, assist, shadow):
        assert [d["label"] for d in other] == [d["label"] for d in partial]
    thr = min((d["confidence"] for d in partial if d["accepted"]), default=1.0)
    assert all(d["accepted"] == (d["confidence"] >= thr) for d in partial)
    assert sum(d["accepted"] for d in full) >= sum(d["accepted"] for d in partial)
    assert all(not d["accepted"] and d["suggestion"] for d in assist)
    assert all(not d["accepted"] and d["mode"] == "shadow" for d in shadow)
    # off: human only — segments are still found, no model runs
    assert all(d["label"] is None and d["confidence"] is None and not d["accepted"]
               and d["model"] is None for d in off)
    assert [d["start"] for d in off] == [d["start"] for d in partial]


def test_per_class_thresholds_replace_the_single_one():
    pol = Policy("partial", 0.9, "unknown", per_class=(("0", 0.5), ("1", 0.99)))
    assert pol.decide(probs(0.60, 0.30, 0.05, 0.05), CLASSES)[3]        # "0" at 0.6 ≥ 0.5
    assert not pol.decide(probs(0.02, 0.95, 0.02, 0.01), CLASSES)[3]    # "1" at 0.95 < 0.99
    assert pol.decide(probs(0.02, 0.02, 0.95, 0.01), CLASSES)[3]        # "2": the single one


@pytest.mark.parametrize("length,forced,quiet,ok", [
    (0.6, False, None, True),     # a word at the start of the stream
    (0.6, False, 2.0, True),      # a word on its own
    (0.6, False, 0.2, False),     # right after other speech: a piece of a sentence
    (2.5, False, 2.0, False),     # too long for a command
    (0.6, True, 2.0, False),      # force-cut at max_utterance_ms: running speech
])
def test_addressing_rule(length, forced, quiet, ok):
    from agent.recognition.decision import Addressing

    rule = Addressing()
    assert rule.allows(length, forced, quiet) is ok
    pol = Policy("full", 0.0, "unknown", addressing=rule)
    # never acts on a segment that was not addressed to it, however confident, in any mode
    assert pol.decide(probs(0.99, 0.0, 0.0, 0.01), CLASSES, rule.allows(length, forced, quiet)
                      )[3] is ok
