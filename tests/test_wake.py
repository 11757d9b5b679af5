"""Wake mode (`[addressing] mode = "wake"`, agent/recognition/wake.py) through `run`: a wake phrase
learned from text alone, commands after it and without it, in two segments and in one breath;
monitoring of the wake stage; reload between modes; config errors in one line."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from agent.recognition.model import MANIFEST
from agent.resources import default_model_dir, demo_audio
from tests.conftest import ROOT, eva
from tests.test_cli_messages import error_line
from tests.test_service_lifecycle import Agent, agents  # noqa: F401 (fixture)
from tests.wake_models import WAKE_WORD, lay_out, make_wake_model

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("flite") is None,
                                reason="wake models and voices are synthesised with espeak-ng "
                                       "and flite (apt)")
STATS = Draft202012Validator(json.loads((ROOT / "docs" / "stats.schema.json").read_text()))
VOICE = ("espeak", "en-gb-scotland", 150, 50)   # a held-out voice: never in the wake model


@pytest.fixture(scope="module")
def wake_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_wake_model(tmp_path_factory.mktemp("wake") / "model")


@pytest.fixture(scope="module")
def voice() -> dict[str, object]:
    from agent.training.synth import run_job

    return {w: run_job((*VOICE, w)) for w in (WAKE_WORD, "seven", "three")}


def write_stream(path: Path, parts: list) -> list[dict]:
    import soundfile as sf

    x, truth = lay_out(parts)
    sf.write(str(path), x, 16000, subtype="PCM_16")
    return truth


def decisions(r) -> list[dict]:
    assert r.returncode == 0, r.stderr
    return [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]


def test_wake_mode_acts_only_on_the_command_after_the_wake_phrase(tmp_path, wake_model, voice):
    w, seven, three = voice[WAKE_WORD], voice["seven"], voice["three"]
    stream = tmp_path / "s.wav"
    truth = write_stream(stream, [
        ("p", 1.5), ("wake", w), ("p", 0.6), ("7", seven),     # wake, pause, command
        ("p", 6.0), ("3", three),                              # a command alone
        ("p", 3.0), ("wake", w), ("p", 7.0),                   # a wake phrase alone
        ("wake", w), ("p", 0.08), ("7", seven), ("p", 2.0)])   # wake + command in one breath
    tel = tmp_path / "tel.jsonl"
    common = ["run", "--source", str(stream), "--decisions", "-", "--state-dir",
              str(tmp_path / "st")]
    always = decisions(eva(*common))
    woke = decisions(eva(*common, "--addressing-mode", "wake", "--addressing-wake-model",
                         str(wake_model), "--telemetry", f"file:{tel}"))
    # always: the command alone acts, the one after a 0.6 s pause is running speech
    assert [(d["label"], d["accepted"]) for d in always if d["accepted"]] == [("3", True)]
    assert [("wake" in d, "awake" in d) for d in always] == [(False, False)] * len(always)
    # wake: the two commands after the wake phrase act, the one alone does not
    assert [d["label"] for d in woke if d["accepted"]] == ["7", "7"]
    by_time = sorted(woke, key=lambda d: d["start"])
    assert [d.get("wake", False) for d in by_time] == [True, False, False, True, True]
    assert by_time[1]["accepted"] and "awake" not in by_time[1]   # the quiet-before waived
    assert by_time[2]["label"] == "3" and by_time[2]["awake"] is False
    assert not by_time[2]["accepted"]
    # one breath: the decision covers the command only, from the pause after the wake phrase
    assert truth[4]["end"] - 0.03 <= by_time[4]["start"] <= truth[5]["start"]
    stats = [m["payload"] for m in map(json.loads, tel.read_text().splitlines())
             if m["topic"].endswith("/stats")]
    from agent.fleet.schema import decode_stats

    for p in stats:
        STATS.validate(p)
        decode_stats(p)  # the fleet's contract takes a wake-mode device's windows too
    total = {k: sum(p["counts"][k] for p in stats)
             for k in ("wakes", "wake_commands", "wakes_unused")}
    assert total == {"wakes": 3, "wake_commands": 2, "wakes_unused": 1}
    assert sum(p["metrics"]["wake_score"]["count"] for p in stats) == 5
    assert sum(p["metrics"]["wake_latency_ms"]["count"] for p in stats) == 3


def test_always_mode_leaves_the_digit_model_outputs_as_they_were(tmp_path, wake_model):
    """A wake model configured but mode "always": exactly the decisions of the default run."""
    common = ["run", "--source", str(demo_audio()), "--decisions", "-", "--state-dir",
              str(tmp_path / "st")]
    plain = decisions(eva(*common))
    configured = decisions(eva(*common, "--addressing-wake-model", str(wake_model)))

    def strip(ds: list[dict]) -> list[dict]:
        return [{k: v for k, v in d.items() if k != "latency_ms"} for d in ds]

    assert strip(plain) == strip(configured) and sum(d["accepted"] for d in plain) >= 10
    assert not any("wake" in d or "awake" in d for d in plain)


def test_reload_switches_between_always_and_wake(tmp_path, wake_model, voice,
                                                 agents):  # noqa: F811
    three = voice["three"]
    stream = tmp_path / "s.wav"
    write_stream(stream, [("p", 1.0)] + [("3", three), ("p", 2.0)] * 12)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[addressing]\nmode = "wake"\nwake_model = "{wake_model}"\n')
    a = Agent(["--config", str(cfg), "--source", str(stream), "--speed", "4", "--state-dir",
               str(tmp_path / "st"), "--decisions", "-"], tmp_path)
    agents.append(a)
    a.until("READY=1")
    first = a.decision()
    assert first is not None and first["awake"] is False and not first["accepted"]
    cfg.write_text('[addressing]\nmode = "always"\n')
    a.proc.send_signal(signal.SIGHUP)
    line = a.log_line("reloaded at audio")
    assert "addressing always" in line
    at = float(line.split("reloaded at audio ")[1].split(" s")[0])
    assert a.finish() == 0
    before = [d for d in a.decisions if d["decided_at"] <= at]
    after = [d for d in a.decisions if d["decided_at"] > at]
    assert before and all(not d["accepted"] and d["awake"] is False for d in before)
    assert after and all(d["accepted"] and "awake" not in d for d in after)


def test_wake_config_errors_are_one_line_naming_the_fix(tmp_path, wake_model):
    run = ["run", "--source", str(demo_audio()), "--state-dir", str(tmp_path / "st")]
    r = eva(*run, "--addressing-mode", "wake")
    assert r.returncode == 2 and "addressing.wake_model" in error_line(r)
    # the settings are valid, the model directory is not: exit 1 like a bad command model
    r = eva(*run, "--addressing-mode", "wake", "--addressing-wake-model", str(tmp_path / "no"))
    assert r.returncode == 1 and "does not exist" in error_line(r)
    # the digit model is a model directory, not a wake model: eleven classes
    r = eva(*run, "--addressing-mode", "wake", "--addressing-wake-model",
            str(default_model_dir()))
    line = error_line(r)
    assert r.returncode == 1 and "[WORD, unknown]" in line and "--vocabulary WORD" in line
    # a command model whose words leave no room for the wake stage in the 8 KB payload
    from tests.rollout_models import derive

    wordy = derive(tmp_path / "wordy", classes=[f"{w}-long-enough-word" for w in
                                               ("alpha", "bravo", "charlie", "delta", "echo",
                                                "foxtrot", "golf", "hotel", "india", "juliet")])
    r = eva(*run, "--model", str(wordy), "--model-thresholds",
            str(wordy / "calibration" / "thresholds.json"), "--addressing-mode", "wake",
            "--addressing-wake-model", str(wake_model))
    line = error_line(r)
    assert r.returncode == 1 and "bytes of the stats payload" in line and "fewer or shorter" in line
    # a corrupt head
    bad = tmp_path / "bad"
    shutil.copytree(wake_model, bad)
    (bad / "head.onnx").write_bytes(b"not a graph")
    r = eva(*run, "--addressing-mode", "wake", "--addressing-wake-model", str(bad))
    line = error_line(r)
    assert r.returncode == 1 and f"wake model {bad}" in line and "corrupt" in line
    # a manifest that is not JSON
    (bad / MANIFEST).write_text("{")
    r = eva(*run, "--addressing-mode", "wake", "--addressing-wake-model", str(bad))
    assert r.returncode == 1 and "not valid JSON" in error_line(r)
    r = eva(*run, "--addressing-mode", "sometimes")
    assert r.returncode == 2 and "always, wake" in error_line(r)


def test_a_wake_phrase_inside_running_speech_is_no_wake_phrase(tmp_path, wake_model, voice):
    """Quiet before it, as for a command: "three jarvis seven" said as one run of speech (short
    pauses) wakes nothing; the same words with quiet before the wake phrase act."""
    w, seven, three = voice[WAKE_WORD], voice["seven"], voice["three"]
    stream = tmp_path / "s.wav"
    write_stream(stream, [("p", 1.5), ("3", three), ("p", 0.3), ("wake", w), ("p", 0.5),
                          ("7", seven), ("p", 4.0), ("3", three), ("p", 1.5), ("wake", w),
                          ("p", 0.5), ("7", seven), ("p", 2.0)])
    woke = decisions(eva("run", "--source", str(stream), "--decisions", "-", "--state-dir",
                         str(tmp_path / "st"), "--addressing-mode", "wake",
                         "--addressing-wake-model", str(wake_model)))
    heard = [d["start"] for d in woke if d.get("wake")]
    acted = [d["start"] for d in woke if d["accepted"]]
    assert len(heard) == 1 and heard[0] > 8.0   # only the wake phrase after 1.5 s of quiet
    assert len(acted) == 1 and acted[0] > heard[0] and woke[-1]["label"] == "7"
