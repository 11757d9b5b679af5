"""Review samples: opt-in, bounded by count, bytes and age, private files, never published,
purged on demand and on uninstall (tests/test_systemd_unit.py); the exported folder, once
labelled, is what the training data loader reads."""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest

from agent.monitoring.samples import EXPORT_README, SampleStore
from tests.conftest import eva

RATE = 8000


def tone(seconds: float = 0.5) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def test_bounds_count_bytes_age_and_private_files(tmp_path):
    clock = Clock()
    store = SampleStore(tmp_path, max_count=5, max_bytes=10**9, max_age_s=3600, clock=clock)
    for i in range(8):
        clock.t += 1
        assert store.save(tone(), RATE, {"reason": "abstained", "i": i}) is not None
    items = store.list()
    assert [s.meta["i"] for s in items] == [3, 4, 5, 6, 7]  # oldest deleted first
    assert stat.S_IMODE(store.dir.stat().st_mode) == 0o700
    for p in store.dir.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    one = items[0].bytes
    store.max_bytes = 3 * one
    store.enforce()
    assert len(store.list()) == 3 and sum(s.bytes for s in store.list()) <= 3 * one
    clock.t += 3601  # all older than max_age_s
    assert store.enforce() == 3 and store.list() == []
    assert store.save(tone(), RATE, {"reason": "x"}) is not None
    assert store.purge() == 1 and not store.dir.exists()


def test_full_disk_is_counted_not_fatal(tmp_path):
    (tmp_path / "samples").write_text("a file where the folder should be")
    store = SampleStore(tmp_path)
    assert store.save(tone(), RATE, {}) is None and store.errors == 1


def test_export_then_labelled_names_are_training_clips(tmp_path):
    from agent.training.dataset import discover

    store = SampleStore(tmp_path / "state")
    for _ in range(3):
        store.save(tone(), RATE, {"reason": "abstained", "device_label": "7"})
    out = tmp_path / "export"
    assert store.export(out, "kitchen_pi") == 3
    wavs = sorted(out.glob("*.wav"))
    assert [w.name for w in wavs] == ["kitchen-pi-0.wav", "kitchen-pi-1.wav", "kitchen-pi-2.wav"]
    assert "7_kitchen-pi_0.wav" in (out / EXPORT_README).read_text()
    with pytest.raises(Exception, match="no clips"):
        discover(out)  # unlabelled files are never taken for training data
    wavs[0].rename(out / "7_kitchen-pi_0.wav")
    wavs[1].rename(out / "3_kitchen-pi_1.wav")
    clips = discover(out)
    assert [(c.label, c.speaker) for c in clips] == [("3", "kitchen-pi"), ("7", "kitchen-pi")]


def test_agent_keeps_samples_only_when_enabled_and_never_publishes_them(tmp_path, make_stream):
    wav = make_stream(seconds=30, seed=51).with_suffix(".wav")
    base = ("run", "--source", str(wav), "--window", "10", "--device-id", "dev-1",
            "--log-level", "WARNING")
    off = tmp_path / "off"
    r = eva(*base, "--state-dir", str(off), "--telemetry", f"file:{off / 't.jsonl'}")
    assert r.returncode == 0, r.stderr
    assert not (off / "samples").exists()  # off by default
    on = tmp_path / "on"
    r = eva(*base, "--state-dir", str(on), "--telemetry", f"file:{on / 't.jsonl'}",
            "--samples-enabled", "true", "--samples-max-count", "4",
            "--samples-confidence-below", "1.0")  # every decision is a hard case here
    assert r.returncode == 0, r.stderr
    decisions = [json.loads(x) for x in (on / "decisions.jsonl").read_text().splitlines()]
    assert len(decisions) > 4
    kept = sorted((on / "samples").glob("*.wav"))
    assert len(kept) == 4  # bounded
    metas = [json.loads(p.with_suffix(".json").read_text()) for p in kept]
    assert all(m["reason"] in ("abstained", "low_confidence") for m in metas)
    telemetry = (on / "t.jsonl").read_text()
    assert all(p.stem not in telemetry for p in kept) and "samples" not in telemetry
    assert "RIFF" not in telemetry and "device_label" not in telemetry
    r = eva("samples", "list", "--state-dir", str(on))
    assert r.returncode == 0 and r.stdout.startswith("4 samples")
    r = eva("samples", "purge", "--state-dir", str(on))
    assert r.returncode == 0 and "purged 4" in r.stdout
    assert not (on / "samples").exists()


def test_labelled_export_is_an_extra_training_source(tmp_path, monkeypatch):
    import soundfile as sf

    from agent.cli import build_parser
    from agent.training.dataset import discover

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    main = tmp_path / "fsdd"
    main.mkdir()
    for name in ("3_jackson_0.wav", "4_jackson_1.wav", "5_theo_0.wav"):
        sf.write(main / name, tone(), RATE)
    store = SampleStore(tmp_path / "state")
    for _ in range(3):
        store.save(tone(), RATE, {"reason": "abstained"})
    out = tmp_path / "export"
    store.export(out, "kitchen")
    (out / "kitchen-0.wav").rename(out / "7_kitchen_0.wav")  # labelled by a person
    (out / "kitchen-1.wav").rename(out / "2_kitchen_1.wav")  # kitchen-2.wav left unlabelled
    single = build_parser().parse_args(["train", "--data", str(main)])
    assert single.data == main
    args = build_parser().parse_args(["evaluate", "--data", str(main), "--data", str(out)])
    clips = discover(args.data)
    assert sorted((c.label, c.speaker) for c in clips) == [
        ("2", "field"), ("3", "jackson"), ("4", "jackson"), ("5", "theo"), ("7", "field")]
    assert {c.path.resolve() for c in clips if c.speaker == "field"} == {
        (out / "7_kitchen_0.wav").resolve(), (out / "2_kitchen_1.wav").resolve()}
    empty = tmp_path / "unlabelled"
    store.export(empty, "hall")
    with pytest.raises(Exception, match="no labelled recordings"):
        build_parser().parse_args(["train", "--data", str(main), "--data", str(empty)])
