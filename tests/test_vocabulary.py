"""Any vocabulary on the device: a model whose classes are words, end to end.

The word model is the bundled digit model relabelled (tests/rollout_models.py `derive(classes=)`):
its head's outputs map one to one onto the words, so on the same audio it must decide exactly
what the digit model decides, under the other names — anything on the device that still
assumed digits shows up as a difference. Through `run` (decisions, actions keyed by a word,
telemetry), `classify`, the stats payload (docs/stats.schema.json, the privacy rules), and the
fleet's contract and merge.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
from jsonschema import Draft202012Validator

from agent.errors import AgentError
from agent.monitoring.privacy import find_violations
from agent.recognition.model import MANIFEST, Manifest
from agent.recognition.vocabulary import MAX_CLASSES, parse_words, vocabulary_problem, word_problem
from agent.resources import default_model_dir, demo_audio, demo_truth
from tests.conftest import ROOT, eva
from tests.rollout_models import derive
from tests.test_actions import recorder, runs, toml_argv

WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
DIGITS = tuple(str(i) for i in range(10))
TO_WORD = dict(zip(DIGITS, WORDS, strict=True))
STATS = Draft202012Validator(json.loads((ROOT / "docs" / "stats.schema.json").read_text()))


@pytest.fixture(scope="module")
def words_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return derive(tmp_path_factory.mktemp("vocab") / "commands", classes=WORDS,
                  name="commands", version="1.0.0")


def _run(tmp: Path, *extra: str) -> tuple[list[dict], list[dict]]:
    tel = tmp / "tel.jsonl"
    r = eva("run", "--source", str(demo_audio()), "--decisions", "-", "--state-dir",
            str(tmp / "state"), "--telemetry", f"file:{tel}", "--window", "600",
            "--monitoring-k", "5", "--device-id", "dev-1", "--log-level", "WARNING", *extra,
            timeout=120)
    assert r.returncode == 0, r.stderr
    msgs = [json.loads(x) for x in tel.read_text().splitlines()]
    return [json.loads(x) for x in r.stdout.splitlines()], msgs


@pytest.fixture(scope="module")
def digit_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], list[dict]]:
    return _run(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def words_run(words_model: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[list[dict], list[dict], Path]:
    tmp = tmp_path_factory.mktemp("words")
    out = tmp / "runs"  # one file per word: actions of different words run concurrently
    out.mkdir()
    cfg = tmp / "c.toml"
    cfg.write_text("[actions]\n" + "".join(f'"{w}" = {toml_argv(recorder(out / w, w))}\n'
                                          for w in WORDS[:5]))
    decisions, msgs = _run(tmp, "--config", str(cfg), "--model", str(words_model),
                           "--model-thresholds", str(words_model / "calibration" /
                                                     "thresholds.json"))
    return decisions, msgs, out


def test_the_word_rule() -> None:
    for ok in ("yes", "turn on", "wi-fi", "7", "unknown", "a" * 24, "v1.2"):
        assert word_problem(ok) is None, ok
    for bad in ("", "Yes", "turn_on", "turn  on", " on", "on ", "-on", "caf\u00e9", "a" * 25,
                "on\n", "a/b", 7):
        assert word_problem(bad) is not None, bad
    assert parse_words("yes, no,turn on") == ["yes", "no", "turn on"]
    with pytest.raises(ValueError, match="'Stop' is not a vocabulary word"):
        parse_words("go,Stop")
    with pytest.raises(ValueError, match="listed twice"):
        parse_words("go,stop,go")
    with pytest.raises(ValueError, match="open-set class"):
        parse_words("go,unknown")
    assert "at most" in vocabulary_problem([f"w{i}" for i in range(MAX_CLASSES + 1)])
    assert "not one of its classes" in vocabulary_problem(["yes", "no"], "unknown")


def test_a_manifest_with_a_word_outside_the_rule_is_one_line(tmp_path: Path) -> None:
    d = json.loads((default_model_dir() / MANIFEST).read_text())
    d["classes"] = ["lights_on", *d["classes"][1:]]
    (tmp_path / MANIFEST).write_text(json.dumps(d))
    with pytest.raises(AgentError) as e:
        Manifest.read(tmp_path / MANIFEST)
    assert "'lights_on' is not a vocabulary word" in str(e.value) and "\n" not in str(e.value)
    r = eva("classify", "--model", str(tmp_path), str(demo_audio()))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "lights_on" in r.stderr


def test_run_decides_the_same_under_other_names_and_acts_on_words(digit_run, words_run):
    digits, _ = digit_run
    words, _, out = words_run
    assert len(words) == len(digits) == len(json.loads(demo_truth().read_text())["utterances"])
    for d, w in zip(digits, words, strict=True):
        assert w["label"] == TO_WORD.get(d["label"], d["label"])
        assert (w["accepted"], w["confidence"], w["start"]) == \
            (d["accepted"], d["confidence"], d["start"])
        assert w["model"] == "commands@1.0.0"
    acted = [d for d in words if d["accepted"]]
    keyed = [d for d in acted if d["label"] in WORDS[:5]]
    assert keyed, "the demo accepts at least one of the words that have an action"
    got = [r for w in WORDS[:5] for r in runs(out / w)]
    assert sorted(d["decided_at"] for *_, d in got) == [d["decided_at"] for d in keyed]
    for tag, label, _conf, model, d in got:
        assert tag == label == d["label"] and model == "commands@1.0.0"


def test_monitoring_and_payloads_carry_the_words(digit_run, words_run) -> None:
    from agent.fleet.schema import check_stats, decode_stats

    _, dmsgs = digit_run
    _, wmsgs, _ = words_run
    stats = [m["payload"] for m in wmsgs if m["topic"] == "eva/dev-1/stats"]
    dstats = [m["payload"] for m in dmsgs if m["topic"] == "eva/dev-1/stats"]
    assert len(stats) == len(dstats) == 1
    p, q = stats[0], dstats[0]
    assert not p["outputs"]["suppressed"]
    assert p["outputs"]["classes"] == {TO_WORD.get(k, k): v
                                       for k, v in q["outputs"]["classes"].items()}
    assert set(p["outputs"]["classes"]) <= {*WORDS, "unknown"}
    # everything else the window says is the same: nothing in monitoring knew digits
    for key in ("counts", "estimated_accuracy"):
        assert p[key] == q[key], key
    same = {k: v for k, v in p["metrics"].items() if v["stage"] != "system"}  # not timings
    assert len(same) >= 10 and same == {k: q["metrics"][k] for k in same}
    assert p["model"]["name"] == "commands"
    STATS.validate(p)
    assert find_violations(p, k=5) == []
    check_stats(decode_stats(json.dumps(p).encode()), "dev-1")
    # and below k the words are withheld like digits
    r = json.loads(json.dumps(p))
    r["counts"]["utterances"] = 4
    assert find_violations(r, k=5)


def test_the_fleet_merges_a_word_vocabulary_and_refuses_a_word_outside_the_rule(words_run):
    from agent.fleet import exporter
    from agent.fleet.ingest import FleetModel
    from agent.fleet.state import FleetState

    _, msgs, _ = words_run
    stats = next(m["payload"] for m in msgs if m["topic"] == "eva/dev-1/stats")
    body = json.dumps(stats).encode()
    st, model = FleetState(), FleetModel()
    assert st.ingest("eva/dev-1/stats", body) == "stats"
    assert model.ingest("eva/dev-1/stats", body) == "stats"
    dev = st.to_json()["devices"]["dev-1"]
    assert dev["model"]["name"] == "commands" and dev["windows"] == 1
    assert dev["counts"]["utterances"] == stats["counts"]["utterances"]
    assert b'model="commands"' in exporter.exposition(model)
    bad = json.loads(body)
    bad["seq"] += 1
    bad["outputs"]["classes"] = {"Lights_On": 20}
    assert STATS.is_valid(bad) is False
    assert st.ingest("eva/dev-1/stats", json.dumps(bad).encode()) == "schema"


def test_classify_prints_words(words_model: Path, tmp_path: Path) -> None:
    x, sr = sf.read(str(demo_audio()), dtype="float32")
    truth = json.loads(demo_truth().read_text())["utterances"]
    files = []
    for i, u in enumerate(truth[:6]):
        p = tmp_path / f"u{i}.wav"
        sf.write(str(p), x[int(u["start"] * sr):int(u["end"] * sr)], sr)
        files.append(str(p))
    r = eva("classify", "--model", str(words_model), "--model-thresholds",
            str(words_model / "calibration" / "thresholds.json"), *files)
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["file"] for o in out] == files
    assert {o["label"] for o in out} <= {*WORDS, "unknown"}
    right = [o for o, u in zip(out, truth, strict=False) if o["accepted"]]
    assert right and all(o["label"] == TO_WORD[u["digit"]]
                         for o, u in zip(out, truth, strict=False) if o["accepted"])


def test_review_samples_are_labelled_with_words(tmp_path: Path) -> None:
    import numpy as np

    from agent.monitoring.samples import EXPORT_README, SampleStore, training_folder

    main = tmp_path / "main"
    main.mkdir()
    sf.write(main / "yes_jackson_0.wav", np.zeros(1600, np.float32), 16000)
    store = SampleStore(tmp_path / "state")
    for _ in range(3):
        store.save(np.zeros(1600, np.float32), 16000, {"reason": "abstained",
                                                       "device_label": "up"})
    out = tmp_path / "export"
    store.export(out, "kitchen")
    assert "up_kitchen_0.wav" in (out / EXPORT_README).read_text()
    (out / "kitchen-0.wav").rename(out / "turn on_kitchen_0.wav")
    (out / "kitchen-1.wav").rename(out / "Up_kitchen_1.wav")  # not a vocabulary word: skipped
    folder = training_folder([main, out], root=tmp_path / "cache")
    assert sorted(p.name for p in folder.iterdir()) == ["turn on_field_0.wav",
                                                       "yes_jackson_0.wav"]


def test_enrollment_takes_word_files_for_a_word_model(words_model: Path, tmp_path: Path,
                                                      capsys) -> None:
    """`{word}_{anything}.wav` for each word of the model; a digit name is refused in one
    line naming the model's words; enrollment changes classify, forget restores it."""
    from agent import cli

    x, sr = sf.read(str(demo_audio()), dtype="float32")
    first, rest, seen = [], [], set()
    for i, u in enumerate(json.loads(demo_truth().read_text())["utterances"]):
        a = x[max(0, int((u["start"] - 0.25) * sr)):int((u["end"] + 0.25) * sr)]
        word = TO_WORD[u["digit"]]
        path = tmp_path / f"{word}_{'enroll' if word not in seen else 'again'}_{i}.wav"
        (first if word not in seen else rest).append(path)
        seen.add(word)
        sf.write(str(path), a, sr, subtype="PCM_16")
    state = tmp_path / "state"
    model = ["--model", str(words_model), "--model-thresholds",
             str(words_model / "calibration" / "thresholds.json")]

    def classify() -> list[dict]:
        assert cli.main(["classify", "--log-level", "WARNING", "--state-dir", str(state),
                         *model, *map(str, first + rest)]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    plain = classify()
    digit_named = tmp_path / "7_enroll_0.wav"
    digit_named.write_bytes(first[0].read_bytes())
    assert cli.main(["enroll", "--state-dir", str(state), *model, str(digit_named),
                     *map(str, first[1:])]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "7_enroll_0.wav" in err and "yes, no, up" in err
    assert cli.main(["enroll", "--log-level", "WARNING", "--state-dir", str(state), *model,
                     *map(str, first)]) == 0
    assert "enrolled 10 recordings of 10 classes for commands@1.0.0" in capsys.readouterr().out
    enrolled = classify()
    assert enrolled != plain and {d["label"] for d in enrolled} <= {*WORDS, "unknown"}
    assert cli.main(["enroll", "--forget", "--state-dir", str(state)]) == 0
    capsys.readouterr()
    assert classify() == plain


def test_the_actions_table_is_checked_against_the_model_words() -> None:
    from agent.actions.table import check, parse
    from agent.errors import ConfigError

    table = parse({"up": ["/bin/true"], "lights": ["/bin/true"], "*": ["/bin/true"]})
    warnings = check(table, (*WORDS, "unknown"))
    assert len(warnings) == 1 and "'lights'" in warnings[0] and "no such class" in warnings[0]
    assert table.match("up").key == "up" and table.match("down").key == "*"
    with pytest.raises(ConfigError) as e:
        parse({"Lights": ["/bin/true"]})
    assert "'Lights' is not a vocabulary word" in str(e.value) and "\n" not in str(e.value)


def worst_payload_bytes(names: list[str], wake_stage: bool = False) -> int:
    """The schema-valid stats payload of a window with every bin of every metric filled, a
    year-long boot and these class names, in bytes."""
    from agent.monitoring.payloads import SinceBoot, payload_bytes, stats_payload
    from tests.test_privacy_payloads import ANCHOR, MODEL, PROCESS, _drift_all, _full_summary

    s = _full_summary(classes=len(names), utterances=400)
    s.classes = {w: 16 for w in names}
    year = dict(zip(SinceBoot.FIELDS, (525_600, 3_153_600_000, 1_500_000_000, 9_999_999,
                                       9_000_000, 999_999, 99_999_999), strict=True))
    p = stats_payload(s, _drift_all(), utc_anchor=ANCHOR, model=MODEL, process=PROCESS,
                      historical=True, active_alarms={"snr_db"}, device_id="d" * 64,
                      boot_id="b" * 64, seq=123456789, since_boot=year, wake_stage=wake_stage)
    STATS.validate(p)
    return len(payload_bytes(p))


def test_the_largest_vocabulary_keeps_the_worst_stats_payload_within_8_kb() -> None:
    from agent.monitoring.payloads import MAX_PAYLOAD_BYTES
    from agent.recognition.vocabulary import MAX_WORD, MAX_WORDS

    words = [f"w{i:02d}".ljust(MAX_WORD, "x") for i in range(MAX_WORDS)]
    assert vocabulary_problem([*words, "unknown"], "unknown") is None
    assert worst_payload_bytes([*words, "unknown"]) <= MAX_PAYLOAD_BYTES


def test_wake_mode_keeps_the_worst_stats_payload_within_8_kb_for_words_within_budget() -> None:
    """Beside the wake stage only WAKE_CLASS_NAMES_BUDGET bytes of names fit: a vocabulary at
    the budget fits, and one that does not is refused at start (test_wake)."""
    from agent.monitoring.payloads import (
        MAX_PAYLOAD_BYTES,
        WAKE_CLASS_NAMES_BUDGET,
        class_names_bytes,
    )
    from agent.recognition.vocabulary import MAX_WORD, MAX_WORDS

    def worst(names: list[str]) -> int:
        return worst_payload_bytes(names, wake_stage=True)

    # the fullest vocabulary the word rule allows would not fit beside the wake stage
    longest = [f"w{i:02d}".ljust(MAX_WORD, "x") for i in range(MAX_WORDS)] + ["unknown"]
    assert class_names_bytes(longest) > WAKE_CLASS_NAMES_BUDGET
    assert worst(longest) > MAX_PAYLOAD_BYTES
    # names filling the budget exactly (many short words, or fewer long ones) fit
    for length in (2, 8, 24):
        names = ["unknown"]
        while True:
            nxt = f"{len(names):02d}".ljust(length, "x")
            if (len(names) > MAX_WORDS
                    or class_names_bytes([*names, nxt]) > WAKE_CLASS_NAMES_BUDGET):
                break
            names.append(nxt)
        assert worst(names) <= MAX_PAYLOAD_BYTES, (length, len(names))
