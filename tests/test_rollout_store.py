"""Model store (verified install and load, atomic pointers) and canary cohorts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.errors import AgentError
from agent.recognition.model import MANIFEST, Manifest
from agent.resources import default_model_dir
from agent.rollout.bundle import bundle_digest
from agent.rollout.cohort import bucket, in_cohort
from agent.rollout.store import ModelStore, Probation
from tests.rollout_models import derive

RUNNING = Manifest.read(default_model_dir() / MANIFEST)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return derive(tmp_path_factory.mktemp("m") / "good", version="9.0.0-test")


def test_install_verifies_and_lists_then_activate_and_rollback_move_pointers(tmp_path, good):
    store = ModelStore(tmp_path)
    ref = store.install(good, RUNNING, expect_digest=bundle_digest(good))
    assert ref == f"{RUNNING.name}@9.0.0-test"
    assert [s.ref for s in store.installed()] == [ref]
    assert store.install(good, RUNNING) == ref  # the same build again: a no-op
    p = store.activate(ref, RUNNING, Probation(ref, None, 3))
    assert (p.active, p.previous, p.probation.windows_total) == (ref, None, 3)
    on_disk = json.loads((tmp_path / "models" / "pointers.json").read_text())
    assert on_disk["active"] == ref and on_disk["probation"]["ref"] == ref
    assert not list((tmp_path / "models").glob(".*tmp"))  # no temp files left behind
    p = store.rollback()
    assert (p.active, p.previous, p.probation) == (None, ref, None)
    with pytest.raises(AgentError, match="nothing to roll back"):
        ModelStore(tmp_path / "empty").rollback()


def test_corrupt_model_refused_on_install_and_on_load(tmp_path, good):
    bad = derive(tmp_path / "bad", version="9.1.0-test")
    onnx = next(bad.glob("*.onnx"))
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    store = ModelStore(tmp_path / "state")
    with pytest.raises(AgentError, match="sha256") as e:
        store.install(bad, RUNNING)
    assert "\n" not in str(e.value)
    assert store.installed() == [] and not list(store.slots.iterdir())  # nothing half-installed
    # a slot corrupted on disk after a good install is refused when loaded
    ref = store.install(good, RUNNING)
    slot_onnx = next(store.slot_dir(ref).glob("*.onnx"))
    slot_onnx.write_bytes(slot_onnx.read_bytes()[:-7])
    with pytest.raises(AgentError, match="sha256"):
        store.verify(ref)
    with pytest.raises(AgentError, match="sha256"):
        store.activate(ref, RUNNING)
    assert store.pointers().active is None


def test_mismatching_digest_and_other_build_refused(tmp_path, good):
    store = ModelStore(tmp_path)
    with pytest.raises(AgentError, match="does not match"):
        store.install(good, RUNNING, expect_digest="0" * 64)
    store.install(good, RUNNING)
    other = derive(tmp_path / "other", version="9.0.0-test", behaviour="abstain")
    with pytest.raises(AgentError, match="another build"):
        store.install(other, RUNNING)


def test_incompatible_models_refused_with_the_reason(tmp_path):
    renamed = derive(tmp_path / "renamed", version="9.2.0-test")
    d = json.loads((renamed / MANIFEST).read_text())
    d["classes"] = [c if c != d["unknown_label"] else "other" for c in d["classes"]]
    d["unknown_label"] = "other"
    (renamed / MANIFEST).write_text(json.dumps(d))
    with pytest.raises(AgentError, match="another vocabulary than .*--allow-vocabulary-change"):
        ModelStore(tmp_path / "s1").install(renamed, RUNNING)
    uncalibrated = derive(tmp_path / "uncal", version="9.3.0-test", behaviour="abstain")
    (uncalibrated / "calibration" / "thresholds.json").unlink()
    # the bundled calibration belongs to another build: refused, not silently used
    with pytest.raises(AgentError, match="calibration"):
        ModelStore(tmp_path / "s2").install(uncalibrated, RUNNING)


def test_cohort_is_stable_nested_and_close_to_its_share():
    ids = [f"device-{i:05d}" for i in range(10_000)]
    for pct in (1, 5, 25, 50):
        share = 100 * sum(in_cohort("r-42", d, pct) for d in ids) / len(ids)
        assert abs(share - pct) <= 2, (pct, share)
    small = {d for d in ids if in_cohort("r-42", d, 5)}
    large = {d for d in ids if in_cohort("r-42", d, 25)}
    assert small <= large and len(large) > len(small)
    assert all(in_cohort("r-42", d, 5) for d in small)  # stable: same answer every time
    assert bucket("r-42", "device-00001") == bucket("r-42", "device-00001")
    other = {d for d in ids if in_cohort("r-43", d, 5)}
    assert len(small & other) < len(small) / 2  # a new rollout draws a new cohort
    assert not any(in_cohort("r-42", d, 0) for d in ids)
    assert all(in_cohort("r-42", d, 100) for d in ids)


def test_models_cli_install_activate_list_rollback(tmp_path, good):
    from tests.conftest import eva

    state = ("--state-dir", str(tmp_path / "state"))
    bad = derive(tmp_path / "bad", version="9.4.0-test")
    next(bad.glob("*.onnx")).write_bytes(b"not a model")
    r = eva("models", "install", str(bad), *state)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and str(bad) in r.stderr
    r = eva("models", "install", str(good), *state)
    assert r.returncode == 0, r.stderr
    ref = f"{RUNNING.name}@9.0.0-test"
    r = eva("models", "activate", ref, *state)
    assert r.returncode == 0 and f"previous: {RUNNING.ref}" in r.stdout and "reload" in r.stdout
    r = eva("models", "list", *state)
    assert r.returncode == 0 and f"running: {ref} (store)" in r.stdout
    assert "active" in r.stdout and "verified" in r.stdout and "probation" in r.stdout
    r = eva("models", "rollback", *state)
    assert r.returncode == 0 and "bundled" in r.stdout
    r = eva("models", "activate", "nope@1", *state)
    assert r.returncode == 1 and "not installed" in r.stderr


def test_doctor_checks_the_model_the_store_makes_active(tmp_path, good):
    from agent.config import Config
    from agent.daemon import doctor

    cfg = Config()
    cfg.agent.state_dir = str(tmp_path)
    store = ModelStore(tmp_path)
    ref = store.install(good, RUNNING)
    store.activate(ref, RUNNING)
    text = " ".join(str(c) for c in doctor.run_checks(cfg))
    assert ref in text and "calibration/thresholds.json" in text
    (tmp_path / "models" / "pointers.json").write_text("{garbled")
    text = " ".join(str(c) for c in doctor.run_checks(cfg))
    assert "model store" in text and "pointers" in text


def test_a_slot_installed_before_bundle_digests_is_adopted_once_then_checked(tmp_path, good):
    store = ModelStore(tmp_path)
    ref = store.install(good, RUNNING)
    ptr = json.loads((tmp_path / "models" / "pointers.json").read_text())
    ptr.pop("bundles")  # what an older agent left behind
    (tmp_path / "models" / "pointers.json").write_text(json.dumps(ptr))
    store.verify(ref)
    assert store.digest(ref) == bundle_digest(good)
    cal = store.slot_dir(ref) / "calibration" / "thresholds.json"
    cal.write_text(cal.read_text() + " ")
    with pytest.raises(AgentError, match="changed on disk"):
        store.verify(ref)
