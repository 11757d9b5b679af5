"""Rollouts on a device, end to end through `edge-voice-agent run` on a shared-tools stream:
shadow statistics in telemetry with the active decisions unchanged, and a deliberately bad
candidate (it abstains on everything) rolled back automatically within its probation."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from agent.monitoring.privacy import find_violations
from agent.recognition.model import MANIFEST, Manifest
from agent.resources import default_model_dir
from agent.rollout.bundle import bundle_digest
from agent.rollout.command import RolloutCommand
from tests.conftest import ROOT, eva
from tests.rollout_models import derive

SCHEMAS = {k: json.loads((ROOT / "docs" / f"{k}.schema.json").read_text())
           for k in ("stats", "alarm", "event")}
ACTIVE = Manifest.read(default_model_dir() / MANIFEST)


def run_agent(tmp: Path, wav: Path, state: Path, *extra: str
              ) -> tuple[list[dict], list[dict], str]:
    """`run` over `wav` with telemetry to a file: (messages, decisions, stderr), every message
    schema-valid, free of per-utterance data and within 8 KB."""
    tel, dec = tmp / "telemetry.jsonl", tmp / "decisions.jsonl"
    r = eva("run", "--source", str(wav), "--decisions", str(dec), "--telemetry", f"file:{tel}",
            "--window", "10", "--state-dir", str(state), "--device-id", "dev-1",
            "--log-level", "WARNING", *extra, timeout=300)
    assert r.returncode == 0, r.stderr
    msgs = [json.loads(x) for x in tel.read_text().splitlines()]
    for m in msgs:
        kind = m["topic"].rsplit("/", 1)[1]
        if kind in SCHEMAS:
            jsonschema.validate(m["payload"], SCHEMAS[kind])
            assert find_violations(m["payload"]) == [], m["payload"]
            assert len(json.dumps(m["payload"], separators=(",", ":"))) <= 8192
    return msgs, [json.loads(x) for x in dec.read_text().splitlines()], r.stderr


def run(tmp: Path, wav: Path, state: Path, *extra: str) -> tuple[list[dict], list[dict]]:
    msgs, decisions, _ = run_agent(tmp, wav, state, *extra)
    return msgs, decisions


def of(msgs: list[dict], kind: str) -> list[dict]:
    return [m["payload"] for m in msgs if m["topic"].endswith("/" + kind)]


def deliver(state: Path, model_dir: Path, mode: str, rollout_id: str = "r-1") -> RolloutCommand:
    """What an update tool and a retained rollout message leave on a device: the model in the
    inbox, and the command the agent saved when it received it."""
    inbox = state / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    m = Manifest.read(model_dir / MANIFEST)
    target = inbox / m.ref
    model_dir.rename(target)
    c = RolloutCommand(rollout_id, m.name, m.version, bundle_digest(target), 100.0, mode)
    (state / "models").mkdir(parents=True, exist_ok=True)
    (state / "models" / "rollout.json").write_text(json.dumps(c.to_payload()))
    return c


@pytest.fixture(scope="module")
def stream(make_stream) -> Path:
    return make_stream(seconds=100, seed=31).with_suffix(".wav")


def test_shadow_stats_in_telemetry_and_active_decisions_unchanged(tmp_path, stream):
    (tmp_path / "a").mkdir()
    # A fixed, strict threshold: the active model then abstains on some utterances whatever
    # its calibration (a model that accepts every word of its training speakers is fine too).
    strict = ("--threshold", "0.99")
    _, plain = run(tmp_path / "a", stream, tmp_path / "a" / "state", "--window", "20", *strict)
    state = tmp_path / "b" / "state"
    c = deliver(state, derive(tmp_path / "cand", behaviour="abstain", version="9.0.0-shadow"),
                "shadow")
    (tmp_path / "b").mkdir(exist_ok=True)
    msgs, shadowed = run(tmp_path / "b", stream, state, "--window", "20", *strict)
    key = ("start", "end", "label", "confidence", "accepted", "model")
    assert [[d[k] for k in key] for d in shadowed] == [[d[k] for k in key] for d in plain]
    assert all(d["model"] == ACTIVE.ref for d in shadowed)
    events = [e["event"] for e in of(msgs, "event")]
    assert events[:1] == ["shadow_started"]
    stats = of(msgs, "stats")
    assert all(s["rollout"]["state"] == "shadow" and s["rollout"]["candidate"] == c.ref
               and s["rollout"]["id"] == "r-1" and s["rollout"]["cohort"] == "in"
               for s in stats)
    assert all(s["model"]["slot"] == "bundled" for s in stats)
    # The shadow runs after the active decisions of a block are written, so an utterance
    # decided just before a window closes may be counted in the next window.
    assert sum(s["rollout"]["shadow"]["n"] for s in stats) == len(shadowed)
    agreed = 0
    for s in stats:
        sh, counts = s["rollout"]["shadow"], s["counts"]
        assert abs(sh["n"] - (counts["accepted"] + counts["abstained"])) <= 1
        assert sh["skipped"] == 0 and sh["n"] >= 3
        # the candidate abstains on everything (its digits are uniform: a low accuracy
        # estimate), and it agrees exactly where the active model abstained
        assert sh["abstain_rate"] == 1.0
        assert sh["estimated_accuracy"] < 0.2
        assert 0 < sh["latency_ms_mean"] <= sh["latency_ms_p95"] * 1.0001
        agreed += round(sh["agreement"] * sh["n"])
    assert agreed == sum(not d["accepted"] for d in shadowed)
    assert agreed < len(shadowed)  # the active model accepted some: there they disagree
    # every decision but the last is resolved (followed or not within retry_s) in some window
    resolved = sum(s["experience"]["abstentions"] + s["experience"]["accepted"] for s in stats)
    assert len(shadowed) - 1 <= resolved <= len(shadowed)


def test_bad_candidate_rolled_back_automatically_within_probation(tmp_path, stream):
    state = tmp_path / "state"
    bad = deliver(state, derive(tmp_path / "bad", behaviour="abstain", version="9.0.0-bad"),
                  "activate")
    probation = ("--rollout-baseline-windows", "2", "--rollout-probation-windows", "5",
                 "--rollout-min-utterances", "2", "--rollout-breach-windows", "2")
    msgs, decisions = run(tmp_path, stream, state, *probation)
    events = of(msgs, "event")
    names = [e["event"] for e in events]
    assert names[0] == "waiting_for_baseline"
    assert names[1:3] == ["activated", "rolled_back"], names
    rolled = events[2]
    assert rolled["model"] == bad.ref and rolled["previous"] == ACTIVE.ref
    assert "abstain rate" in rolled["reason"] or "accuracy" in rolled["reason"]
    (alarm,) = [a for a in of(msgs, "alarm") if a["metric"] == "model_probation"]
    assert alarm["state"] == "raised" and bad.ref in alarm["reason"]
    stats = of(msgs, "stats")
    states = [s["rollout"]["state"] for s in stats]
    assert "probation" in states and states[-1] == "rolled_back"
    on_probation = [s for s in stats if s["rollout"]["state"] == "probation"]
    assert all(s["model"]["version"] == bad.version and s["model"]["slot"] == "store"
               for s in on_probation[1:])
    assert len(on_probation) <= 5  # within its probation
    assert stats[-1]["model"]["version"] == ACTIVE.version
    # the decisions show the switch and the way back; the bad model never accepted anything
    models = [d["model"] for d in decisions]
    assert bad.ref in models and models[-1] == ACTIVE.ref
    assert not any(d["accepted"] for d in decisions if d["model"] == bad.ref)
    ptr = json.loads((state / "models" / "pointers.json").read_text())
    assert ptr["active"] is None and ptr["previous"] == bad.ref and ptr["probation"] is None


def test_good_candidate_passes_probation_and_is_committed(tmp_path, stream):
    state = tmp_path / "state"
    good = deliver(state, derive(tmp_path / "good", version="9.0.0-good"), "activate")
    # the same model on the next minutes of the stream: only sampling noise differs, so the
    # limits are wide here (a handful of utterances per window); this checks the commit path
    msgs, decisions = run(tmp_path, stream, state,
                          "--rollout-baseline-windows", "2", "--rollout-probation-windows", "2",
                          "--rollout-min-utterances", "2", "--rollout-max-abstain-increase",
                          "0.6", "--rollout-max-accuracy-drop", "0.4",
                          "--rollout-max-latency-ratio", "50", "--rollout-max-retry-increase",
                          "0.9")
    names = [e["event"] for e in of(msgs, "event")]
    assert names == ["waiting_for_baseline", "activated", "probation_passed"], names
    stats = of(msgs, "stats")
    assert stats[-1]["rollout"]["state"] == "committed"
    assert stats[-1]["model"] == {**stats[-1]["model"], "version": good.version, "slot": "store"}
    assert decisions[-1]["model"] == good.ref
    assert json.loads((state / "models" / "pointers.json").read_text())["active"] == good.ref


def test_agent_restarting_again_and_again_during_probation_rolls_back(tmp_path, stream):
    from agent.rollout.store import ModelStore, Probation

    state = tmp_path / "state"
    store = ModelStore(state)
    ref = store.install(derive(tmp_path / "m", version="9.0.0-crashy"), ACTIVE)
    # three starts already happened during this probation without it ever ending
    store.activate(ref, ACTIVE, Probation(ref=ref, previous=ACTIVE.ref, windows_total=5,
                                          starts=3))
    msgs, decisions = run(tmp_path, stream, state)
    (e,) = [e for e in of(msgs, "event") if e["event"] == "rolled_back"]
    assert e["model"] == ref and "started 4 times during probation" in e["reason"]
    assert decisions[-1]["model"] == ACTIVE.ref
    ptr = json.loads((state / "models" / "pointers.json").read_text())
    assert ptr["active"] is None
    # a crash loop is a failure too: remembered by the bundle digest
    assert ptr["failed"][ptr["bundles"][ref]]["ref"] == ref
