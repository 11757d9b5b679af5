"""On-device monitoring end to end: the agent on streams from the shared tools, `--window 10`,
telemetry to a file, every payload checked against the schemas and the privacy rules."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import soundfile as sf

from agent.monitoring.privacy import find_violations
from tests.conftest import ROOT, eva

# A model trained without theo (tests/data/no-theo, made by `edge-voice-agent train --speakers
# jackson,nicolas,yweweler,lucas`), so streams of theo's voice are a voice it never heard.
HELD_OUT = "theo"
NO_THEO = ROOT / "tests" / "data" / "no-theo"
HELD_OUT_MODEL = ("--model", str(NO_THEO / "model"), "--model-thresholds",
                  str(NO_THEO / "calibration" / "thresholds.json"), "--monitoring-baseline",
                  str(NO_THEO / "calibration" / "baseline.json"))
SCHEMAS = {kind: json.loads((ROOT / "docs" / f"{kind}.schema.json").read_text())
           for kind in ("stats", "alarm")}
VOLATILE = ("boot_id", "process", "config_digest")  # differ between runs by nature


def run_agent(tmp: Path, wav: Path, *extra: str) -> tuple[list[dict], list[dict]]:
    """Run the agent on `wav`; return (telemetry messages, decisions)."""
    tel, dec = tmp / "telemetry.jsonl", tmp / "decisions.jsonl"
    r = eva("run", "--source", str(wav), "--decisions", str(dec), "--telemetry", f"file:{tel}",
            "--window", "10", "--state-dir", str(tmp / "state"), "--device-id", "dev-1",
            "--log-level", "WARNING", *extra, timeout=300)
    assert r.returncode == 0, r.stderr
    msgs = [json.loads(x) for x in tel.read_text().splitlines()]
    for m in msgs:
        check_payload(m)
    return msgs, [json.loads(x) for x in dec.read_text().splitlines()]


def check_payload(m: dict) -> None:
    kind = m["topic"].rsplit("/", 1)[1]
    assert m["topic"].startswith("eva/dev-1/")
    size = len(json.dumps(m["payload"], separators=(",", ":")).encode())
    assert size <= 8192, f"{kind} payload is {size} bytes"
    if kind in SCHEMAS:
        jsonschema.validate(m["payload"], SCHEMAS[kind])
        assert find_violations(m["payload"]) == [], m["payload"]


def of(msgs: list[dict], kind: str) -> list[dict]:
    return [m["payload"] for m in msgs if m["topic"].endswith("/" + kind)]


@pytest.fixture(scope="module")
def stable(make_stream, tmp_path_factory):
    stream = make_stream(speakers=HELD_OUT, seconds=300, seed=21)
    msgs, decisions = run_agent(tmp_path_factory.mktemp("stable"), stream.with_suffix(".wav"),
                                *HELD_OUT_MODEL)
    return stream, msgs, decisions


@pytest.fixture(scope="module")
def drift(make_stream, tmp_path_factory):
    stream = make_stream(speakers=HELD_OUT, seconds=300, drift_at=240, seed=22)
    return run_agent(tmp_path_factory.mktemp("drift"), stream.with_suffix(".wav"),
                     *HELD_OUT_MODEL)


@pytest.mark.slow
def test_stable_stream_raises_no_alarm(stable):
    _, msgs, _ = stable
    stats = of(msgs, "stats")
    assert len(stats) == 30
    assert [s["seq"] for s in stats] == sorted(s["seq"] for s in stats)
    assert of(msgs, "alarm") == []
    assert all(v["state"] != "alarm" for s in stats for v in s["drift"].values())


@pytest.mark.slow
def test_drift_raises_an_input_alarm_within_60_s_and_stats_show_it(drift):
    msgs, _ = drift
    alarms = [a for a in of(msgs, "alarm") if a["state"] == "raised"]
    audio = [a for a in alarms if a["stage"] == "audio"]
    assert audio, alarms
    first = min(a["window_end_s"] for a in audio)
    assert 240 < first <= 300, first
    assert all(a["window_end_s"] > 240 for a in alarms), "nothing raised before the onset"

    stats = of(msgs, "stats")
    before = [s for s in stats if s["window"]["end_s"] <= 240]
    after = [s for s in stats if s["window"]["start_s"] >= 250]

    def pooled(ws, metric):
        vals = [(w["metrics"][metric]["mean"], w["metrics"][metric]["count"]) for w in ws
                if w["metrics"][metric]["mean"] is not None]
        return sum(v * n for v, n in vals) / sum(n for _, n in vals)

    def abstain_rate(ws):
        a = sum(w["counts"]["abstained"] for w in ws)
        return a / max(1, a + sum(w["counts"]["accepted"] for w in ws))

    def est_acc(ws):
        vals = [(w["estimated_accuracy"]["value"], w["estimated_accuracy"]["n"]) for w in ws
                if w["estimated_accuracy"]["value"] is not None]
        return sum(v * n for v, n in vals) / sum(n for _, n in vals)

    assert pooled(after, "input_rms_dbfs") < pooled(before, "input_rms_dbfs") - 6
    assert pooled(after, "snr_db") < pooled(before, "snr_db") - 6
    assert pooled(after, "noise_floor_dbfs") > pooled(before, "noise_floor_dbfs") + 1
    assert abstain_rate(after) > abstain_rate(before) + 0.1
    assert est_acc(after) < est_acc(before) - 0.05
    assert max(s["drift"]["snr_db"]["score"] or 0 for s in after) > 0.3


@pytest.mark.slow
def test_estimated_accuracy_tracks_measured_accuracy(stable):
    stream, msgs, decisions = stable
    stats = of(msgs, "stats")
    est = [(s["estimated_accuracy"]["value"], s["estimated_accuracy"]["n"]) for s in stats
           if s["estimated_accuracy"]["value"] is not None]
    estimated = sum(v * n for v, n in est) / sum(n for _, n in est)
    truth = json.loads(stream.with_suffix(".truth.json").read_text())["utterances"]
    right = 0
    for d in decisions:  # each decision against the true utterance it overlaps most
        best = max(truth, key=lambda u: min(d["end"], u["end"]) - max(d["start"], u["start"]))
        right += d["label"] == best["digit"]
    measured = right / len(decisions)
    assert abs(estimated - measured) <= 0.05, (estimated, measured)


def test_block_size_does_not_change_the_telemetry(tmp_path):
    """One clock: windows are cut by sample position, so any read size gives the same stats."""
    from agent.resources import demo_audio

    def strip(msgs):
        """Drop what differs between runs by nature: wall-clock anchors, boot, process and
        compute-time measurements. Everything on the audio clock must be equal."""
        out = []
        for m in msgs:
            p = {k: v for k, v in m["payload"].items() if k not in VOLATILE}
            if "window" in p:
                p["window"] = {k: p["window"][k] for k in ("start_s", "end_s")}
                p["metrics"] = {k: v for k, v in p["metrics"].items()
                                if k != "compute_latency_ms"}
                p["drift"] = {k: v for k, v in p["drift"].items() if k != "compute_latency_ms"}
            out.append(p)
        return out

    a, _ = run_agent(tmp_path / "a", demo_audio(), "--audio-block-ms", "30")
    b, _ = run_agent(tmp_path / "b", demo_audio(), "--audio-block-ms", "700")
    assert strip(a) == strip(b)
    stats = of(a, "stats")
    assert sum(s["counts"]["frames"] for s in stats) == int(21.521 * 16000) // 480


@pytest.mark.slow
def test_a_pin_spoken_in_a_quiet_minute_cannot_be_read(tmp_path, fsdd):
    """Four digits in one quiet minute: the class counts are withheld (k = 20), no per-utterance
    value is published, and the payloads do not change with which digits were said."""
    rng = np.random.default_rng(5)

    def minute(pin: str) -> Path:
        x = (rng.standard_normal(60 * 8000) * 10 ** (-60 / 20)).astype(np.float32)
        for i, digit in enumerate(pin):
            clip, _ = sf.read(str(fsdd / f"{digit}_theo_{i}.wav"), dtype="float32")
            at = (8 + 12 * i) * 8000
            x[at:at + len(clip)] += clip
        p = tmp_path / f"pin-{pin}.wav"
        sf.write(str(p), x, 8000, subtype="PCM_16")
        return p

    outs = {}
    for pin in ("7391", "2580"):
        msgs, decisions = run_agent(tmp_path / pin, minute(pin), "--window", "60")
        assert len(decisions) == 4  # the agent heard all four, locally
        stats = of(msgs, "stats")
        assert len(stats) == 1
        s = stats[0]
        assert s["counts"]["utterances"] == 4
        assert s["outputs"] == {"classes": None, "suppressed": True}
        blob = json.dumps(msgs)
        assert pin not in blob
        for name, m in s["metrics"].items():
            if m["count"] and m["count"] < 20 and name in (
                    "confidence", "margin", "utterance_length_s", "input_rms_dbfs"):
                assert m["hist"] == [] and m["min"] is None and m["max"] is None
        outs[pin] = s
    # what leaves the device has the same shape whichever PIN was spoken
    assert outs["7391"]["outputs"] == outs["2580"]["outputs"]
    assert outs["7391"]["counts"]["utterances"] == outs["2580"]["counts"]["utterances"]
