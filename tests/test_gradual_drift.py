"""Gradual drift: a population of voices the model is less sure of arrives slowly. No single
window looks odd against the device baseline learned on the same population, but the hourly
roll-up, scored against the training baseline, raises an alarm."""

from __future__ import annotations

import numpy as np

from agent.monitoring.drift import (
    DEFAULT_ALARMS,
    DEFAULT_ROLLUP_ALARMS,
    Baseline,
    DeviceBaselineLearner,
    rules_from_config,
)
from agent.monitoring.metric_catalog import BY_NAME
from agent.monitoring.monitor import Monitor
from agent.monitoring.windows import Histogram
from agent.telemetry.message import Message
from tests.monitor_inputs import RATE, frames, outcome


def run_hour(population_mean: float) -> list[dict]:
    rng = np.random.default_rng(0)
    training = {m: Histogram.for_metric(BY_NAME[m]) for m in ("confidence", "digit_confidence")}
    for h in training.values():
        h.add(np.clip(rng.normal(0.93, 0.04, 5000), 0, 1))
    messages: list[Message] = []
    mon = Monitor(emit=messages.append, device_id="dev-1", model_info={"name": "m"}, rate=RATE,
                  window_s=60.0, baselines=[Baseline("training", training, {})],
                  learner=DeviceBaselineLearner(120.0, min_utterances=10),
                  rules=rules_from_config(DEFAULT_ALARMS),
                  rollup_rules=rules_from_config(DEFAULT_ROLLUP_ALARMS), unknown_label="unknown")
    for minute in range(61):  # 20 utterances a minute, all from the new, less certain voices
        t0 = minute * 60.0
        for i in range(20):
            c = float(np.clip(rng.normal(population_mean, 0.05), 0, 1))
            mon.on_outcome(outcome(t0 + 3 * i, rng, confidence=c))
        mon.on_block(t0 + 60, frames(t0, 60.0), 0)
    return [m.payload for m in messages if m.topic.endswith("/alarm")]


def test_slow_population_change_is_caught_by_the_hourly_roll_up():
    alarms = run_hour(0.80)
    window_alarms = [a for a in alarms if "roll-up" not in a["reason"]]
    rollup = [a for a in alarms if a["reason"].startswith("hourly roll-up")]
    assert window_alarms == [], "no single window differs from the device's own baseline"
    assert [(a["metric"], a["state"], a["window_end_s"]) for a in rollup] == \
        [("confidence", "raised", 3600.0)]
    assert "training baseline" in rollup[0]["reason"]


def test_the_training_population_itself_raises_nothing():
    assert run_hour(0.93) == []
