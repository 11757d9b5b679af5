"""Issue 19: a rollout that cannot bring a bad model back. Each hole the issue found is
reproduced here first, then closed: a failed build remembered by its bundle digest (restarts,
`models rollback`), probation that judges the candidate alone, one digest over the whole
bundle, a build under the running build's name and version, and a build that accepts too much.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.config import Config, VadConfig
from agent.errors import AgentError
from agent.monitoring.windows import WindowSummary
from agent.recognition.decision import Decision, Policy
from agent.recognition.model import MANIFEST, Manifest, ModelRunner
from agent.recognition.pipeline import Outcome, Pipeline
from agent.resources import default_model_dir
from agent.rollout.bundle import bundle_digest
from agent.rollout.command import RolloutCommand
from agent.rollout.store import ModelStore, Probation
from tests.conftest import eva
from tests.rollout_models import derive
from tests.test_rollout_device import deliver, of
from tests.test_rollout_device import run as run_in


def run(tmp: Path, wav: Path, state: Path, *extra: str) -> tuple[list[dict], list[dict]]:
    """One boot of the agent, with its own telemetry and decisions files."""
    boot = tmp / f"boot{len(list(tmp.glob('boot*')))}"
    boot.mkdir()
    return run_in(boot, wav, state, *extra)


ACTIVE = Manifest.read(default_model_dir() / MANIFEST)
FAST = ("--rollout-baseline-windows", "2", "--rollout-probation-windows", "5",
        "--rollout-min-utterances", "2", "--rollout-breach-windows", "2")


@pytest.fixture(scope="module")
def stream(make_stream) -> Path:
    return make_stream(seconds=100, seed=31).with_suffix(".wav")


# --- 1 and 3: a memory of failures ------------------------------------------------------------
def test_a_failed_build_stays_rolled_back_across_restarts_and_models_rollback(tmp_path, stream):
    state = tmp_path / "state"
    bad = deliver(state, derive(tmp_path / "bad", behaviour="abstain", version="9.0.0-bad"),
                  "activate")
    msgs, _ = run(tmp_path, stream, state, *FAST)
    names = [e["event"] for e in of(msgs, "event")]
    assert names[:3] == ["waiting_for_baseline", "activated", "rolled_back"], names
    # target: rolled back within 3 windows: the one it was switched in, then two of its own
    states = [s["rollout"]["state"] for s in of(msgs, "stats")]
    assert 1 <= states.count("probation") <= 3 and states[-1] == "rolled_back", states
    # target: it stays rolled back across 3 restarts (the stored command still says activate)
    for _ in range(3):
        msgs, decisions = run(tmp_path, stream, state, *FAST)
        names = [e["event"] for e in of(msgs, "event")]
        assert "activated" not in names, names
        assert {d["model"] for d in decisions} == {ACTIVE.ref}
        ro = of(msgs, "stats")[-1]["rollout"]
        assert ro["state"] == "rolled_back" and ro["failed"] == [bad.ref]
        assert "failed probation" in ro["reason"]
    # 3: `models rollback` on the device does not bring it back either
    r = eva("models", "rollback", "--state-dir", str(state))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert bad.ref in r.stderr and "failed probation" in r.stderr
    assert json.loads((state / "models" / "pointers.json").read_text())["active"] is None
    # only an explicit override runs it again, and the device reports that
    r = eva("models", "activate", bad.ref, "--state-dir", str(state))
    assert r.returncode == 1 and "--override-failed" in r.stderr
    r = eva("models", "activate", bad.ref, "--override-failed", "--state-dir", str(state))
    assert r.returncode == 0 and "override" in r.stdout, r.stderr
    msgs, decisions = run(tmp_path, stream, state, *FAST)
    names = [e["event"] for e in of(msgs, "event")]
    assert names[0] == "failure_overridden", names
    assert "rolled_back" in names  # it fails again, and is remembered again
    assert decisions[-1]["model"] == ACTIVE.ref


def test_a_rollback_by_hand_is_not_undone_by_the_stored_command_at_restart(tmp_path):
    """The stored command still says "activate X" after `models rollback`: a restart must
    resume the rolled-back state, not activate X again."""
    from agent.rollout.device import RolloutController

    cfg = Config()
    cfg.agent.state_dir = str(tmp_path / "state")
    bundled = ModelRunner(default_model_dir())
    store = ModelStore(cfg.state_path())
    ref = store.install(derive(tmp_path / "m", version="9.0.0-hand"), bundled.manifest)
    store.activate(ref, bundled.manifest)  # committed earlier by a rollout
    c = RolloutCommand("r-5", *ref.split("@"), store.digest(ref), 100.0, "activate")
    (store.root / "rollout.json").write_text(json.dumps(c.to_payload()))
    r = eva("models", "rollback", "--state-dir", str(cfg.state_path()))
    assert r.returncode == 0 and "remembered as failed" in r.stdout, r.stderr
    host = _Host(Pipeline(VadConfig(), bundled, Policy("partial", 0.5,
                                                       bundled.manifest.unknown_label)))
    ctl = RolloutController(cfg, host, pinned=False)
    assert ctl.state == "rolled_back" and host.switches == 0
    assert store.pointers().active is None and "models rollback" in ctl.reason


# --- 2: probation judges the candidate alone ---------------------------------------------------
class _Monitor:
    prefix = "eva"

    def __init__(self) -> None:
        self.sections, self.events, self.alarms, self.held_alarms = [], [], [], set()

    def emit_event(self, e: dict) -> None:
        self.events.append(dict(e))

    def service_alarm(self, e: object) -> None:
        self.alarms.append(e)


class _Host:
    device_id = "dev-1"

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline, self.monitor, self.switches = pipeline, _Monitor(), 0

    def switch_model(self) -> None:
        self.switches += 1


def _window(start: float, n: int, abstained: int) -> WindowSummary:
    return WindowSummary(start, start + 10.0, 10.0, {"utterances": n, "accepted": n - abstained,
                                                     "abstained": abstained}, {}, {})


def _decide(ctl, model: str, t: float, n: int, abstained: int) -> None:
    """`n` decisions by `model` in [t, t + 10): the first `abstained` of them abstained, each
    far from the next (no retries)."""
    for i in range(n):
        start = t + i * (9.0 / n)
        d = Decision(start=start, end=start + 0.5, decided_at=start + 0.6, label="3",
                     confidence=0.99, accepted=i >= abstained, model=model, latency_ms=1.0)
        ctl.experience.on_outcome(Outcome(None, d, None))  # type: ignore[arg-type]


def test_probation_counts_only_candidate_windows_and_a_late_breach_is_not_committed(tmp_path):
    from agent.rollout.device import RolloutController

    cfg = Config()
    cfg.agent.state_dir = str(tmp_path / "state")
    cfg.rollout.probation_windows, cfg.rollout.breach_windows = 3, 2
    cfg.rollout.min_utterances = 5
    bundled = ModelRunner(default_model_dir())
    host = _Host(Pipeline(VadConfig(), bundled, Policy("partial", 0.5,
                                                       bundled.manifest.unknown_label)))
    ctl = RolloutController(cfg, host, pinned=False)
    store = ModelStore(cfg.state_path())
    ref = store.install(derive(tmp_path / "m", version="9.0.0-late"), bundled.manifest)
    for w in range(3):  # the previous model's recent windows: 1 abstention in 80
        _decide(ctl, ACTIVE.ref, w * 10.0, 20 if w else 40, 1 if w == 0 else 0)
        ctl.window_sections(_window(w * 10.0, 20 if w else 40, 1 if w == 0 else 0))
    store.activate(ref, bundled.manifest, Probation(ref=ref, previous=ACTIVE.ref,
                                                    windows_total=3))
    # window 4: the previous model decided 8 utterances, then the switch, then 2 by the candidate
    _decide(ctl, ACTIVE.ref, 30.0, 8, 0)
    host.pipeline.model = store.verify(ref)
    ctl.on_reload()
    _decide(ctl, ref, 38.0, 2, 0)
    ctl.window_sections(_window(30.0, 10, 0))
    assert ctl.probation.windows_done == 0  # a mixed window is not the candidate's evidence
    for w, abstained in ((4, 1), (5, 1), (6, 13)):  # fine, fine, then 65 % abstentions
        _decide(ctl, ref, w * 10.0, 20, abstained)
        ctl.window_sections(_window(w * 10.0, 20, abstained))
        ctl.poll()
    assert ctl.state == "rolled_back", (ctl.state, host.monitor.events[-1])
    assert [e["event"] for e in host.monitor.events].count("probation_passed") == 0
    assert "abstain rate 0.65" in ctl.reason
    assert store.failure(ref) is not None


# --- 4: one digest for the whole bundle -------------------------------------------------------
def test_an_edited_calibration_is_refused_on_install_and_on_load(tmp_path):
    good = derive(tmp_path / "good", version="9.0.0-cal")
    named = bundle_digest(good)  # what the operator's rollout names
    t = json.loads((good / "calibration" / "thresholds.json").read_text())
    t["threshold"] = 0.1
    (good / "calibration" / "thresholds.json").write_text(json.dumps(t))
    store = ModelStore(tmp_path / "state")
    with pytest.raises(AgentError, match="does not match"):
        store.install(good, ACTIVE, expect_digest=named)
    ref = store.install(good, ACTIVE)  # installed as what it now is
    store.activate(ref, ACTIVE)
    slot_cal = store.slot_dir(ref) / "calibration" / "thresholds.json"
    slot_cal.write_text(slot_cal.read_text().replace('"threshold": 0.1', '"threshold": 0.2'))
    with pytest.raises(AgentError, match="bundle sha256") as e:
        store.verify(ref)
    assert "\n" not in str(e.value) and "reinstall" in str(e.value)
    # the daemon checks the active slot on every load: it does not start on it
    r = eva("run", "--source", str(tmp_path / "none.wav"), "--telemetry", "none",
            "--state-dir", str(tmp_path / "state"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "changed on disk" in r.stderr


def test_fleet_rollout_start_refuses_a_folder_that_is_not_a_complete_bundle(tmp_path):
    from tests.mqtt_fixtures import free_port

    m = derive(tmp_path / "m", version="9.0.0-nocal")
    (m / "calibration" / "thresholds.json").unlink()
    r = eva("fleet", "rollout", "start", "--broker", f"mqtt://127.0.0.1:{free_port()}",
            "--id", "r-1", "--model-dir", str(m), "--percent", "5", "--mode", "shadow")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "not sent" in r.stderr and "calibration" in r.stderr and str(m) in r.stderr


# --- 5: versions ------------------------------------------------------------------------------
def test_a_build_with_the_running_name_and_version_but_another_digest_is_refused(tmp_path):
    other = derive(tmp_path / "same", version=ACTIVE.version, behaviour="abstain")
    with pytest.raises(AgentError, match="running build's name and version") as e:
        ModelStore(tmp_path / "state").install(other, ACTIVE)
    assert "new version" in str(e.value)


def test_a_rollout_of_another_build_under_the_running_name_and_version_is_refused(
        tmp_path, make_stream):
    """It used to be shadowed against the running build itself (agreement 1.00) and reported
    committed while the old build kept running."""
    wav = make_stream(seconds=30, seed=5).with_suffix(".wav")
    state = tmp_path / "state"
    c = deliver(state, derive(tmp_path / "same", version=ACTIVE.version, behaviour="abstain"),
                "shadow")
    msgs, decisions = run(tmp_path, wav, state)
    (e,) = [e for e in of(msgs, "event") if e["event"] == "rollout_refused"]
    assert "running build's name and version" in e["reason"] and "new version" in e["reason"]
    assert c.sha256[:12] in e["reason"]
    stats = of(msgs, "stats")
    assert all(s["rollout"]["state"] == "refused" and s["rollout"]["shadow"] is None
               for s in stats)
    # the very same build delivered again under its own name and version is no conflict
    state2 = tmp_path / "state2"
    deliver(state2, derive(tmp_path / "again", version=ACTIVE.version), "activate")
    (tmp_path / "b").mkdir()
    msgs, _ = run(tmp_path / "b", wav, state2)
    assert of(msgs, "event") == [] and of(msgs, "stats")[-1]["rollout"]["state"] == "committed"


def test_train_asks_for_a_version_and_writes_a_new_directory(tmp_path):
    from agent.cli import build_parser, train_outputs

    p = build_parser()
    with pytest.raises(AgentError, match="--model-version"):
        train_outputs(p.parse_args(["train", "--data", "x"]))
    out, cal = train_outputs(p.parse_args(["train", "--data", "x", "--model-version", "2.1.0"]))
    assert out == Path("exported") / "fsdd-digits@2.1.0" and cal == out / "calibration"
    assert default_model_dir().resolve() not in (out.resolve(), *out.resolve().parents)
    existing = tmp_path / "exported" / "fsdd-digits@2.1.0"
    existing.mkdir(parents=True)
    (existing / MANIFEST).write_text("{}")
    with pytest.raises(AgentError, match="already holds"):  # never over a build by default
        train_outputs(p.parse_args(["train", "--data", "x", "--model-version", "2.1.0"]),
                      root=tmp_path)
    # an explicit --out is the developer's choice (e.g. rebuilding the bundled model)
    assert train_outputs(p.parse_args(["train", "--data", "x", "--model-version", "2.1.0",
                                       "--out", str(existing)]))[0] == existing


# --- 6: a build that accepts too much ----------------------------------------------------------
@pytest.fixture(scope="module")
def drift_stream(make_stream) -> Path:
    """A muffled microphone and steady noise from 90 s on: the shipped model abstains on some
    utterances there, so a build that accepts more has something to accept."""
    return make_stream(seconds=330, drift_at=90, seed=31).with_suffix(".wav")


def test_a_build_that_accepts_too_much_is_rolled_back(tmp_path, drift_stream):
    state = tmp_path / "state"
    loose = deliver(state, derive(tmp_path / "loose", version="9.0.0-loose", threshold=0.10),
                    "activate")
    # the previous model shadows it during probation: both are judged on the same
    # utterances, so the drift that starts at the switch is no excuse and no accusation
    msgs, decisions = run(tmp_path, drift_stream, state, *FAST, "--window", "30",
                          "--rollout-baseline-windows", "3")
    events = of(msgs, "event")
    names = [e["event"] for e in events]
    assert "probation_passed" not in names and "rolled_back" in names, names
    (rolled,) = [e for e in events if e["event"] == "rolled_back"]
    assert rolled["model"] == loose.ref and "estimated precision" in rolled["reason"], rolled
    assert decisions[-1]["model"] == ACTIVE.ref


def test_a_good_build_is_committed_when_the_room_changes_at_the_switch(tmp_path, drift_stream):
    """Drift starting with the probation: compared with the previous model's earlier (clean)
    windows a good build looked worse (estimated accuracy 0.86 vs 0.97) and was rolled back;
    the previous model shadowing it judges both on the same utterances."""
    state = tmp_path / "state"
    good = deliver(state, derive(tmp_path / "good", version="9.0.0-room"), "activate")
    # latency is left out (ratio 50): on a machine shared by parallel test runs its p95 is
    # the neighbours' load, which this test is not about
    msgs, decisions = run(tmp_path, drift_stream, state, *FAST, "--window", "30",
                          "--rollout-baseline-windows", "3", "--rollout-max-latency-ratio", "50")
    events = of(msgs, "event")
    assert [e["event"] for e in events] == ["waiting_for_baseline", "activated",
                                            "probation_passed"], events[-1]["reason"]
    assert "none breached" in events[-1]["reason"]
    assert decisions[-1]["model"] == good.ref
