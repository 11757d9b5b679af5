"""The hostile device of issue 20, as messages: every attack of the issue's table that goes
through the broker, at a scale a benchmark can replay next to an honest fleet
(benchmarks/bench_fleet.py --hostile). One device id ("evil"); the broker's ACL would keep a
real one on its own topics, so that is all it can do."""

from __future__ import annotations

import copy
import json
import time
from typing import Any

from agent.monitoring.payloads import payload_bytes
from tests.fleet_sim import SimFleet

DEVICE = "evil"


def hostile_messages(scale: int = 1000, prefix: str = "eva") -> list[tuple[str, bytes, bool]]:
    """(topic, payload, retained): births first. `scale` windows per flooding attack."""
    sim = SimFleet(devices=1, windows=1)
    base = next(sim.stats_payloads(0))
    birth_t = json.loads(sim.birth(0)[1])
    out: list[tuple[str, bytes, bool]] = []
    seq = [0]

    def stats(p: dict[str, Any] | bytes, boot: str = "e0") -> None:
        if isinstance(p, dict):
            p = {**p, "device_id": DEVICE, "boot_id": p.get("boot_id", boot) if
                 p.get("boot_id") != base["boot_id"] else boot, "seq": seq[0]}
            raw = payload_bytes(p)
        else:
            raw = p
        seq[0] += 1
        out.append((f"{prefix}/{DEVICE}/stats", raw, False))

    def other(kind: str, p: dict[str, Any] | bytes, retained: bool = False) -> None:
        raw = p if isinstance(p, bytes) else payload_bytes(p)
        out.append((f"{prefix}/{DEVICE}/{kind}", raw, retained))

    for b in range(200):  # a new boot each time (retained: the last one stays)
        other("birth", {**birth_t, "device_id": DEVICE, "boot_id": f"e{b}"}, True)
    for _ in range(scale):  # row 1: 50 KB model names
        stats({**base, "model": {**base["model"], "name": "m" * 50_000}})
    for i in range(scale):  # row 2: a new model and rollout id in every window
        stats({**base, "model": {**base["model"], "name": f"m{i}"},
               "rollout": {**(sim.rollout(0) or {"state": "committed", "cohort": "in",
                                                  "percent": 10.0, "mode": "activate",
                                                  "candidate": None, "previous": None,
                                                  "probation": None, "shadow": None}),
                           "id": f"r{i}"}})
    for v in (10**400, 2**62, 2**63):  # rows 3 and 4: counters beyond 2^53
        for _ in range(10):
            stats(json.dumps({**base, "device_id": DEVICE, "boot_id": "e0", "seq": seq[0],
                              "counts": {**base["counts"], "utterances": v}}).encode())
    nest = "[" * 990 + "]" * 990
    deep = "[" * 30_000 + "]" * 30_000
    for n in (nest, deep):  # row 6
        other("event", ('{"schema":1,"device_id":"evil","boot_id":"e0","seq":1,'
                        f'"event":"x","extra":{n}}}').encode())
        stats(payload_bytes({**base, "device_id": DEVICE, "boot_id": "e0", "seq": seq[0]})
              .replace(b'"model":{', b'"model":{"x":' + n.encode() + b","))
    for p in SimFleet(devices=1, windows=50, end_epoch=time.time() + 400 * 86400
                      ).stats_payloads(0):  # row 10: far-future windows
        stats(p)
    alarm = json.loads(sim.alarm(0, 0)[1])
    for i in range(300):  # row 11: a new alarm rule each time, seq jumps
        other("alarm", {**alarm, "device_id": DEVICE, "boot_id": "e0", "seq": 10**6 + i,
                        "threshold": 0.5 + i / 1000})
    stats({**base, "seq": 0, "boot_id": "e0"})
    stats(json.dumps({**base, "device_id": DEVICE, "boot_id": "e0", "seq": 2**52}).encode())
    for s in ("1.0.0\n", "fsdd[/]", "\x1b]0;pwned\x07"):  # rows 9 and 12
        stats({**copy.deepcopy(base), "model": {**base["model"], "version": s}})
    return out
