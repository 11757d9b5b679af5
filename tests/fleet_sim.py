"""A simulated fleet replaying real payloads the agent produced (tests and benchmarks).

tests/data/fleet/agent-telemetry.jsonl is the telemetry file sink's output of
`edge-voice-agent run --source <20 min FSDD stream> --window 60` (birth, 20 stats windows of
4.0-4.3 KB, 3 drift alarms). Device i, window w replays stats template (i + w) mod 20 with its
own device id, boot, seq, wall-clock window and the cumulative `since_boot` counters recomputed,
so totals are known exactly. Every 5th device runs model 2.0.0 as the canary cohort of a rollout.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.monitoring.payloads import SinceBoot, payload_bytes

DATA = Path(__file__).resolve().parent / "data" / "fleet" / "agent-telemetry.jsonl"
COUNTED = ("utterances", "accepted", "abstained", "dropped_frames")


def load_templates() -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    births = [r["payload"] for r in rows if r["topic"].endswith("/birth")]
    stats = [r["payload"] for r in rows if r["topic"].endswith("/stats")]
    alarms = [r["payload"] for r in rows if r["topic"].endswith("/alarm")]
    return births[0], stats, alarms


@dataclass
class SimFleet:
    devices: int
    windows: int
    window_s: float = 60.0
    end_epoch: float = field(default_factory=lambda: float(int(time.time()) // 60 * 60))
    prefix: str = "eva"
    canary_every: int = 5
    boot: str = "b0"

    def __post_init__(self) -> None:
        self.birth_t, self.stats_t, self.alarm_t = load_templates()
        self.totals: dict[str, int] = dict.fromkeys(COUNTED, 0)
        self.totals["windows"] = 0
        self.per_model: dict[str, dict[str, int]] = {}

    def device_id(self, i: int) -> str:
        return f"sim-{i:05d}"

    def model(self, i: int) -> dict[str, Any]:
        m = dict(self.stats_t[0]["model"])
        if self.canary_every and i % self.canary_every == 0:
            m["version"] = "2.0.0"
        return m

    def rollout(self, i: int) -> dict[str, Any] | None:
        if self.canary_every and i % self.canary_every == 0:
            # as agent.rollout reports a committed canary (docs/stats.schema.json "rollout")
            return {"id": "r-2.0.0", "cohort": "in", "percent": 20.0, "mode": "activate",
                    "state": "committed", "candidate": "fsdd-digits@2.0.0",
                    "previous": "fsdd-digits@1.0.0", "probation": None, "shadow": None}
        return None

    def birth(self, i: int) -> tuple[str, bytes]:
        p = copy.deepcopy(self.birth_t)
        p.update(device_id=self.device_id(i), boot_id=self.boot, model=self.model(i))
        return f"{self.prefix}/{self.device_id(i)}/birth", payload_bytes(p)

    def stats_payloads(self, i: int) -> Iterator[dict[str, Any]]:
        """Device i's windows in order (seq 0..windows-1), counting them into the totals."""
        since = SinceBoot()
        start0 = self.end_epoch - self.windows * self.window_s
        dev, model, rollout = self.device_id(i), self.model(i), self.rollout(i)
        version = model["version"]
        for w in range(self.windows):
            t = self.stats_t[(i + w) % len(self.stats_t)]
            p = dict(t)
            p["device_id"], p["boot_id"], p["seq"] = dev, self.boot, w
            p["model"] = model
            if rollout is not None:
                p["rollout"] = rollout
            start = start0 + w * self.window_s
            p["window"] = {**t["window"], "utc_source": "wall", "utc_synced": True,
                           "start_s": w * self.window_s,
                           "end_s": (w + 1) * self.window_s,
                           "start_utc": _iso(start), "end_utc": _iso(start + self.window_s)}

            class _W:  # SinceBoot reads .counts
                counts = t["counts"]

            p["since_boot"] = since.add(_W)  # type: ignore[arg-type]
            self.totals["windows"] += 1
            pm = self.per_model.setdefault(version, dict.fromkeys(("windows", *COUNTED), 0))
            pm["windows"] += 1
            for k in COUNTED:
                self.totals[k] += t["counts"][k]
                pm[k] += t["counts"][k]
            yield p

    def messages(self) -> list[tuple[str, bytes]]:
        """Births, then every device's windows interleaved by window (as a fleet sends them)."""
        out = [self.birth(i) for i in range(self.devices)]
        gens = [self.stats_payloads(i) for i in range(self.devices)]
        for _ in range(self.windows):
            for i, g in enumerate(gens):
                out.append((f"{self.prefix}/{self.device_id(i)}/stats", payload_bytes(next(g))))
        return out

    def alarm(self, i: int, seq: int) -> tuple[str, bytes]:
        p = dict(self.alarm_t[0])
        p.update(device_id=self.device_id(i), boot_id=self.boot, seq=seq, state="raised")
        return f"{self.prefix}/{self.device_id(i)}/alarm", payload_bytes(p)


def _iso(t: float) -> str:
    from agent.monitoring.payloads import iso_utc

    return iso_utc(t)


def utc_epoch_of(p: dict[str, Any]) -> float:
    """The wall-clock end of a stats payload's window (what the history buckets by)."""
    from agent.fleet.ingest import utc_epoch

    return utc_epoch(p["window"]["end_utc"])
