#!/usr/bin/env python3
"""Issue 19's targets on a drift stream: a bad candidate is rolled back within 3 windows and
stays rolled back across 3 restarts, a good one is committed, no committed build had a
breaching window, and the fleet side counts no false "missing" message over the rollout.

    python benchmarks/bench_rollout.py [--minutes 15] [--drift-at 120] [--shared ../shared] [--json]

One stream from ../shared/eval/make_stream.py (all FSDD speakers, seed 7, a muffled microphone
and steady noise from --drift-at on), the agent's default rollout settings and 60 s windows.
Four candidates derived from the bundled model, each delivered and activated on a fresh device
state: `good` (the same model under a new version), `abstainer` (abstains on everything),
`strict` (threshold edited to 0.999, the issue's bad build), `loose` (threshold edited to 0.10:
accepts too much). Each device runs the stream once, and a rolled-back one three more times (a
restart each). Every telemetry message of every boot goes through the fleet's own merge
(agent.fleet.state.FleetState) to count missing messages.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WINDOW_S = 60
RESTARTS = 3


def make_stream(shared: Path, minutes: float, drift_at: float, tmp: Path) -> Path:
    out = tmp / "drift"
    subprocess.run([sys.executable, str(shared / "eval" / "make_stream.py"), "--clips",
                    str(shared / "data" / "fsdd" / "recordings"), "--seconds",
                    str(minutes * 60), "--drift-at", str(drift_at), "--seed", "7", "--out",
                    str(out)], check=True, capture_output=True)
    return out.with_suffix(".wav")


def deliver(state: Path, src: Path) -> str:
    from agent.recognition.model import MANIFEST, Manifest
    from agent.rollout.bundle import bundle_digest
    from agent.rollout.command import RolloutCommand

    m = Manifest.read(src / MANIFEST)
    (state / "inbox").mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, state / "inbox" / m.ref)
    c = RolloutCommand("r-bench", m.name, m.version, bundle_digest(src), 100.0, "activate")
    (state / "models").mkdir(parents=True, exist_ok=True)
    (state / "models" / "rollout.json").write_text(json.dumps(c.to_payload()))
    return m.ref


def boot(wav: Path, state: Path, out: Path) -> tuple[list[dict], list[dict]]:
    out.mkdir(parents=True)
    tel, dec = out / "telemetry.jsonl", out / "decisions.jsonl"
    subprocess.run([sys.executable, "-m", "agent", "run", "--source", str(wav), "--decisions",
                    str(dec), "--telemetry", f"file:{tel}", "--window", str(WINDOW_S),
                    "--state-dir", str(state), "--device-id", "bench-1", "--log-level",
                    "WARNING"], check=True, cwd=ROOT, timeout=1800)
    return ([json.loads(x) for x in tel.read_text().splitlines()],
            [json.loads(x) for x in dec.read_text().splitlines()])


def main() -> None:
    from agent.fleet.state import FleetState
    from benchmarks.bench_pipeline import stream_bench_args
    from tests.rollout_models import derive

    a = stream_bench_args(__doc__, 15, drift_at=120)
    tmp = Path(tempfile.mkdtemp(prefix="eva-bench-rollout-"))
    wav = make_stream(a.shared, a.minutes, a.drift_at, tmp)
    builds = {"good": {}, "abstainer": {"behaviour": "abstain"}, "strict": {"threshold": 0.999},
              "loose": {"threshold": 0.10}}
    res: dict = {"minutes": a.minutes, "drift_at_s": a.drift_at, "window_s": WINDOW_S}
    for i, (name, kw) in enumerate(builds.items()):
        state = tmp / name / "state"
        ref = deliver(state, derive(tmp / name / "model", version=f"9.9.{i}-{name}", **kw))
        fleet = FleetState()
        msgs, _ = boot(wav, state, tmp / name / "boot0")
        runs = [msgs]
        events = [m["payload"] for m in msgs if m["topic"].endswith("/event")]
        names = [e["event"] for e in events]
        stats = [m["payload"] for m in msgs if m["topic"].endswith("/stats")]
        r = {"outcome": "committed" if "probation_passed" in names else
             "rolled_back" if "rolled_back" in names else "undecided",
             "windows_on_probation": sum(s["rollout"]["state"] == "probation" for s in stats),
             "reason": next((e["reason"] for e in events
                             if e["event"] in ("probation_passed", "rolled_back")), "")}
        if r["outcome"] == "rolled_back":
            reactivated = 0
            candidate_decisions = 0
            for k in range(1, RESTARTS + 1):
                msgs, decisions = boot(wav, state, tmp / name / f"boot{k}")
                runs.append(msgs)
                reactivated += sum(m["payload"]["event"] == "activated" for m in msgs
                                   if m["topic"].endswith("/event"))
                candidate_decisions += sum(d["model"] == ref for d in decisions)
            r["restarts"] = RESTARTS
            r["reactivations_after_restarts"] = reactivated
            r["candidate_decisions_after_restarts"] = candidate_decisions
        for msgs in runs:
            for m in msgs:
                fleet.ingest(m["topic"], json.dumps(m["payload"]).encode(),
                             m["topic"].endswith("/birth"))
        r["fleet_missing"] = fleet.to_json()["fleet"]["missing"]
        res[name] = r
    if a.json:
        print(json.dumps(res, indent=1))
        return
    print(f"drift stream: {a.minutes:g} min (drift from {a.drift_at:g} s), {WINDOW_S} s windows, "
          "default rollout settings")
    for name in builds:
        r = res[name]
        extra = ""
        if "restarts" in r:
            extra = (f"; after {r['restarts']} restarts: {r['reactivations_after_restarts']} "
                     f"re-activations, {r['candidate_decisions_after_restarts']} decisions by it")
        print(f"  {name:9s} {r['outcome']:11s} probation windows {r['windows_on_probation']}; "
              f"missing {r['fleet_missing']}{extra}\n            {r['reason']}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
