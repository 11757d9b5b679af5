"""`edge-voice-agent doctor` on a good and on broken setups, as the CLI and check by check."""

from __future__ import annotations

import json
import os
import shutil
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.config import Config
from agent.daemon import doctor
from agent.resources import default_model_dir, demo_audio
from tests.conftest import eva
from tests.mqtt_fixtures import BrokerFactory, Pki, free_port, mosquitto, pki  # noqa: F401

CHECKS = ["config", "audio_devices", "audio_source", "model", "thresholds", "baseline",
          "personal", "actions", "state_dir", "state_space", "outbox", "broker", "clock"]


@pytest.fixture
def state(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    return d


def test_good_setup_passes(state: Path) -> None:
    r = eva("doctor", "--source", str(demo_audio()), "--state-dir", str(state), timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert [line.split()[1] for line in lines] == CHECKS  # one line per check, in order
    status = {line.split()[1]: line.split()[0] for line in lines}
    assert status["model"] == status["thresholds"] == status["baseline"] == "OK"
    assert status["personal"] == "OK" and "no enrollment yet" in r.stdout
    assert status["state_dir"] == status["clock"] == status["audio_source"] == "OK"
    assert status["broker"] == "SKIP" and "telemetry is none" in r.stdout
    assert "FAIL" not in r.stdout


def test_broken_setup_fails_with_the_reason_and_json_shape(tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(default_model_dir(), model)
    data = bytearray((model / "head.onnx").read_bytes())
    data[200] ^= 0x01  # one bit: the sha256 must catch it
    (model / "head.onnx").write_bytes(bytes(data))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    r = eva("doctor", "--json", "--source", str(demo_audio()), "--model", str(model),
            "--state-dir", str(blocker / "state"), timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert isinstance(report, list) and [c["check"] for c in report] == CHECKS
    assert all(set(c) == {"check", "status", "detail"} for c in report)
    assert all(c["status"] in ("OK", "FAIL", "SKIP") and c["detail"] for c in report)
    by = {c["check"]: c for c in report}
    assert by["model"]["status"] == "FAIL" and "sha256" in by["model"]["detail"]
    assert by["state_dir"]["status"] == "FAIL" and "cannot be created" in by["state_dir"]["detail"]
    assert by["clock"]["status"] == "OK"  # the rest is still checked and reported


def test_broken_config_is_a_failed_check_not_a_crash(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text("[decision]\nthreshold = 'high'\n")
    r = eva("doctor", "--config", str(cfg), timeout=60)
    assert r.returncode == 1
    assert r.stdout.startswith("FAIL  config") and "decision.threshold" in r.stdout


def _cfg(state: Path, **telemetry: str) -> Config:
    cfg = Config()
    cfg.agent.state_dir = str(state)
    cfg.agent.device_id = "dev-doc"
    cfg.audio.source = str(demo_audio())
    for k, v in telemetry.items():
        setattr(cfg.telemetry, k, v)
    return cfg


def test_state_dir_permissions(tmp_path: Path) -> None:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    assert doctor.check_state_dir(_cfg(d)).status == "OK"
    d.chmod(0o777)
    c = doctor.check_state_dir(_cfg(d))
    assert c.status == "FAIL" and "0777" in c.detail and "chmod 0700" in c.detail
    d.chmod(0o755)
    assert doctor.check_state_dir(_cfg(d)).status == "FAIL"  # others could read decisions
    d.chmod(0o700)
    assert doctor.check_state_dir(_cfg(tmp_path / "new" / "state")).status == "OK"  # creatable
    assert not (tmp_path / "new").exists()  # the doctor does not create it
    assert stat.S_IMODE(d.stat().st_mode) == 0o700 and not list(d.iterdir())  # nothing left


def test_thresholds_for_another_model_build_fail(tmp_path: Path, state: Path) -> None:
    t = tmp_path / "thresholds.json"
    t.write_text(json.dumps({"model": "fsdd-digits@0.0.1", "sha256": "0" * 64,
                             "threshold": 0.9, "target_precision": 0.99}))
    cfg = _cfg(state)
    cfg.model.thresholds = str(t)
    c = doctor.check_thresholds(cfg)
    assert c.status == "FAIL" and "recalibrate" in c.detail
    cfg.decision.threshold = 0.8
    assert doctor.check_thresholds(cfg).status == "SKIP"
    cfg.monitoring.baseline = str(tmp_path / "missing.json")
    assert doctor.check_baseline(cfg).status == "FAIL"


def test_audio_devices_absent(monkeypatch: pytest.MonkeyPatch, state: Path) -> None:
    import agent.audio.sources as sources

    monkeypatch.setattr(sources, "input_devices", lambda: [])
    cfg = _cfg(state)
    assert doctor.check_audio_devices(cfg).status == "SKIP"  # a file source needs none
    cfg.audio.source = "mic"
    c = doctor.check_audio_devices(cfg)
    assert c.status == "FAIL" and "no audio input device" in c.detail
    monkeypatch.setattr(sources, "input_devices", lambda: [(3, "USB Mic (hw:1,0)")])
    assert doctor.check_audio_devices(cfg) == doctor.Check(
        "audio_devices", "OK", "1 input device(s): 3: USB Mic (hw:1,0)")


def test_clock_before_the_build_date_fails() -> None:
    assert doctor.check_clock().status == "OK"
    c = doctor.check_clock(wall=lambda: 86400.0)  # a board without RTC, booted at 1970
    assert c.status == "FAIL" and "1970-01-02" in c.detail
    frozen = doctor.check_clock(build_date=datetime(2020, 1, 1, tzinfo=UTC), mono=lambda: 5.0)
    assert frozen.status == "FAIL" and "monotonic" in frozen.detail


def test_broker_reachability_with_tls_and_credentials(mosquitto: BrokerFactory,  # noqa: F811
                                                      pki: Pki, state: Path,  # noqa: F811
                                                      tmp_path: Path) -> None:
    broker = mosquitto(tls=pki, users={"dev-doc": "right"})
    pw = tmp_path / "pw"
    pw.write_text("right\n")
    url = f"mqtts://127.0.0.1:{broker.port}"
    ok = doctor.check_broker(_cfg(state, sink=url, password_file=str(pw), ca_file=str(pki.ca)))
    assert ok.status == "OK" and "TLS" in ok.detail and "dev-doc" in ok.detail, broker.log()
    # The probe never uses the device's own client id (that would kick the running service).
    assert "dev-doc-doctor-" in broker.log()

    pw.write_text("wrong\n")
    bad = doctor.check_broker(_cfg(state, sink=url, password_file=str(pw), ca_file=str(pki.ca)))
    assert bad.status == "FAIL" and "refused" in bad.detail
    untrusted = doctor.check_broker(_cfg(state, sink=url, password_file=str(pw)))  # system CAs
    assert untrusted.status == "FAIL" and "certificate" in untrusted.detail.lower()
    down = doctor.check_broker(_cfg(state, sink=f"mqtt://127.0.0.1:{free_port()}"), 2.0)
    assert down.status == "FAIL" and "refused" in down.detail.lower()
    assert doctor.check_broker(_cfg(state)).status == "SKIP"


def test_doctor_exit_code_follows_failures(capsys: pytest.CaptureFixture, state: Path) -> None:
    good = _cfg(state)
    assert doctor.main(lambda: good) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == len(CHECKS)
    os.chmod(state, 0o707)
    assert doctor.main(lambda: good, as_json=True) == 1
    report = json.loads(capsys.readouterr().out)
    assert [c["status"] for c in report if c["check"] == "state_dir"] == ["FAIL"]


def test_outbox_integrity_and_state_space(tmp_path: Path, state: Path) -> None:
    """Issue 10: doctor runs PRAGMA quick_check on the outbox and reads the free space."""
    from agent.telemetry.message import Message
    from agent.telemetry.outbox import OUTBOX_FILENAME, Outbox
    from tests.fs_fixtures import fill, tiny_fs

    cfg = _cfg(state)
    cfg.telemetry.sink = "mqtt://127.0.0.1:1883"
    assert doctor.check_outbox(cfg).status == "OK"  # not created yet
    with Outbox(state / OUTBOX_FILENAME) as ob:
        for i in range(200):
            ob.append(Message("t", {"seq": i, "pad": "x" * 400}))
    c = doctor.check_outbox(cfg)
    assert c.status == "OK" and "200 message(s) queued" in c.detail
    data = bytearray((state / OUTBOX_FILENAME).read_bytes())
    data[4096 * 2:4096 * 4] = os.urandom(4096 * 2)  # overwritten pages
    (state / OUTBOX_FILENAME).write_bytes(bytes(data))
    c = doctor.check_outbox(cfg)
    assert c.status == "FAIL" and str(state / OUTBOX_FILENAME) in c.detail
    assert "moves it aside" in c.detail
    assert doctor.check_state_space(cfg).status == "OK"
    with tiny_fs(tmp_path / "small", "400k") as small:
        fill(small, leave=16 * 1024)
        c = doctor.check_state_space(_cfg(small / "state"))  # not created yet: its parent
        assert c.status == "FAIL" and "MiB free" in c.detail and "agent.state_dir" in c.detail
