"""Personalisation on the device (agent.personal): label-free adaptation and enrollment.

Written against the bundled model without frozen numbers: every check compares with and
without personalisation, so a retrained model keeps them meaningful. The recordings are cut
from the bundled demo (every digit at least once), so nothing here needs the shared data.
"""

from __future__ import annotations

import json
import logging
import math
import stat
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from jsonschema import Draft202012Validator

from agent import cli
from agent.audio.sources import AudioBlock
from agent.config import Config, VadConfig
from agent.daemon.state_health import StateHealth
from agent.errors import AgentError
from agent.monitoring.privacy import find_violations
from agent.personal.adaptation import AdaptationParams, AdaptationState, Adapter
from agent.personal.device import FILE_MICROPHONE, build_personalizer, reference_for
from agent.personal.enrollment import Enrollment, Rescorer, label_of
from agent.personal.reference import Reference, fit_reference
from agent.personal.store import AdaptationKey, PersonalStore
from agent.recognition.decision import Policy
from agent.recognition.model import MANIFEST, Manifest, ModelRunner
from agent.recognition.pipeline import Pipeline
from agent.resources import calibration_dir, default_model_dir, demo_audio, demo_truth
from agent.rollout.shadow import ShadowRunner
from tests.conftest import eva
from tests.test_microphone import pulse, pulse_proc  # noqa: F401 (fixtures for the mic test)

DOCS = Path(__file__).resolve().parents[1] / "docs"
STATS = Draft202012Validator(json.loads((DOCS / "stats.schema.json").read_text()))


@pytest.fixture(scope="module")
def model() -> ModelRunner:
    return ModelRunner(default_model_dir())


@pytest.fixture(scope="module")
def demo_clips(tmp_path_factory) -> tuple[list[Path], list[Path]]:
    """The demo's words as files: the first of each digit to enroll, the rest to classify."""
    d = tmp_path_factory.mktemp("demo-clips")
    x, sr = sf.read(str(demo_audio()), dtype="float32")
    enroll, rest, seen = [], [], set()
    for i, u in enumerate(json.loads(demo_truth().read_text())["utterances"]):
        a = x[max(0, int((u["start"] - 0.25) * sr)):int((u["end"] + 0.25) * sr)]
        first = u["digit"] not in seen
        seen.add(u["digit"])
        path = d / f"{u['digit']}_{'enroll' if first else 'again'}_{i}.wav"
        sf.write(str(path), a, sr, subtype="PCM_16")
        (enroll if first else rest).append(path)
    return enroll, rest


def observe_digits(p, model: ModelRunner, n: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` confident decisions for the first class, then close (the state is saved); the
    embedding and probabilities observed."""
    x = np.ones(model.manifest.frontend.dim, np.float32)
    digit = np.zeros(len(model.manifest.classes), np.float32)
    digit[0] = 1.0
    for _ in range(n):
        p.observe(x, digit)
    p.close()
    return x, digit


def classify(capsys, files: list[Path], state: Path) -> list[dict]:
    assert cli.main(["classify", "--log-level", "WARNING", "--state-dir", str(state),
                     *map(str, files)]) == 0
    return [json.loads(x) for x in capsys.readouterr().out.splitlines()]


# --- the pure parts ----------------------------------------------------------------------
def test_reference_is_fitted_in_numpy_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    classes = ("a", "b", "c")
    y = np.repeat(classes, 40)
    centres = rng.normal(0, 3, (3, 12))
    x = centres[np.searchsorted(classes, y)] + rng.normal(0, 1, (120, 12))
    r = fit_reference(x, y, classes, model="m@1", sha256="ab" * 32)
    u = r.project(x)
    assert u.shape == (120, 2)
    # in the discriminant space every training point is nearer its own class mean
    d = ((u[:, None, :] - r.class_means[None]) ** 2).sum(-1)
    assert (d.argmin(1) == np.searchsorted(classes, y)).mean() > 0.95
    r.save(tmp_path / "ref.npz")
    back = Reference.load(tmp_path / "ref.npz")
    assert back.classes == classes and back.sha256 == r.sha256
    np.testing.assert_array_equal(back.projection, r.projection)
    (tmp_path / "bad.npz").write_bytes(b"not a reference")
    with pytest.raises(AgentError, match="bad.npz is unreadable .*calibrate --reference-only"):
        Reference.load(tmp_path / "bad.npz")
    with pytest.raises(AgentError, match="at least two training recordings.*c"):
        fit_reference(x[:81], y[:81], classes, model="m", sha256="x")


def test_adapter_waits_shrinks_and_is_bounded():
    dim = 8
    mean, scale = np.zeros(dim, np.float32), np.ones(dim, np.float32)
    ad = Adapter(AdaptationParams(min_utterances=5, prior=5.0, horizon=50, max_shift=0.5),
                 AdaptationState.fresh(dim))
    for _ in range(4):
        ad.observe(np.full(dim, 0.2))
        assert ad.shift(mean, scale) is None and not ad.active  # nothing before 5
    ad.observe(np.full(dim, 0.2))
    s = ad.shift(mean, scale)
    assert ad.active and s is not None
    np.testing.assert_allclose(s, 0.2 * 5 / 10, rtol=1e-5)  # shrunk: n / (n + prior)
    for _ in range(200):
        ad.observe(np.full(dim, 9.0))  # far away: the shift is capped at max_shift (RMS)
    s = ad.shift(mean, scale)
    assert math.isclose(float(np.sqrt(np.mean(s ** 2))), 0.5, rel_tol=1e-5)
    assert ad.state.mean[0] > 8.9  # the horizon lets the mean follow the device
    assert ad.utterances == 205


def test_rescoring_moves_between_known_classes_and_never_touches_unknown():
    rng = np.random.default_rng(1)
    classes = ("a", "b", "unknown")
    x = rng.normal(0, 1, (60, 6))
    y = np.repeat(["a", "b"], 30)
    x[y == "b"] += 2.0
    ref = fit_reference(x, y, ("a", "b"), model="m", sha256="s")
    enrolled = Enrollment(np.stack([x[0] + 0.5, x[30] + 0.5]).astype(np.float32), ("a", "b"),
                          "fe", "m")
    r = Rescorer(enrolled, ref, classes, "unknown", weight=2.0)
    p = np.array([0.35, 0.35, 0.3], np.float32)
    near_b = enrolled.x[1] + 0.01
    q = r.rescore(p, near_b)
    assert q[1] > p[1] and q[0] < p[0]  # towards the enrolled "b"
    assert q[2] == pytest.approx(p[2]) and q.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.array_equal(Rescorer(enrolled, ref, classes, "unknown", 0.0).rescore(p, near_b), p)


def test_enrollment_file_names_give_the_labels_of_the_model():
    assert label_of(Path("/x/7_kitchen_2.wav"), ["7", "8"]) == "7"
    for bad in ("seven_1.wav", "7.wav", "11_a.wav"):
        with pytest.raises(AgentError, match="is not named {label}_{anything}.wav"):
            label_of(Path(bad), [str(d) for d in range(10)])


# --- enrollment, end to end --------------------------------------------------------------
def test_enrollment_round_trip_changes_classify_and_forget_restores_it(tmp_path, capsys,
                                                                       demo_clips):
    enroll, rest = demo_clips
    state = tmp_path / "state"
    files = rest + enroll
    plain = classify(capsys, files, state)
    assert not state.exists()  # classify reads the state directory, never writes it
    assert cli.main(["enroll", "--log-level", "WARNING", "--state-dir", str(state),
                     *map(str, enroll)]) == 0
    said = capsys.readouterr().out
    assert "enrolled 10 recordings of 10 classes" in said and "never published" in said
    folder, saved = state / "personal", state / "personal" / "enrollment.npz"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    with np.load(saved) as z:  # head inputs and labels only: no audio
        assert set(z.files) == {"meta", "x", "labels"} and z["x"].shape[1] == 1056
    enrolled = classify(capsys, files, state)
    assert [d["file"] for d in enrolled] == [d["file"] for d in plain]
    assert enrolled != plain  # the enrollment changes what classify says
    assert cli.main(["enroll", "--forget", "--state-dir", str(state)]) == 0
    assert "removed" in capsys.readouterr().out and not saved.exists()
    assert classify(capsys, files, state) == plain  # exactly the outputs before enrolling
    assert cli.main(["enroll", "--forget", "--state-dir", str(state)]) == 0
    assert "nothing enrolled" in capsys.readouterr().out


def test_enrollment_needs_every_class_of_the_model(tmp_path, capsys, demo_clips):
    enroll, _ = demo_clips
    code = cli.main(["enroll", "--state-dir", str(tmp_path), *map(str, enroll[1:])])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err
    missing = enroll[0].name.split("_")[0]
    assert f"none for {missing}" in err and not (tmp_path / "personal").exists()


def test_enrollment_from_the_microphone_prompts_for_each_class(model):
    """The prompted path, fed the demo's audio as the microphone would deliver it."""
    from agent.personal.enroll import from_blocks

    x, sr = sf.read(str(demo_audio()), dtype="float32")
    truth = json.loads(demo_truth().read_text())["utterances"]
    order = [u["digit"] for u in truth]
    classes = [c for c in model.manifest.classes if c != model.manifest.unknown_label]
    # speak each class once, in the prompted order, by splicing the demo's words with pauses
    pause = np.zeros(sr, np.float32)
    parts = [pause]
    for c in classes:
        u = truth[order.index(c)]
        parts += [x[int((u["start"] - 0.2) * sr):int((u["end"] + 0.2) * sr)], pause]
    audio = np.concatenate(parts)
    blocks = (AudioBlock(audio[i:i + 1600, None], sr) for i in range(0, len(audio), 1600))
    prompts: list[str] = []
    e = from_blocks(model, Config(), blocks, say=prompts.append)
    assert list(e.labels) == classes and e.x.shape == (len(classes), model.manifest.frontend.dim)
    assert [p for p in prompts if p.startswith("say")] == [f'say "{c}" (then wait)'
                                                           for c in classes]
    with pytest.raises(AgentError, match="microphone ended"):
        from_blocks(model, Config(), iter([AudioBlock(pause[:, None], sr)]), say=lambda s: None)


# --- adaptation never makes a stable device worse ----------------------------------------
def run_stream(model: ModelRunner, audio: np.ndarray, sr: int, personal) -> list:
    p = Pipeline(VadConfig(), model, Policy("partial", threshold(model),
                                            model.manifest.unknown_label))
    p.personal = personal
    out = []
    for i in range(0, len(audio), sr // 10):
        out += p.feed(AudioBlock(audio[i:i + sr // 10, None], sr))
    return out + p.finish()


def threshold(model: ModelRunner) -> float:
    return json.loads((calibration_dir(model.manifest.name) / "thresholds.json").read_text()
                      )["threshold"]


def test_adaptation_never_makes_the_calm_demo_worse(tmp_path, model):
    """The demo three times in a row as one stream (a calm device that keeps hearing the same
    voices): adaptation switches on during the first pass; the decisions after it are
    unchanged or better than the model's alone — no accepted decision becomes wrong and no
    correct one is lost."""
    x, sr = sf.read(str(demo_audio()), dtype="float32")
    truth = json.loads(demo_truth().read_text())
    n, length = len(truth["utterances"]), len(x) / sr
    stream = np.concatenate([x, x, x])
    plain = run_stream(model, stream, sr, None)
    personal = build_personalizer(
        model=model, state_dir=tmp_path, microphone=FILE_MICROPHONE, adaptation=True,
        params=AdaptationParams(min_utterances=10), enrollment=False, enrollment_weight=0.5,
        persist=False)
    adapted = run_stream(model, stream, sr, personal)
    assert personal is not None and personal.adapting and personal.adapter.utterances > n
    assert len(plain) == len(adapted) == 3 * n
    assert not (tmp_path / "personal").exists()  # a replayed file is never saved

    def outcome(ds):
        right = wrong = 0
        for d in ds:
            u = truth["utterances"][[abs((d.start % length) - t["start"]) for t in
                                     truth["utterances"]].index(
                min(abs((d.start % length) - t["start"]) for t in truth["utterances"]))]
            right += d.accepted and d.label == u["digit"]
            wrong += d.accepted and d.label != u["digit"]
        return right, wrong

    (r0, w0), (r1, w1) = outcome(plain[10:]), outcome(adapted[10:])
    assert w1 <= w0 and r1 >= r0, (r0, w0, r1, w1)
    changed = sum(a.confidence != b.confidence for a, b in zip(plain[10:], adapted[10:],
                                                               strict=True))
    assert changed > 0  # adaptation was really applied, not a no-op


# --- state on disk ------------------------------------------------------------------------
def test_adaptation_state_is_saved_0600_and_reset_by_another_model_or_microphone(tmp_path):
    store = PersonalStore(tmp_path)
    key = AdaptationKey("a" * 64, "fe1", "mic:USB")
    st = AdaptationState(np.arange(4, dtype=np.float64), 33)
    assert store.save_adaptation(st, key)
    assert stat.S_IMODE(store.adaptation_path.stat().st_mode) == 0o600
    back, note = store.load_adaptation(key, 4)
    assert back.n == 33 and np.allclose(back.mean, st.mean) and "resumed" in note
    for other, why in ((AdaptationKey("b" * 64, "fe1", "mic:USB"), "the model changed"),
                       (AdaptationKey("a" * 64, "fe2", "mic:USB"), "front end changed"),
                       (AdaptationKey("a" * 64, "fe1", "mic:Other"), "another microphone")):
        fresh, note = store.load_adaptation(other, 4)
        assert fresh.n == 0 and not fresh.mean.any() and why in note


def test_a_live_microphone_persists_what_it_learns_and_a_new_one_starts_afresh(tmp_path,
                                                                                model):
    def build():
        return build_personalizer(model=model, state_dir=tmp_path, microphone="mic:USB",
                                  adaptation=True, params=AdaptationParams(min_utterances=3),
                                  enrollment=False, enrollment_weight=0.5)

    x, probs = observe_digits(build(), model, 25)
    again = build()
    assert again.adapter.utterances == 25 and again.adapting
    unknown = np.zeros_like(probs)
    unknown[model.manifest.classes.index(model.manifest.unknown_label)] = 1.0
    again.observe(x, unknown)  # what the model calls "unknown" does not teach adaptation
    assert again.adapter.utterances == 25
    again.new_microphone("mic:Other")
    assert again.adapter.utterances == 0 and not again.adapting
    assert build().adapter.utterances == 0  # another microphone's state is not this one's


def test_corrupt_personal_state_is_moved_aside_counted_and_started_afresh(tmp_path, model,
                                                                         capsys, demo_clips,
                                                                         caplog):
    folder = tmp_path / "personal"
    folder.mkdir()
    (folder / "enrollment.npz").write_bytes(b"\x00garbage")
    (folder / "adaptation.npz").write_bytes(b"PK\x03\x04 truncated")
    health = StateHealth()
    with caplog.at_level(logging.ERROR, logger="edge-voice-agent"):
        p = build_personalizer(model=model, state_dir=tmp_path, microphone="mic:USB",
                               adaptation=True, params=AdaptationParams(), enrollment=True,
                               enrollment_weight=0.5, health=health)
    assert p is not None and not p.enrolled and p.adapter.utterances == 0
    _, quarantined, events = health.take()
    assert quarantined == 2 and {e.metric for e in events} == {"state_files_quarantined"}
    lines = [r.getMessage() for r in caplog.records if "corrupt state file" in r.getMessage()]
    assert len(lines) == 2 and all("\n" not in s for s in lines)
    assert sorted(f.name.split(".corrupt-")[0] for f in folder.glob("*.corrupt-*")) == \
        ["adaptation.npz", "enrollment.npz"]
    # classify on a corrupt enrollment decides without it (and says so once)
    (folder / "enrollment.npz").write_bytes(b"garbage again")
    enroll, rest = demo_clips
    out = classify(capsys, rest, tmp_path)
    assert len(out) == len(rest)


def test_personalisation_is_off_with_one_line_without_a_reference(tmp_path, model, caplog,
                                                                   monkeypatch):
    from agent.personal import device

    monkeypatch.setattr(device, "reference_path", lambda d, name: tmp_path / "none.npz")
    with caplog.at_level(logging.WARNING, logger="edge-voice-agent"):
        assert build_personalizer(model=model, state_dir=tmp_path, microphone="mic:x",
                                  adaptation=True, params=AdaptationParams(), enrollment=True,
                                  enrollment_weight=0.5) is None
    assert any("adaptation and enrollment are off" in r.getMessage() and "calibrate" in
               r.getMessage() for r in caplog.records)


def test_the_bundled_reference_belongs_to_the_bundled_model(model):
    ref, why = reference_for(model)
    assert ref is not None, why
    assert ref.sha256 == model.manifest.sha256 and ref.dim == model.manifest.frontend.dim
    assert ref.classes == tuple(c for c in model.manifest.classes
                                if c != model.manifest.unknown_label)


# --- shadow: like with like ---------------------------------------------------------------
def test_shadow_scores_the_candidate_with_the_same_personalisation(tmp_path, model,
                                                                   demo_clips):
    enroll, _ = demo_clips
    from agent.personal.enroll import from_files

    PersonalStore(tmp_path).save_enrollment(from_files(model, enroll))
    personal = build_personalizer(model=model, state_dir=tmp_path, microphone=FILE_MICROPHONE,
                                  adaptation=False, params=AdaptationParams(), enrollment=True,
                                  enrollment_weight=4.0, persist=False)
    assert personal.enrolled
    x, sr = sf.read(str(demo_audio()), dtype="float32")
    policy = Policy("partial", threshold(model), model.manifest.unknown_label)

    def shadow_of(personal_now, scorer_ok=True):
        p = Pipeline(VadConfig(), model, policy)
        p.personal = personal_now
        sh = ShadowRunner(model, policy, sr, active=lambda: model, personal=lambda: p.personal,
                          active_policy=lambda: policy)
        if not scorer_ok:
            sh._scorers[id(personal_now)] = None  # as for a candidate with another front end
        p.observers.append(sh)
        for i in range(0, len(x), sr // 10):
            p.feed(AudioBlock(x[i:i + sr // 10, None], sr))
            sh.run_pending()
        p.finish()
        sh.run_pending()
        return sh.take()

    same = shadow_of(personal)  # the same build as candidate, personalised alike: agrees
    assert same.scored() == "personalised" and same.agreed == same.n > 0
    plain = shadow_of(personal, scorer_ok=False)  # cannot be personalised: both plain
    assert plain.scored() == "plain" and plain.agreed == plain.n
    assert shadow_of(None).scored() == "plain"


# --- privacy: enrolled data never leaves ---------------------------------------------------
def numbers(x) -> set[float]:
    if isinstance(x, dict):
        return set().union(*(numbers(v) for v in x.values())) if x else set()
    if isinstance(x, list):
        return set().union(*(numbers(v) for v in x)) if x else set()
    if isinstance(x, float | int) and not isinstance(x, bool):
        return {float(x)}
    return set()


def test_enrolled_data_never_appears_in_any_published_payload(tmp_path, demo_clips, model):
    from agent import config as config_mod
    from agent.daemon import service
    from agent.personal.enroll import from_files

    enroll, _ = demo_clips

    def run(state: Path) -> list[dict]:
        out = tmp_path / f"{state.name}.jsonl"
        cfg = config_mod.load(None, {
            "audio.source": str(demo_audio()), "agent.state_dir": str(state),
            "output.decisions": str(tmp_path / f"{state.name}.decisions.jsonl"),
            "telemetry.sink": f"file:{out}", "monitoring.window_s": 5.0,
            "agent.device_id": "kitchen-1"})
        service.run(cfg)
        return [json.loads(line) for line in out.read_text().splitlines()]

    plain = run(tmp_path / "plain")
    e = from_files(model, enroll)
    # canaries: values no payload field can take by chance, in every enrolled head input
    canary = 9876.5 + 0.25 * np.arange(16, dtype=np.float32)
    x = e.x.copy()
    x[:, :16] = canary
    PersonalStore(tmp_path / "enrolled").save_enrollment(
        Enrollment(x, e.labels, e.frontend, e.model))
    messages = run(tmp_path / "enrolled")
    stats = [m["payload"] for m in messages if m["topic"].endswith("/stats")]
    assert stats and all(p["personal"]["enrolled"] for p in stats)
    assert not any(p["personal"]["enrolled"] for m in plain
                   for p in [m["payload"]] if m["topic"].endswith("/stats"))
    for p in stats:
        assert set(p["personal"]) == {"enrolled", "adaptation"}
        assert set(p["personal"]["adaptation"]) == {"active", "utterances"}
        assert list(STATS.iter_errors(p)) == []
        assert find_violations(p) == []
    published = set().union(*(numbers(m["payload"]) for m in messages))
    assert not [v for v in published if 9870 <= abs(v) <= 9890], "an enrolled value leaked"
    text = "\n".join(json.dumps(m) for m in messages)
    assert "enrollment" not in text and "labels" not in text
    for m in messages:  # and nothing of it in the topics or birth either
        assert "personal/" not in m["topic"]


def test_adaptation_save_on_a_full_disk_stays_in_memory_and_is_counted(tmp_path, model,
                                                                       monkeypatch):
    import errno

    from agent.personal import store as store_mod

    health = StateHealth()
    p = build_personalizer(model=model, state_dir=tmp_path, microphone="mic:USB",
                           adaptation=True, params=AdaptationParams(min_utterances=3),
                           enrollment=False, enrollment_weight=0.5, health=health)
    real = store_mod._atomic_npz

    def full(path, arrays):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "_atomic_npz", full)
    x = np.ones(model.manifest.frontend.dim, np.float32)
    probs = np.zeros(len(model.manifest.classes), np.float32)
    probs[0] = 1.0
    for _ in range(45):
        p.observe(x, probs)
    assert p.adapting and p.adapter.utterances == 45  # learning goes on in memory
    errors, _, events = health.take()
    assert errors == 2 and [e.state for e in events] == ["raised"]  # at 20 and 40, not each
    assert health.failing == {"adaptation": "No space left on device"}
    monkeypatch.setattr(store_mod, "_atomic_npz", real)
    p.close()  # space is back: saved, and the alarm clears
    assert health.failing == {} and [e.state for e in health.take()[2]] == ["cleared"]
    assert PersonalStore(tmp_path).load_adaptation(p.key, x.size)[0].n == 45


def test_another_model_starts_adaptation_afresh_and_is_shadowed_like_for_like(tmp_path, model,
                                                                              caplog):
    """What `models activate`, a rollout or a reload with another model does: the service
    builds the personalisation for the new model, whose key differs, so it starts afresh."""
    import dataclasses

    from agent import config as config_mod
    from agent.daemon import service
    from agent.personal.device import reference_path
    from tests.rollout_models import derive

    other_dir = derive(tmp_path / "m2", version="9.0.0-test")
    other = ModelRunner(other_dir, share_from=model)
    ref, _ = reference_for(model)
    dataclasses.replace(ref, model=other.manifest.ref, sha256=other.manifest.sha256).save(
        other_dir / "calibration" / "head_input_reference.npz")  # as a delivered model ships it
    assert reference_path(other_dir, other.manifest.name).parent == other_dir / "calibration"
    cfg = config_mod.load(None, {"agent.state_dir": str(tmp_path / "state"),
                                 "personal.adaptation_min_utterances": 3})
    a = service.personalize(cfg, model, microphone="mic:USB")
    observe_digits(a, model, 30)
    assert service.personalize(cfg, model, microphone="mic:USB").adapter.utterances == 30
    with caplog.at_level(logging.INFO, logger="edge-voice-agent"):
        b = service.personalize(cfg, other, microphone="mic:USB")
    assert b is not None and b.adapter.utterances == 0 and not b.adapting
    assert any("starts afresh: the model changed" in r.getMessage() for r in caplog.records)
    # and going back does not bring the old state back: it was reset on disk
    assert service.personalize(cfg, model, microphone="mic:USB").adapter.utterances == 0
    # a candidate with its own reference and the same front end is scored with this state
    assert a.scorer_for(other) is not None
    changed = ModelRunner(derive(tmp_path / "m3", version="9.0.1-test", behaviour="abstain"),
                          share_from=model)
    assert a.scorer_for(changed) is None  # another build without its reference: cannot


def test_doctor_reports_the_personal_state_without_touching_it(tmp_path):
    from agent import config as config_mod
    from agent.daemon.doctor import check_personal

    cfg = config_mod.load(None, {"agent.state_dir": str(tmp_path)})
    c = check_personal(cfg, cfg)
    assert c.status == "OK" and "no enrollment yet" in c.detail
    (tmp_path / "personal").mkdir()
    bad = tmp_path / "personal" / "enrollment.npz"
    bad.write_bytes(b"garbage")
    c = check_personal(cfg, cfg)
    assert c.status == "FAIL" and str(bad) in c.detail and "enroll again" in c.detail
    assert bad.read_bytes() == b"garbage"  # doctor only looks
    off = config_mod.load(None, {"agent.state_dir": str(tmp_path), "personal.adaptation": False,
                                 "personal.enrollment": False})
    assert check_personal(off, off).status == "SKIP"


def test_enroll_prompts_at_a_real_virtual_microphone(pulse, tmp_path, model):  # noqa: F811
    """`enroll` without files: prompts, then the words played into a PulseAudio null sink are
    captured through PortAudio like a device's microphone and enrolled."""
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.test_microphone import wait_for_line

    x, sr = sf.read(str(demo_audio()), dtype="float32")
    truth = json.loads(demo_truth().read_text())["utterances"]
    classes = [c for c in model.manifest.classes if c != model.manifest.unknown_label]
    pause = np.zeros(int(0.8 * sr), np.float32)
    parts = [pause]
    for c in classes:
        u = next(t for t in truth if t["digit"] == c)
        parts += [x[int((u["start"] - 0.1) * sr):int((u["end"] + 0.1) * sr)], pause]
    wav = tmp_path / "words.wav"
    sf.write(str(wav), np.concatenate(parts), sr, subtype="PCM_16")
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "enroll", "--state-dir", str(state), "--source",
         "mic:pulse", "--audio-mic-rate", "16000"], env=pulse, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for_line(proc.stderr, f'say "{classes[0]}"', timeout=30) is not None, \
            f"no prompt; exit {proc.poll()}"
        subprocess.run(["paplay", "--device=vsink", str(wav)], env=pulse, check=True,
                       timeout=60)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "enrolled 10 recordings of 10 classes" in out
    saved = PersonalStore(state).load_enrollment()
    assert saved is not None and list(saved.labels) == classes



def test_force_cut_segments_do_not_teach_the_adaptation(model):
    """Running speech cut at max_utterance_ms is not a command: it is decided, but it does not
    join the device's running mean."""
    seen: list[np.ndarray] = []

    class Recorder:
        def predict(self, m, x):
            return m.predict(x[None, :])[0]

        def observe(self, x, probs):
            seen.append(x)

    x, sr = sf.read(str(demo_audio()), dtype="float32")
    p = Pipeline(VadConfig(max_utterance_ms=550), model,
                 Policy("partial", threshold(model), model.manifest.unknown_label))
    p.personal = Recorder()
    out = []
    for i in range(0, len(x), sr // 10):
        out += p.feed(AudioBlock(x[i:i + sr // 10, None], sr))
    out += p.finish()
    cut = sum(d.forced_cut for d in out)
    assert 0 < cut < len(out) and len(seen) == len(out) - cut


def test_enrollment_slice_counts_at_the_per_class_thresholds_and_never_unknown():
    from agent.recognition.decision import Thresholds
    from agent.training.enrollment_slice import class_thresholds, rates

    classes = ("0", "1", "unknown")
    thr = class_thresholds(Thresholds(model="m@1", sha256="x", threshold=0.9,
                                      target_precision=0.99, source="test",
                                      per_class=(("1", 0.5),)), classes)
    assert thr.tolist() == [0.9, 0.5, 0.9]
    p = np.array([[0.8, 0.1, 0.1],    # "0" at 0.8: under its 0.9, not acted on
                  [0.1, 0.6, 0.3],    # "1" at 0.6: over its own 0.5, acted on (right)
                  [0.0, 0.05, 0.95],  # unknown, however sure: never acted on
                  [0.3, 0.7, 0.0]])   # "1" acted on, but it was a "0": wrong
    r = rates(p, np.array([0, 1, 2, 0]), thr, unknown=2)
    assert r == {"accuracy": 0.75, "coverage": 0.5, "precision": 0.5, "wrong_accepted": 1,
                 "n": 4}


def test_evaluate_enrollment_prints_the_slice_for_every_fsdd_speaker(fsdd, speech_commands):
    """issue 16's figure: `evaluate` with an enrollment slice (one draw here; the card and
    docs/personal.md quote ten)."""
    r = eva("evaluate", "--enrollment", "--data", str(fsdd), "--speech-commands",
            str(speech_commands), "--reps", "1", "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["model"] == Manifest.read(default_model_dir() / MANIFEST).ref
    assert set(report["enrollment"]) == {"jackson", "lucas", "nicolas", "theo", "yweweler"}
    for v in report["enrollment"].values():
        assert v["before"]["scored_per_draw"] == v["after"]["scored_per_draw"] == 490
        assert 0.9 <= v["after"]["accuracy"] <= 1 and v["after"]["precision"] >= 0.99
