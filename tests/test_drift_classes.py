"""Drift of the class distribution: each window's decisions per class (any vocabulary) scored
against the device baseline's with the same size-corrected JS distance as the histograms,
published and alarmed on only for windows with >= k decisions."""

from __future__ import annotations

import numpy as np

from agent.monitoring.drift import (
    DEFAULT_ALARMS,
    Baseline,
    DeviceBaselineLearner,
    class_drift,
    rules_from_config,
)
from agent.monitoring.monitor import Monitor
from agent.monitoring.privacy import find_violations
from agent.recognition.model import MANIFEST, Manifest
from agent.telemetry.message import Message
from tests.monitor_inputs import RATE, frames, outcome
from tests.rollout_models import derive

DIGITS = [*(str(i) for i in range(10)), "unknown"]
K = 20


def mix(main: str, labels: list[str], n: int) -> list[str]:
    """`n` decisions: mostly `main`, one of every other word, a few unknown."""
    others = [c for c in labels if c not in (main, "unknown")]
    out = others + ["unknown"] * 2
    return out + [main] * (n - len(out))


def run(labels: list[str], minutes: list[list[str]], monitor: Monitor | None = None
        ) -> tuple[list[dict], list[dict], Monitor]:
    """Feed one list of decisions per minute; returns (stats payloads, alarm payloads)."""
    rng = np.random.default_rng(0)
    messages: list[Message] = []
    mon = monitor or Monitor(
        emit=messages.append, device_id="dev-1", model_info={"name": "m"}, rate=RATE,
        window_s=60.0, k=K, learner=DeviceBaselineLearner(120.0, min_utterances=10,
                                                          meta={"labels": labels}),
        rules=rules_from_config(DEFAULT_ALARMS), unknown_label="unknown", labels=labels)
    if monitor is not None:
        mon.emit = messages.append
    t_base = mon.agg.window_start_s
    for minute, decisions in enumerate(minutes):
        t0 = t_base + minute * 60.0
        for i, label in enumerate(decisions):
            mon.on_outcome(outcome(t0 + 50.0 * i / len(decisions), rng, label=label))
        mon.on_block(t0 + 60, frames(t0, 60.0), 0)
    stats = [m.payload for m in messages if m.topic.endswith("/stats")]
    return stats, [m.payload for m in messages if m.topic.endswith("/alarm")], mon


def scores(stats: list[dict]) -> list[float | None]:
    return [p["drift"]["class_distribution"]["score"] for p in stats]


def test_a_shift_of_the_class_mix_raises_the_score_and_the_alarm():
    sevens, threes = mix("7", DIGITS, 30), mix("3", DIGITS, 30)
    stats, alarms, _ = run(DIGITS, [sevens, sevens, sevens, threes, threes, threes, threes])
    s = scores(stats)
    assert s[:2] == [None, None]  # no device baseline yet
    assert s[2] is not None and s[2] < 0.1  # the same mix as the baseline: about 0
    assert all(x is not None and x > 0.45 for x in s[3:]), s
    assert stats[3]["drift"]["class_distribution"]["baseline"] == "device"
    raised = [a for a in alarms if a["metric"] == "class_distribution"]
    assert [(a["state"], a["stage"], a["window_end_s"]) for a in raised] == \
        [("raised", "model", 360.0)]  # the default rule: three windows in a row
    assert "class_distribution JS distance" in raised[0]["reason"]
    assert stats[-1]["drift"]["class_distribution"]["state"] == "alarm"
    assert all(find_violations(p) == [] for p in stats + alarms)


def test_the_documented_figures():
    """The figures in docs/monitoring.md and at DEFAULT_ALARMS["class_distribution"]."""
    sevens = mix("7", DIGITS, 30)
    half = [c for c in sevens if c != "7"] + ["7"] * 10 + ["3"] * 9
    stats, _, _ = run(DIGITS, [sevens] * 3 + [half, mix("3", DIGITS, 30), ["unknown"] * 30])
    assert scores(stats)[2:] == [0.0, 0.0, 0.4995, 0.8477]
    assert DEFAULT_ALARMS["class_distribution"]["threshold"] == 0.4


def test_a_window_below_k_publishes_no_class_drift_and_raises_nothing():
    sevens = mix("7", DIGITS, 30)
    few_threes = ["3"] * (K - 1)  # below k decisions: the score would tell what was said
    stats, alarms, _ = run(DIGITS, [sevens, sevens] + [few_threes] * 4)
    assert stats[2]["outputs"]["suppressed"] is True
    for p in stats[2:]:
        assert p["drift"]["class_distribution"] == {"score": None, "baseline": None,
                                                    "state": "no_data"}
    assert [a for a in alarms if a["metric"] == "class_distribution"] == []
    # k decisions of the same mix is enough
    stats, _, _ = run(DIGITS, [sevens, sevens, ["3"] * K])
    assert stats[2]["drift"]["class_distribution"]["score"] > 0.45


def test_a_word_vocabulary_scores_the_same_way(tmp_path):
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    d = derive(tmp_path / "words", classes=words, name="words")
    labels = list(Manifest.read(d / MANIFEST).classes)
    assert set(labels) == {*words, "unknown"}
    to_word = dict(zip(DIGITS, [*words, "unknown"], strict=True))
    plan = [mix("7", DIGITS, 30)] * 3 + [mix("3", DIGITS, 30)] * 2 + [["3"] * 5]
    digit_stats, _, _ = run(DIGITS, plan)
    word_stats, word_alarms, _ = run(labels, [[to_word[c] for c in m] for m in plan])
    # the same counts in another class order and names: the same scores
    assert scores(word_stats) == scores(digit_stats)
    assert scores(word_stats)[3] > 0.45 and scores(word_stats)[5] is None
    assert all(find_violations(p) == [] for p in word_stats + word_alarms)


def test_a_baseline_for_another_vocabulary_is_discarded_after_a_model_switch(tmp_path):
    sevens = mix("7", DIGITS, 30)
    path = tmp_path / "device-baseline.json"
    _, _, mon = run(DIGITS, [sevens] * 2)
    learned = mon.learner.baseline
    assert learned is not None and learned.classes["7"] == 2 * sevens.count("7")
    learned.save(path)
    back = Baseline.load(path)
    assert back.classes == learned.classes and back.meta["labels"] == DIGITS

    words = ["yes", "no", "unknown"]
    # a restart with the word model: the digit baseline is not resumed, one line says why
    again = DeviceBaselineLearner.resume(path, 120.0, meta={"labels": DIGITS})
    assert again.frozen and again.note == "device baseline loaded"
    other = DeviceBaselineLearner.resume(path, 120.0, meta={"labels": words})
    assert not other.frozen
    assert other.note.startswith("relearning device baseline: learned for another vocabulary")
    assert "\n" not in other.note

    # a live switch: the digit counts no longer score words, and the monitor says so once
    note = mon.set_labels(words)
    assert "device baseline was counted for another vocabulary" in note and "\n" not in note
    assert mon.set_labels(DIGITS) == ""  # back to the vocabulary it was learned for
    mon.set_labels(words)
    stats, alarms, _ = run(words, [["yes"] * 30, ["no"] * 30], monitor=mon)
    assert scores(stats) == [None, None]
    assert [a for a in alarms if a["metric"] == "class_distribution"] == []


def test_class_drift_unit():
    b = Baseline("device", {}, {"labels": ["a", "b", "unknown"]}, {"a": 90, "b": 5,
                                                                   "unknown": 5})
    from agent.monitoring.windows import WindowSummary

    def window(classes: dict[str, int]) -> WindowSummary:
        n = sum(classes.values())
        return WindowSummary(0.0, 60.0, 60.0, {"utterances": n, "accepted": n}, classes, {})

    same = class_drift(window({"a": 27, "b": 2, "unknown": 1}), [b], ["a", "b", "unknown"],
                       k=20)
    moved = class_drift(window({"b": 28, "unknown": 2}), [b], ["a", "b", "unknown"], k=20)
    assert same is not None and same.score == 0.0 and same.n == 30
    assert moved is not None and moved.score > 0.8 and moved.baseline == "device"
    assert class_drift(window({"b": 19}), [b], ["a", "b", "unknown"], k=20) is None
    # another vocabulary: no baseline scores it
    other = class_drift(window({"x": 30}), [b], ["x", "y", "unknown"], k=20)
    assert other is not None and other.score is None and other.by_baseline == {}


def test_the_fleet_takes_and_exports_the_class_drift_score():
    from agent.fleet.exporter import exposition
    from agent.fleet.ingest import FleetModel
    from agent.fleet.schema import check_stats, decode_stats
    from agent.monitoring.payloads import payload_bytes

    sevens, threes = mix("7", DIGITS, 30), mix("3", DIGITS, 30)
    stats, _, _ = run(DIGITS, [sevens, sevens, sevens, threes])
    score = stats[-1]["drift"]["class_distribution"]["score"]
    body = payload_bytes(stats[-1])
    p = decode_stats(body)  # the bounded wire contract
    check_stats(p, "dev-1")
    assert p["drift"]["class_distribution"]["score"] == score
    model = FleetModel()
    model.ingest("eva/dev-1/stats", body)
    text = exposition(model).decode()
    assert f'eva_device_drift_score{{device="dev-1",metric="class_distribution"}} {score}' in text
    assert 'eva_metric_info{metric="class_distribution",stage="model"' in text
