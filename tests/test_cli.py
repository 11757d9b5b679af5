"""The command line as a user runs it: separate processes, exit codes, one-line errors."""

from __future__ import annotations

import json
import sys

import soundfile as sf

from agent import __version__
from agent.resources import demo_audio, demo_truth
from tests.conftest import eva

DECISION_KEYS = {"start", "end", "decided_at", "label", "confidence", "accepted", "model",
                 "latency_ms"}


def test_version_and_help():
    r = eva("--version")
    assert r.returncode == 0 and __version__ in r.stdout
    r = eva("--help")
    for cmd in ("run", "classify", "train", "demo"):
        assert cmd in r.stdout
    r = eva("run", "--help")
    for flag in ("--source", "--speed", "--decisions", "--config", "--state-dir", "--device-id",
                 "--telemetry", "--vad-aggressiveness"):
        assert flag in r.stdout


def test_demo_prints_decisions_for_the_bundled_recording():
    r = eva("demo", "--log-level", "WARNING")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    truth = json.loads(demo_truth().read_text())["utterances"]
    assert len(lines) == len(truth)
    for d in lines:
        assert DECISION_KEYS <= set(d)
        assert 0 <= d["start"] < d["end"] <= d["decided_at"]
    accepted = [d for d in lines if d["accepted"]]
    assert accepted, "the demo acts on at least some digits"


def test_run_writes_decisions_file_and_state_dir_default(tmp_path):
    state = tmp_path / "state"
    r = eva("run", "--source", str(demo_audio()), "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    lines = (state / "decisions.jsonl").read_text().splitlines()
    assert len(lines) == len(json.loads(demo_truth().read_text())["utterances"])


def test_run_is_deterministic_on_a_file(tmp_path):
    outs = []
    for i in range(2):
        p = tmp_path / f"d{i}.jsonl"
        r = eva("run", "--source", str(demo_audio()), "--decisions", str(p),
                "--audio-block-ms", str(50 + 300 * i))
        assert r.returncode == 0, r.stderr
        outs.append([{k: v for k, v in json.loads(x).items() if k != "latency_ms"}
                     for x in p.read_text().splitlines()])
    assert outs[0] == outs[1]


def test_config_error_exits_2_with_one_line(tmp_path):
    c = tmp_path / "c.toml"
    c.write_text("[vad]\nframe_ms = 25\n")
    r = eva("run", "--config", str(c), "--source", str(demo_audio()))
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "vad.frame_ms" in err[0] and "10, 20, 30" in err[0]
    r = eva("run", "--vad-aggressiveness", "9", "--source", str(demo_audio()))
    assert r.returncode == 2 and "vad.aggressiveness = '9'" not in r.stderr
    assert "vad.aggressiveness = 9 is out of range" in r.stderr


def test_bad_audio_is_a_one_line_error(tmp_path):
    bad = tmp_path / "x.wav"
    bad.write_bytes(b"garbage" * 10)
    r = eva("run", "--source", str(bad), "--decisions", str(tmp_path / "d.jsonl"))
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "cannot be read" in r.stderr


def test_bad_model_dir_is_a_one_line_error(tmp_path):
    r = eva("run", "--model", str(tmp_path), "--source", str(demo_audio()))
    assert r.returncode == 1 and "manifest" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_classify_prints_one_line_per_file(tmp_path):
    x, sr = sf.read(str(demo_audio()), dtype="float32")
    truth = json.loads(demo_truth().read_text())["utterances"][:3]
    files = []
    for i, u in enumerate(truth):
        p = tmp_path / f"u{i}.wav"
        sf.write(str(p), x[int(u["start"] * sr):int(u["end"] * sr)], sr)
        files.append(str(p))
    r = eva("classify", *files)
    assert r.returncode == 0, r.stderr
    out = [json.loads(x) for x in r.stdout.splitlines()]
    assert [o["file"] for o in out] == files
    for o in out:
        assert set(o) == {"file", "label", "confidence", "accepted"}
        assert 0.0 <= o["confidence"] <= 1.0


def test_train_without_the_extra_names_the_fix(tmp_path):
    # Simulate a device install: scikit-learn is not importable.
    code = ("import sys; sys.modules['sklearn'] = None; sys.modules['skl2onnx'] = None; "
            "from agent.cli import main; raise SystemExit(main(['train', '--data', '.']))")
    import subprocess

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "train" in r.stderr and "pip install" in r.stderr


def test_the_daemon_never_imports_training_libraries():
    """Nor openwakeword: its two graphs are copied into the model directory at training."""
    code = ("import sys, agent.cli as c; rc = c.main(['demo', '--log-level', 'ERROR']); "
            "bad = [m for m in ('sklearn', 'skl2onnx', 'openwakeword', 'agent.training') "
            "if m in sys.modules]; "
            "print('IMPORTED', bad, file=sys.stderr); raise SystemExit(rc or (3 if bad else 0))")
    import subprocess

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "IMPORTED []" in r.stderr
