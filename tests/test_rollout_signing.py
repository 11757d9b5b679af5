"""Signed bundles: `models keygen` / `models sign` offline, devices trusting the keys listed in
`rollout.trusted_keys` — a round trip, a tampered calibration file, an unknown key, key
rotation, and the daemon refusing an unsigned rollout with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.config import load
from agent.errors import AgentError, ConfigError
from agent.recognition.model import MANIFEST, Manifest
from agent.resources import default_model_dir
from agent.rollout.bundle import SIGNATURE, bundle_digest
from agent.rollout.signing import keygen, sign
from agent.rollout.store import ModelStore
from tests.conftest import eva
from tests.rollout_models import derive

RUNNING = Manifest.read(default_model_dir() / MANIFEST)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    d = tmp_path_factory.mktemp("keys")
    return {name: (d / name, keygen(d / name)) for name in ("old", "new", "stranger")}


def test_keygen_and_sign_from_the_cli_round_trip(tmp_path):
    key = tmp_path / "op.key"
    r = eva("models", "keygen", str(key))
    assert r.returncode == 0, r.stderr
    pub = r.stdout.strip().splitlines()[-1]
    assert pub.startswith("ed25519:") and (tmp_path / "op.key.pub").read_text().strip() == pub
    assert key.stat().st_mode & 0o777 == 0o600
    assert eva("models", "keygen", str(key)).returncode == 1  # never overwrites a key
    b = derive(tmp_path / "b", version="9.0.0-signed")
    r = eva("models", "sign", str(b), "--key", str(key))
    assert r.returncode == 0 and bundle_digest(b) in r.stdout, r.stderr
    sig = json.loads((b / SIGNATURE).read_text())
    assert sig["key"] == pub and sig["sha256"] == bundle_digest(b)
    # the device, trusting that key: installs it, checks it again on every load
    state = tmp_path / "state"
    conf = tmp_path / "config.toml"
    conf.write_text(f'[rollout]\ntrusted_keys = "{pub}"\n')
    device = ("--state-dir", str(state), "--config", str(conf))
    r = eva("models", "install", str(b), *device)
    assert r.returncode == 0, r.stderr
    store = ModelStore(state, [pub])
    store.verify("fsdd-digits@9.0.0-signed")
    # unsigned, with a trusted key configured: one line, saying how to sign
    u = derive(tmp_path / "u", version="9.0.0-unsigned")
    r = eva("models", "install", str(u), *device)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "unsigned" in r.stderr
    assert "models sign" in r.stderr
    # without trusted keys nothing is required (the default; a fleet opts in)
    assert ModelStore(tmp_path / "s2").install(u, RUNNING) == "fsdd-digits@9.0.0-unsigned"


def test_a_calibration_file_edited_after_signing_is_refused(tmp_path, keys):
    key, pub = keys["old"]
    b = derive(tmp_path / "b", version="9.0.1-signed")
    sign(b, key)
    t = json.loads((b / "calibration" / "thresholds.json").read_text())
    t["threshold"] = 0.1
    (b / "calibration" / "thresholds.json").write_text(json.dumps(t))
    with pytest.raises(AgentError, match="signature does not match its files") as e:
        ModelStore(tmp_path / "s", [pub]).install(b, RUNNING)
    assert "\n" not in str(e.value)
    # signed, installed, then edited in its slot: refused on the next load
    good = derive(tmp_path / "g", version="9.0.2-signed")
    sign(good, key)
    store = ModelStore(tmp_path / "s", [pub])
    ref = store.install(good, RUNNING)
    cal = store.slot_dir(ref) / "calibration" / "baseline.json"
    cal.write_text(cal.read_text() + " ")
    with pytest.raises(AgentError, match="changed on disk"):
        store.verify(ref)


def test_a_bundle_signed_by_an_unknown_key_is_refused(tmp_path, keys):
    b = derive(tmp_path / "b", version="9.0.3-signed")
    sign(b, keys["stranger"][0])
    with pytest.raises(AgentError, match="not in rollout.trusted_keys"):
        ModelStore(tmp_path / "s", [keys["old"][1]]).install(b, RUNNING)
    # a signature file naming a trusted key but made by another one does not verify either
    sig = json.loads((b / SIGNATURE).read_text())
    sig["key"] = keys["old"][1]
    (b / SIGNATURE).write_text(json.dumps(sig))
    with pytest.raises(AgentError, match="signature does not match"):
        ModelStore(tmp_path / "s", [keys["old"][1]]).install(b, RUNNING)


def test_key_rotation_trusts_both_keys_then_retires_the_old_one(tmp_path, keys):
    (old, old_pub), (new, new_pub) = keys["old"], keys["new"]
    a = derive(tmp_path / "a", version="9.1.0-old-key")
    b = derive(tmp_path / "b", version="9.1.1-new-key")
    sign(a, old)
    sign(b, new)
    cfg_file = tmp_path / "config.toml"
    cfg_file.write_text(f'[rollout]\ntrusted_keys = "{old_pub}, {new_pub}"\n')
    both = load(cfg_file).rollout.trusted()
    assert both == [old_pub, new_pub]
    store = ModelStore(tmp_path / "s", both)
    assert store.install(a, RUNNING) and store.install(b, RUNNING)
    # the old key retired: what it signed is no longer loaded
    retired = ModelStore(tmp_path / "s", [new_pub])
    retired.verify("fsdd-digits@9.1.1-new-key")
    with pytest.raises(AgentError, match="not in rollout.trusted_keys"):
        retired.verify("fsdd-digits@9.1.0-old-key")
    cfg_file.write_text('[rollout]\ntrusted_keys = "ed25519:bm90IGEga2V5"\n')
    with pytest.raises(ConfigError, match="rollout.trusted_keys.*not an ed25519 public key"):
        load(cfg_file)


def test_the_daemon_refuses_an_unsigned_rollout_with_one_line(tmp_path, keys, make_stream):
    from tests.test_rollout_device import of, run
    from tests.test_rollout_safety import deliver

    wav = make_stream(seconds=30, seed=5).with_suffix(".wav")
    state = tmp_path / "state"
    c = deliver(state, derive(tmp_path / "u", version="9.2.0-unsigned"), "shadow")
    msgs, decisions = run(tmp_path, wav, state, "--rollout-trusted-keys", keys["old"][1])
    (e,) = [e for e in of(msgs, "event") if e["event"] == "rollout_refused"]
    assert "unsigned" in e["reason"] and c.ref in e["reason"] and "\n" not in e["reason"]
    assert {d["model"] for d in decisions} == {RUNNING.ref}
