"""Rolling out a new vocabulary is deliberate: a model whose classes differ from the running one
is refused (one line, a `rollout_refused` event) unless the rollout (`vocabulary_change`,
`fleet rollout start --allow-vocabulary-change`) or the person at the device (`models
install/activate --allow-vocabulary-change`) says so; then the actions table is checked against
the new words, and shadow and probation compare only what does not depend on the words."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from agent.recognition.model import MANIFEST, Manifest
from agent.resources import default_model_dir, demo_audio
from agent.rollout import command as cmd_mod
from agent.rollout.bundle import bundle_digest
from agent.rollout.command import CommandError, RolloutCommand
from agent.rollout.probation import VOCABULARY_BOUND, Limits, WindowKpis, judge
from tests.conftest import ROOT, eva
from tests.rollout_models import derive
from tests.test_rollout_device import of
from tests.test_rollout_device import run_agent as run
from tests.test_vocabulary import WORDS

ACTIVE = Manifest.read(default_model_dir() / MANIFEST)
ROLLOUT_SCHEMA = json.loads((ROOT / "docs" / "rollout.schema.json").read_text())


def words(tmp: Path, version: str = "1.0.0") -> Path:
    return derive(tmp / f"commands-{version}", classes=WORDS, name="commands", version=version)


def deliver(state: Path, model_dir: Path, mode: str, vocabulary_change: bool,
            rollout_id: str = "r-v") -> RolloutCommand:
    """The model in the inbox and the command as the agent saved it when it arrived."""
    inbox = state / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    m = Manifest.read(model_dir / MANIFEST)
    target = inbox / m.ref
    model_dir.rename(target)
    c = RolloutCommand(rollout_id, m.name, m.version, bundle_digest(target), 100.0, mode,
                       vocabulary_change)
    jsonschema.validate(c.to_payload(), ROLLOUT_SCHEMA)
    (state / "models").mkdir(parents=True, exist_ok=True)
    (state / "models" / "rollout.json").write_text(json.dumps(c.to_payload()))
    return c


# --- the command ---------------------------------------------------------------------------
def test_the_command_carries_vocabulary_change_only_when_set() -> None:
    c = RolloutCommand("r", "commands", "1.0.0", "a" * 64, 10.0, "activate")
    assert "vocabulary_change" not in c.to_payload()  # today's commands keep their bytes
    v = replace(c, vocabulary_change=True)
    assert v.to_payload()["vocabulary_change"] is True
    assert cmd_mod.parse(json.dumps(v.to_payload())) == v
    assert cmd_mod.parse(json.dumps(c.to_payload())) == c
    for bad in ("yes", 1, None):
        with pytest.raises(CommandError, match="vocabulary_change"):
            cmd_mod.parse(json.dumps({**c.to_payload(), "vocabulary_change": bad}))
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**c.to_payload(), "vocabulary_change": bad}, ROLLOUT_SCHEMA)


def test_fleet_rollout_start_sets_it_only_with_the_flag(tmp_path: Path) -> None:
    from agent.fleet.rollout import command_from_args

    d = words(tmp_path)
    base = dict(id="r-v", model_dir=d, model=None, sha256=None, percent=10.0, mode="activate",
                device=None)
    assert not command_from_args(argparse.Namespace(**base)).vocabulary_change
    c = command_from_args(argparse.Namespace(**base, allow_vocabulary_change=True))
    assert c.vocabulary_change and c.ref == "commands@1.0.0"
    from agent.cli import build_parser

    args = build_parser().parse_args(["fleet", "rollout", "start", "--broker",
                                      "mqtt://127.0.0.1:1883", "--id", "r-v", "--model-dir",
                                      str(d), "--percent", "10", "--mode", "activate",
                                      "--allow-vocabulary-change"])
    assert command_from_args(args).vocabulary_change


# --- on the device -------------------------------------------------------------------------
def test_a_new_vocabulary_is_refused_without_the_flag(tmp_path: Path) -> None:
    state = tmp_path / "state"
    c = deliver(state, words(tmp_path), "activate", vocabulary_change=False)
    msgs, decisions, stderr = run(tmp_path, demo_audio(), state)
    (refused,) = [e for e in of(msgs, "event") if e["event"] == "rollout_refused"]
    assert refused["model"] == c.ref and refused["state"] == "refused"
    reason = refused["reason"]
    assert f"another vocabulary than {ACTIVE.ref}" in reason
    assert "--allow-vocabulary-change" in reason and "new yes,no,up" in reason
    assert len(reason) <= 200
    assert "rollout refused" in stderr and len([ln for ln in stderr.splitlines()
                                                if "rollout refused" in ln]) == 1
    assert all(d["model"] == ACTIVE.ref for d in decisions)
    assert of(msgs, "stats")[-1]["rollout"]["state"] == "refused"
    assert not (state / "models" / "slots").exists() or \
        not any((state / "models" / "slots").iterdir())


def test_a_shadow_with_another_vocabulary_compares_only_what_it_can(tmp_path: Path) -> None:
    state = tmp_path / "state"
    c = deliver(state, words(tmp_path), "shadow", vocabulary_change=True)
    msgs, decisions, _ = run(tmp_path, demo_audio(), state)
    (started,) = [e for e in of(msgs, "event") if e["event"] == "shadow_started"]
    assert "agreement and estimated accuracy not compared" in started["reason"]
    assert started["model"] == c.ref
    shadows = [s["rollout"]["shadow"] for s in of(msgs, "stats")]
    judged = [s for s in shadows if s["n"] >= 3]
    assert judged and sum(s["n"] for s in shadows) == len(decisions)
    for s in judged:
        assert s["agreement"] is None and s["estimated_accuracy"] is None
        assert s["abstain_rate"] is not None and s["latency_ms_p95"] is not None
    assert all(d["model"] == ACTIVE.ref for d in decisions)  # a shadow never acts


def test_an_allowed_vocabulary_change_is_activated_warned_and_judged(tmp_path, make_stream):
    stream = make_stream(seconds=100, seed=31).with_suffix(".wav")
    state = tmp_path / "state"
    c = deliver(state, words(tmp_path), "activate", vocabulary_change=True)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[actions]\n"7" = ["/bin/true"]\n"up" = ["/bin/true"]\n')
    msgs, decisions, stderr = run(
        tmp_path, stream, state, "--config", str(cfg), "--rollout-baseline-windows", "2",
        "--rollout-probation-windows", "2", "--rollout-min-utterances", "2",
        "--rollout-max-abstain-increase", "0.6", "--rollout-max-latency-ratio", "50",
        "--rollout-max-retry-increase", "0.9")
    events = of(msgs, "event")
    assert [e["event"] for e in events] == ["waiting_for_baseline", "activated",
                                            "probation_passed"], events
    activated, passed = events[1], events[2]
    assert "new yes,no,up" in activated["reason"]
    for e in (activated, passed):
        assert "vocabulary changed: accuracy and precision estimates not compared (abstain " \
            "rate, latency, asked-again rates are)" in e["reason"]
    # the actions table against each model's words: at start "up" (written for the next
    # model), after the switch one warning line for the action whose word is gone
    warned = [ln for ln in stderr.splitlines() if "action for label" in ln]
    assert len(warned) == 2 and "'up'" in warned[0] and "its classes: 0, 1" in warned[0]
    assert "'7'" in warned[1] and "no such class (its classes: down, go" in warned[1]
    labels = {d["label"] for d in decisions if d["model"] == c.ref}
    assert labels and labels <= {*WORDS, "unknown"}
    assert decisions[-1]["model"] == c.ref
    assert of(msgs, "stats")[-1]["rollout"]["state"] == "committed"


def test_a_new_vocabulary_that_abstains_is_rolled_back_to_the_old_words(tmp_path, make_stream):
    """What can be compared still decides: a word model that abstains on everything breaches
    the abstain rate and the device goes back to the digits (rollback needs no flag)."""
    stream = make_stream(seconds=100, seed=31).with_suffix(".wav")
    state = tmp_path / "state"
    bad = derive(tmp_path / "bad", classes=WORDS, name="commands", version="1.0.1-bad",
                 behaviour="abstain")
    c = deliver(state, bad, "activate", vocabulary_change=True)
    msgs, decisions, _ = run(tmp_path, stream, state, "--rollout-baseline-windows", "2",
                             "--rollout-probation-windows", "5", "--rollout-min-utterances",
                             "2", "--rollout-breach-windows", "2")
    events = of(msgs, "event")
    assert [e["event"] for e in events][:3] == ["waiting_for_baseline", "activated",
                                                "rolled_back"], events
    rolled = events[2]
    assert rolled["model"] == c.ref and rolled["previous"] == ACTIVE.ref
    breach, note = rolled["reason"].split(" (vocabulary changed: ")
    assert "abstain rate 1.00" in breach and "accuracy" not in breach
    assert note.startswith("accuracy and precision estimates not compared")
    assert decisions[-1]["model"] == ACTIVE.ref and decisions[-1]["label"] in \
        {*(str(i) for i in range(10)), "unknown"}


def test_probation_leaves_out_the_word_bound_figures_but_still_judges_the_rest() -> None:
    base = {"abstain_rate": 0.1, "estimated_accuracy": 0.95, "latency_p95_ms": 2.0,
            "accepted_confidence": 0.99}
    # another vocabulary: its word probabilities are another quantity, far below the old ones
    w = WindowKpis(utterances=20, abstain_rate=0.12, estimated_accuracy=0.5,
                   latency_p95_ms=2.0, retry_after_abstain=None, accepted_confidence=0.7,
                   accepted_n=15)
    kw = dict(breach_run=0, breached=0, done=1, total=1, breach_windows=2)
    assert judge(w, [w], base, Limits(), **kw).action == "rollback"  # compared: breaches
    v = judge(w, [w], base, Limits(), **kw, not_compared=VOCABULARY_BOUND,
              paired={"estimated_accuracy": 0.9, "abstain_rate": 0.1})
    assert v.action == "commit" and v.reasons == []
    worse = replace(w, abstain_rate=0.5)  # what can be compared still rolls back
    v = judge(worse, [worse], base, Limits(), **kw, not_compared=VOCABULARY_BOUND)
    assert v.action == "rollback" and v.reasons[0].startswith("abstain rate")


def test_models_install_and_activate_need_the_flag_and_warn_about_actions(tmp_path):
    state = tmp_path / "state"
    d = words(tmp_path)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[actions]\n"7" = ["/bin/true"]\n"yes" = ["/bin/true"]\n')
    common = ("--config", str(cfg), "--state-dir", str(state))
    r = eva("models", "install", str(d), *common)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "another vocabulary than" in r.stderr and "--allow-vocabulary-change" in r.stderr
    r = eva("models", "install", str(d), *common, "--allow-vocabulary-change")
    assert r.returncode == 0, r.stderr
    r = eva("models", "activate", "commands@1.0.0", *common)
    assert r.returncode == 1 and "--allow-vocabulary-change" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = eva("models", "activate", "commands@1.0.0", *common, "--allow-vocabulary-change")
    assert r.returncode == 0, r.stderr
    assert "vocabulary changed (new yes,no,up" in r.stdout
    warned = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1 and "'7'" in warned[0]
    ptr = json.loads((state / "models" / "pointers.json").read_text())
    assert ptr["active"] == "commands@1.0.0" and ptr["probation"]["vocabulary_change"] is True


def test_a_digit_enrollment_is_not_applied_to_a_candidate_with_other_words(tmp_path: Path):
    """The shadow compares both models plain rather than rescoring words with digit
    recordings (their prototypes would not exist)."""
    from agent.personal.adaptation import AdaptationParams
    from agent.personal.device import FILE_MICROPHONE, build_personalizer
    from agent.personal.enrollment import Enrollment
    from agent.personal.store import PersonalStore, frontend_id
    from agent.recognition.model import ModelRunner

    digits = ModelRunner(default_model_dir())
    x = digits.features(np.zeros(8000, np.float32))
    labels = tuple(str(i) for i in range(10))
    PersonalStore(tmp_path).save_enrollment(Enrollment(
        np.stack([x] * 10), labels, frontend_id(digits.manifest),
        digits.manifest.ref))
    personal = build_personalizer(model=digits, state_dir=tmp_path, microphone=FILE_MICROPHONE,
                                  adaptation=False, params=AdaptationParams(), enrollment=True,
                                  enrollment_weight=1.0, persist=False)
    assert personal is not None and personal.enrolled
    assert personal.scorer_for(digits) is not None
    assert personal.scorer_for(ModelRunner(words(tmp_path))) is None
