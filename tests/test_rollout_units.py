"""The pure parts of a rollout: probation verdicts, experience metrics, the model switch."""

from __future__ import annotations

import dataclasses

import numpy as np

from agent.audio.sources import FileSource
from agent.audio.vad import VadBlockStats
from agent.config import VadConfig
from agent.recognition.decision import Decision, Policy
from agent.recognition.pipeline import Outcome, Pipeline
from agent.resources import default_model_dir, demo_audio
from agent.rollout.command import CommandError, parse
from agent.rollout.experience import ExperienceTracker
from agent.rollout.probation import Limits, Recent, WindowKpis, baseline_of, breaches, pooled
from agent.rollout.switch import retarget


def kpis(n, abstain, acc=0.9, lat=1.0, retry=None):
    return WindowKpis(n, abstain, acc, lat, retry)


def test_probation_pools_windows_and_names_each_breach():
    base = baseline_of([kpis(10, 0.1), kpis(30, 0.2, lat=2.0)])
    assert base["abstain_rate"] == 0.175 and base["latency_p95_ms"] == 1.75
    lim = Limits()
    assert breaches(kpis(10, 0.3), base, lim) == []          # within 0.2
    assert breaches(kpis(10, 0.5), base, lim) == ["abstain rate 0.50 vs 0.17"]
    assert breaches(kpis(10, 0.1, acc=0.7), base, lim) == ["estimated accuracy 0.70 vs 0.90"]
    assert breaches(kpis(10, 0.1, lat=6.0), base, lim) == []  # 3x but under +5 ms: timer noise
    assert breaches(kpis(10, 0.1, lat=7.0), base, lim) == ["latency p95 7.0 ms vs 1.8 ms"]
    # a noisy small window is outweighed by a larger one once pooled
    assert pooled([kpis(4, 0.75), kpis(20, 0.15)]).abstain_rate == 0.25
    r = Recent(2, min_utterances=5)
    r.add(kpis(3, 0.9))  # too few utterances to count
    assert not r.full
    r.add(kpis(5, 0.1))
    r.add(kpis(5, 0.3))
    assert r.full and r.baseline()["abstain_rate"] == 0.2


def decision(start, end, accepted):
    return Decision(start=start, end=end, decided_at=end + 0.3, label="7", confidence=0.5,
                    accepted=accepted, model="m@1", latency_ms=1.0)


def feed(tr, seq):
    for start, end, accepted in seq:
        tr.on_block(start, VadBlockStats(), 0)
        tr.on_outcome(Outcome(None, decision(start, end, accepted), None))  # type: ignore[arg-type]


def test_experience_counts_retries_tries_and_repeats_without_per_utterance_values():
    tr = ExperienceTracker(retry_s=4.0)
    feed(tr, [(0.0, 1.0, False), (2.0, 3.0, False), (4.0, 5.0, True),   # 3 tries
              (20.0, 21.0, True), (22.0, 23.0, True),                    # repeat after accept
              (40.0, 41.0, False), (60.0, 61.0, True)])                  # abstain, not asked again
    tr.on_block(100.0, VadBlockStats(), 0)
    c = tr.take()
    assert (c.abstentions, c.retried) == (3, 2)
    assert (c.accepted, c.repeated) == (4, 1)
    assert (c.runs_accepted, c.tries) == (4, 6)
    s = c.section()
    assert s == {"abstentions": 3, "accepted": 4, "retry_after_abstain": 0.6667,
                 "tries_to_accept_mean": 1.5, "repeat_after_accept": 0.25}
    # one decision in a window: counts only, no rate that would reveal its outcome
    tr2 = ExperienceTracker()
    feed(tr2, [(0.0, 1.0, False)])
    tr2.on_block(10.0, VadBlockStats(), 0)
    assert tr2.take().section() == {"abstentions": 1, "accepted": 0,
                                    "retry_after_abstain": None, "tries_to_accept_mean": None,
                                    "repeat_after_accept": None}


def test_command_parser_refuses_with_the_reason():
    good = {"schema": 1, "id": "r-1", "model": {"name": "m", "version": "1.0.0",
                                                "sha256": "a" * 64}, "percent": 5,
            "mode": "shadow"}
    import json

    import jsonschema

    from tests.conftest import ROOT

    schema = json.loads((ROOT / "docs" / "rollout.schema.json").read_text())
    assert parse(json.dumps(good)).ref == "m@1.0.0"
    jsonschema.validate(good, schema)
    bad = [({**good, "extra": 1}, "unknown field"), ({**good, "percent": 101}, "percent"),
           ({**good, "percent": True}, "percent"), ({**good, "id": "a/b"}, "rollout.id"),
           ({**good, "model": {**good["model"], "sha256": "A" * 64}}, "sha256"),
           ({k: v for k, v in good.items() if k != "mode"}, "lacks mode"),
           ([1, 2], "not a JSON object")]
    for payload, why in bad:
        try:
            parse(json.dumps(payload))
            raise AssertionError(f"accepted {payload}")
        except CommandError as e:
            assert why in str(e), (why, str(e))
        # the hand-written rules and the published schema agree
        assert list(jsonschema.Draft202012Validator(schema).iter_errors(payload)), payload


class OtherRate:
    """The bundled model presented at another rate (a stand-in for a 1.x → 2.x switch)."""

    def __init__(self, runner, rate):
        self._r = runner
        self.manifest = dataclasses.replace(runner.manifest, sample_rate=rate)

    def __getattr__(self, name):
        return getattr(self._r, name)


class Clocks:
    def __init__(self):
        self.t: list[float] = []

    def on_block(self, clock_s, stats, dropped):
        self.t.append(clock_s)

    def on_outcome(self, o):
        pass


def test_switch_to_another_rate_keeps_the_clock_and_observers():
    from agent.recognition.model import ModelRunner

    runner = ModelRunner(default_model_dir())
    other = 16000 if runner.manifest.sample_rate != 16000 else 8000
    policy = Policy("partial", 0.5, runner.manifest.unknown_label)
    p = Pipeline(VadConfig(), runner, policy)
    clocks = Clocks()
    p.observers.append(clocks)
    blocks = list(FileSource(demo_audio(), block_ms=100))[:60]
    for b in blocks[:30]:
        p.feed(b)
    before = p.clock_s
    p2, decided = retarget(p, OtherRate(runner, other), policy)
    assert p2 is not p and p2.rate == other and p2.observers is p.observers
    assert abs(p2.clock_s - before) <= 0.1 and p2.segmenter.noise_floor_db is not None
    for b in blocks[30:]:
        p2.feed(b)
    heard = sum(len(b.samples) / b.rate for b in blocks)
    assert np.all(np.diff(clocks.t) >= -1e-9)  # observers' time never runs backwards
    assert abs(p2.clock_s - heard) <= 0.1     # and the clock still counts the audio heard
    same, none = retarget(p2, p2.model, policy)
    assert same is p2 and none == []


def test_fleet_rollout_status_groups_devices_by_cohort_from_their_stats():
    import json

    from agent.fleet.rollout import render_text, summarize
    from agent.rollout.cohort import in_cohort

    cmd = {"schema": 1, "id": "r-9", "model": {"name": "m", "version": "2", "sha256": "b" * 64},
           "percent": 50, "mode": "shadow"}
    ids = [f"d{i}" for i in range(8)]
    devices = {}
    for d in ids:
        inside = in_cohort("r-9", d, 50)
        devices[d] = {"online": True, "model": {"name": "m", "version": "1", "slot": "bundled"},
                      "abstain_rate": 0.2, "estimated_accuracy": {"value": 0.9}, "events": [],
                      "last_window": {"model": {"name": "m", "version": "1", "slot": "bundled"},
                                      "rollout": {"id": "r-9", "state": "shadow" if inside
                                                  else "out_of_cohort", "probation": None,
                                                  "shadow": {"agreement": 0.75,
                                                             "abstain_rate": 0.5}
                                                  if inside else None}}}
    r = summarize({"devices": devices}, {"fleet": json.dumps(cmd).encode()}, "eva")
    assert {x["device"] for x in r["cohorts"]["in"]} == {d for d in ids if in_cohort("r-9", d, 50)}
    assert all(x["state"] == "shadow" and x["shadow_agreement"] == 0.75
               for x in r["cohorts"]["in"])
    assert all(x["state"] == "out_of_cohort" for x in r["cohorts"]["out"])
    text = render_text(r)
    assert "cohort in (" in text and "shadow agree" in text and "bundled" in text
    bad = summarize({"devices": devices}, {"fleet": b"{oops"}, "eva")
    assert "invalid" in bad["fleet_rollout"] and len(bad["cohorts"]["unknown"]) == len(ids)
    # a device that remembers a failed build says so, with the reason of its state
    devices["d0"]["last_window"]["rollout"].update(
        state="rolled_back", failed=["m@2"],
        reason="m@2 failed probation on this device before (abstain rate 0.40 vs 0.06)")
    r = summarize({"devices": devices}, {"fleet": json.dumps(cmd).encode()}, "eva")
    (row,) = [x for c in r["cohorts"].values() for x in c if x["device"] == "d0"]
    assert row["failed"] == ["m@2"] and "failed probation" in row["reason"]
    text = render_text(r)
    assert "m@2 failed probation" in text and " m@2 " in text


class FakeMonitor:
    prefix = "eva"

    def __init__(self):
        self.sections, self.events, self.alarms, self.held_alarms = [], [], [], set()

    def emit_event(self, e):
        self.events.append(dict(e))

    def service_alarm(self, e):
        self.alarms.append(e)


class FakeHost:
    device_id = "dev-1"

    def __init__(self, pipeline):
        self.pipeline, self.monitor, self.switches = pipeline, FakeMonitor(), 0

    def switch_model(self):
        self.switches += 1


def activate_local(cfg, ctl, host, bundled, tmp_path):
    """Three windows of recent values, then `models activate` of a local build (probation of 4
    windows) and the model the reload swaps in; (store, ref)."""
    from agent.rollout.store import ModelStore, Probation
    from tests.rollout_models import derive

    for ab in (0.1, 0.3, 0.2):
        ctl.recent.add(kpis(10, ab))
    store = ModelStore(cfg.state_path())
    ref = store.install(derive(tmp_path / "m", version="9.0.0-local"), bundled.manifest)
    store.activate(ref, bundled.manifest, Probation(ref=ref, previous=bundled.manifest.ref,
                                                    windows_total=4))
    host.pipeline.model = store.verify(ref)  # what the reload swapped in
    return store, ref


def test_local_activation_starts_probation_against_the_models_recent_values(tmp_path):
    """`models activate` + reload: the daemon picks the probation up with a baseline from
    what ran before; `models rollback` + reload ends it."""
    from agent.config import Config
    from agent.recognition.model import ModelRunner
    from agent.rollout.device import RolloutController

    cfg = Config()
    cfg.agent.state_dir = str(tmp_path / "state")
    bundled = ModelRunner(default_model_dir())
    policy = Policy("partial", 0.5, bundled.manifest.unknown_label)
    host = FakeHost(Pipeline(VadConfig(), bundled, policy))
    ctl = RolloutController(cfg, host, pinned=False)
    assert ctl.window_sections in host.monitor.sections and ctl.experience in \
        host.pipeline.observers
    store, ref = activate_local(cfg, ctl, host, bundled, tmp_path)
    ctl.on_reload()
    assert ctl.state == "probation" and ctl.probation.ref == ref
    assert ctl.probation.baseline["abstain_rate"] == 0.2
    assert store.pointers().probation.baseline["abstain_rate"] == 0.2  # persisted
    assert host.monitor.events[-1]["event"] == "activated"
    assert ctl.section()["probation"] == {"windows_done": 0, "windows_total": 4,
                                          "like_for_like": True}
    store.rollback()
    host.pipeline.model = bundled
    ctl.on_reload()
    assert ctl.probation is None and ctl.state == "idle"


def test_a_candidate_with_the_same_front_end_files_shares_its_sessions(tmp_path):
    from agent.recognition.model import ModelRunner
    from tests.rollout_models import derive

    active = ModelRunner(default_model_dir())
    cand = ModelRunner(derive(tmp_path / "c", behaviour="abstain"), share_from=active)
    assert cand.embedder is active.embedder  # only the head differs: one front end in memory
    alone = ModelRunner(tmp_path / "c")
    assert alone.embedder is not active.embedder
    x = np.zeros((1, active.manifest.frontend.dim), np.float32)
    assert np.allclose(cand.predict(x), alone.predict(x))


def test_shadow_reuses_the_active_head_input_when_the_front_end_is_shared(tmp_path):
    from agent.audio.vad import Utterance
    from agent.recognition.model import ModelRunner
    from agent.rollout.shadow import ShadowRunner
    from tests.rollout_models import derive

    active = ModelRunner(default_model_dir())
    cand = ModelRunner(derive(tmp_path / "c", behaviour="abstain"), share_from=active)
    m = active.manifest
    policy = Policy("partial", 0.5, m.unknown_label)
    feats = active.features(np.zeros(m.sample_rate // 2, np.float32))
    # no audio at all: only the shared head input can answer
    u = Utterance(0, 1, 0, np.zeros(0, np.float32), m.sample_rate, 1, False, 1)
    o = Outcome(u, decision(0.0, 1.0, True), None, feats)
    sh = ShadowRunner(cand, policy, m.sample_rate, active=lambda: active)
    sh.on_outcome(o)
    sh.run_pending()
    c = sh.take()
    assert c.n == 1 and c.abstained == 1 and c.agreed == 0  # it abstains, the active accepted


def test_the_sequential_verdict_needs_a_clean_probation_and_weighs_the_noise():
    from agent.rollout.probation import Paired, judge

    base = {"abstain_rate": 0.05, "accepted_confidence": 0.99, "retry_after_abstain": 0.3}
    lim = Limits()
    ok, bad = kpis(20, 0.05), kpis(20, 0.65)

    def verdict(windows, **kw):
        run = breached = 0
        for i, w in enumerate(windows, 1):
            v = judge(w, windows[:i], base, lim, breach_run=run, breached=breached, done=i,
                      total=len(windows), breach_windows=2, **kw)
            run, breached = v.breach_run, v.breached
            if v.action != "continue":
                return v
        return v

    assert verdict([ok, ok, ok]).action == "commit"
    late = verdict([ok, ok, bad])  # one breach, in the last window: no pass
    assert late.action == "rollback" and late.breached == 1
    assert late.reasons[0].startswith("abstain rate 0.65")
    assert verdict([bad, bad, ok]).action == "rollback"  # two in a row: at once
    # 2 of 3 abstentions asked again is no verdict; 40 of 60 (pooled) is
    few = dataclasses.replace(ok, retry_after_abstain=0.67, abstentions=3, retried=2)
    many = dataclasses.replace(ok, retry_after_abstain=0.67, abstentions=30, retried=20)
    assert verdict([few, few, ok]).action == "commit"
    assert verdict([many, many, ok]).action == "rollback"
    # a build that accepts too much: people say it again right after it acted (correcting it)
    # while its abstain rate looks better; 3 of 18 repeats is within the noise, 12 of 18 is not
    base["repeat_after_accept"] = 0.05
    eager = kpis(20, 0.0)
    some = dataclasses.replace(eager, repeat_after_accept=0.17, accepts=18, repeated=3)
    most = dataclasses.replace(eager, repeat_after_accept=0.67, accepts=18, repeated=12)
    assert verdict([some, some, some]).action == "commit"
    corrected = verdict([most, most, ok])
    assert corrected.action == "rollback" and corrected.breach_run == 2
    assert corrected.reasons[0] == "repeated after accept 0.67 vs 0.05"
    del base["repeat_after_accept"]
    # the previous model on the same utterances replaces the recent baseline: a room where
    # both abstain more is not the candidate's fault
    noisy_room = Paired(n=20, abstained=13, best_word_sum=18.0)
    assert verdict([bad, bad, bad], paired=noisy_room.figures(5),
                   paired_so_far=noisy_room.figures(5)).action == "commit"


def test_probation_compares_like_with_like_on_a_personalised_device(tmp_path):
    """The previous model decided with device adaptation: the new model's windows wait until
    its own adaptation (reset with the model) is active; a new model that cannot be
    personalised like the old one counts its windows but says it is not like for like."""
    from agent.config import Config
    from agent.monitoring.windows import WindowAggregator
    from agent.recognition.model import ModelRunner
    from agent.rollout.device import RolloutController

    class Personal:
        def __init__(self, adapting):
            self.adapter, self.adapting = object(), adapting

        def signature(self):
            return "adapted" if self.adapting else "plain"

    cfg = Config()
    cfg.agent.state_dir = str(tmp_path / "state")
    cfg.rollout.min_utterances = 1
    bundled = ModelRunner(default_model_dir())
    host = FakeHost(Pipeline(VadConfig(), bundled, Policy("partial", 0.5, "unknown")))
    host.pipeline.personal = Personal(adapting=True)
    ctl = RolloutController(cfg, host, pinned=False)
    activate_local(cfg, ctl, host, bundled, tmp_path)
    ctl.on_reload()
    assert ctl.probation.baseline["personal"] == "adapted"

    def window():
        agg = WindowAggregator(10.0)
        for i in range(5):
            agg.count("utterances", 1, float(i))
            agg.record_decision("3", True, float(i), confidence=0.9, margin=0.8)
        (w,) = agg.advance(10.0)
        return ctl.window_sections(w)

    host.pipeline.personal = Personal(adapting=False)  # reset with the model, learning
    out = window()
    assert ctl.probation.windows_done == 0  # waits: not like with like yet
    assert out["rollout"]["probation"]["like_for_like"] is False
    host.pipeline.personal = Personal(adapting=True)
    out = window()
    assert ctl.probation.windows_done == 1 and out["rollout"]["probation"]["like_for_like"]
    host.pipeline.personal = None  # the new model cannot be personalised at all: no stall
    out = window()
    assert ctl.probation.windows_done == 2
    assert out["rollout"]["probation"]["like_for_like"] is False
