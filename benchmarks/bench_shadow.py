#!/usr/bin/env python3
"""What a shadow candidate costs the device: peak RSS, wall time, active-path latency.

    python benchmarks/bench_shadow.py [--minutes 10] [--shared ../shared] [--json]

Runs `edge-voice-agent run` on one stream (one core, best of 3 each) three ways:
  plain:     no rollout
  same-fe:   shadowing a copy of the bundled model under another version (for a model whose
             front-end components have the same sha256 the sessions are shared)
  abstainer: shadowing a candidate derived from the bundled model that abstains on everything
and prints peak RSS (budget: the daemon's 100 MiB), CPU time (less sensitive than wall time
to other processes), real-time factor, the active decisions'
compute latency p95 (must not move: the shadow runs after the decisions are written) and the
shadow's own latency from the stats payloads.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_pipeline import make_bench_stream, stream_bench_args, timed  # noqa: E402


def deliver(state: Path, src: Path, rollout_id: str) -> None:
    from agent.recognition.model import MANIFEST, Manifest
    from agent.rollout.bundle import bundle_digest
    from agent.rollout.command import RolloutCommand

    m = Manifest.read(src / MANIFEST)
    (state / "inbox").mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, state / "inbox" / m.ref)
    c = RolloutCommand(rollout_id, m.name, m.version, bundle_digest(src), 100.0, "shadow")
    (state / "models").mkdir(parents=True, exist_ok=True)
    (state / "models" / "rollout.json").write_text(json.dumps(c.to_payload()))


def main() -> None:
    from tests.rollout_models import derive

    a = stream_bench_args(__doc__, 10)
    tmp = Path(tempfile.mkdtemp(prefix="eva-bench-shadow-"))
    wav = make_bench_stream(a.shared, a.minutes, tmp)
    audio_s = a.minutes * 60
    cands = {"same-fe": derive(tmp / "same", version="9.9.0-bench"),
             "abstainer": derive(tmp / "abst", version="9.9.1-bench", behaviour="abstain")}
    res = {"audio_minutes": a.minutes}
    for name in ("plain", "same-fe", "abstainer"):
        run_dir = tmp / name
        state = run_dir / "state"
        decisions, tel = run_dir / "decisions.jsonl", run_dir / "telemetry.jsonl"

        def fresh(name=name, state=state, decisions=decisions, tel=tel) -> None:
            if state.exists():
                shutil.rmtree(state)
            state.mkdir(parents=True)
            decisions.unlink(missing_ok=True)
            tel.unlink(missing_ok=True)
            if name != "plain":
                deliver(state, cands[name], f"bench-{name}")

        cmd = [sys.executable, "-m", "agent", "run", "--source", str(wav), "--decisions",
               str(decisions), "--telemetry", f"file:{tel}", "--state-dir", str(state),
               "--device-id", "bench", "--log-level", "WARNING"]
        wall, rss_kib, cpu = timed(cmd, before=fresh)
        lat = sorted(json.loads(x)["latency_ms"] for x in decisions.read_text().splitlines())
        stats = [json.loads(x)["payload"] for x in tel.read_text().splitlines()
                 if json.loads(x)["topic"].endswith("/stats")]
        shadow = [s["rollout"]["shadow"] for s in stats if s.get("rollout", {}).get("shadow")]
        n = sum(s["n"] for s in shadow)
        res[name] = {
            "rtf": round(audio_s / wall), "cpu_s": round(cpu, 2),
            "peak_rss_mib": round(rss_kib / 1024, 1),
            "utterances": len(lat),
            "active_latency_ms_p95": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3),
            "shadow_n": n,
            "shadow_latency_ms_mean": round(sum(s["latency_ms_mean"] * s["n"] for s in shadow
                                                if s["latency_ms_mean"] is not None) / n, 3)
            if n else None,
        }
    shutil.rmtree(tmp)
    if a.json:
        print(json.dumps(res))
        return
    print(f"stream: {a.minutes:g} min (one core, best of 3 each)")
    for name in ("plain", "same-fe", "abstainer"):
        r = res[name]
        print(f"{name:10s} peak RSS {r['peak_rss_mib']:6.1f} MiB  CPU {r['cpu_s']:6.2f} s  "
              f"{r['rtf']:6d}x real time  "
              f"active p95 {r['active_latency_ms_p95']:.3f} ms  shadow n {r['shadow_n']}, "
              f"mean {r['shadow_latency_ms_mean']} ms")


if __name__ == "__main__":
    main()
