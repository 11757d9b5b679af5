"""CPU per message of the MQTT layer alone: paho (MQTT 5, 3.1.1) against the lean stats reader.

Why `fleet serve` reads stats with agent.fleet.mqttin rather than paho (docs/fleet.md, "Why
stats bypass paho"). A real mosquitto on loopback, a publisher process replaying real 4.8 KB
stats payloads (tests/fleet_sim.py) at QoS 1 as fast as the broker takes them, and in this
process one subscriber at QoS 1 whose model does nothing: the
CPU this process spends from the first to the last message (user + system) divided by the
messages is what the MQTT layer costs per message. The subscriber runs pinned to one core
(`--core`, like `fleet serve` in bench_fleet.py); the broker and the publisher are not pinned.
Two regimes: "live" ($share subscription while the publisher sends: a no-op model keeps up, so
each read holds a few messages) and "backlog" (the broker queued them for the offline
persistent session: full reads, as for a replica at its limit).

    python benchmarks/bench_mqttin.py                               # every implementation
    python benchmarks/bench_mqttin.py --impl lean --version 5 --messages 40000
    python benchmarks/bench_mqttin.py --impl gmqtt       # or paho-tuned (issue 21)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fleet import PUBLISHER, _calibration  # noqa: E402

from tests.fleet_sim import SimFleet  # noqa: E402
from tests.mqtt_fixtures import Broker, free_port  # noqa: E402

SHARED_FILTER = "$share/bench/eva/+/stats"
ALL_CPUS = range(os.cpu_count() or 1)


class Counter:
    """A model that only counts (the MQTT layer's cost is what is left)."""

    def __init__(self, expect: int) -> None:
        self.n, self.expect, self.done = 0, expect, threading.Event()

    def ingest(self, topic: str, payload: bytes, retained: bool = False) -> str:
        self.n += 1
        if self.n == self.expect:
            self.done.set()
        return "stats"


class PahoSubscriber:
    """What `fleet serve` did before: a paho client, on_message → ingest."""

    def __init__(self, model: Counter, port: int, version: str, topic_filter: str,
                 client_id: str, persistent: bool) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        v5 = version == "5"
        self.ready = threading.Event()
        kw: dict[str, Any] = {} if v5 else {"clean_session": not persistent}
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, **kw)
        self.c.on_connect = lambda c, *a: c.subscribe(topic_filter, qos=1)
        self.c.on_subscribe = lambda *a: self.ready.set()
        self.c.on_message = lambda c, u, m: model.ingest(m.topic, m.payload, bool(m.retain))
        ckw: dict[str, Any] = {}
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600 if persistent else 0
            ckw = {"clean_start": not persistent, "properties": props}
        self.c.connect("127.0.0.1", port, keepalive=30, **ckw)
        self.c.loop_start()
        if not self.ready.wait(30):
            raise TimeoutError("paho did not subscribe within 30 s")

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class LeanSubscriber:
    """What `fleet serve` does now (agent.fleet.mqttin)."""

    def __init__(self, model: Counter, port: int, version: str, topic_filter: str,
                 client_id: str, persistent: bool) -> None:
        from agent.fleet.mqttin import Subscriber

        self.r = Subscriber(model.ingest, host="127.0.0.1", port=port, tls=False,
                             topic_filter=topic_filter, client_id=client_id, version=version,
                             persistent=persistent, session_expiry_s=3600)
        self.r.start(30)

    def stop(self) -> None:
        self.r.stop()


class LibrarySubscriber:
    """A well-kept library through benchmarks/mqtt_alternatives.py (issue 21)."""

    impl = "gmqtt"

    def __init__(self, model: Counter, port: int, version: str, topic_filter: str,
                 client_id: str, persistent: bool) -> None:
        from mqtt_alternatives import CLIENTS

        self.r = CLIENTS[self.impl](model.ingest, host="127.0.0.1", port=port, tls=False,
                                    topic_filter=topic_filter, client_id=client_id,
                                    version=version, persistent=persistent,
                                    session_expiry_s=3600)
        self.r.start(30)

    def stop(self) -> None:
        self.r.stop()


class GmqttSubscriber(LibrarySubscriber):
    impl = "gmqtt"


class PahoTunedSubscriber(LibrarySubscriber):
    impl = "paho"


KINDS: dict[str, Any] = {"paho": PahoSubscriber, "lean": LeanSubscriber,
                         "gmqtt": GmqttSubscriber, "paho-tuned": PahoTunedSubscriber}


def run(impl: str, version: str, port: int, msgs_path: Path, n: int,
        backlog: bool) -> tuple[float, float, float, str]:
    """(µs CPU per message, of which in the kernel, messages per wall second, note).

    Live: subscribed while the publisher sends (the reader keeps up and gets a few messages
    per read). Backlog: the broker queued everything for our offline persistent session and
    we drain it, as a replica at its limit always is behind (full reads)."""
    model = Counter(n)
    kind = KINDS[impl]
    # a backlog goes to a plain subscription: a broker need not queue shared ones offline
    topic_filter = "eva/+/stats" if backlog else SHARED_FILTER
    client_id = f"bench-{impl}-{version}-{'backlog' if backlog else 'live'}"
    sub: Any = kind(model, port, version, topic_filter, client_id, backlog)
    if backlog:
        sub.stop()
    pub = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(port), str(msgs_path)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(pub.pid, ALL_CPUS)  # only the subscriber is pinned
    try:
        assert pub.stdin is not None and pub.stdout is not None
        assert pub.stdout.readline().strip() == "ready"
        for _ in range(2 if backlog else 1):  # retained phase (none here), then the stats
            pub.stdin.write("go\n")
            pub.stdin.flush()
            pub.stdout.readline()
        t0, wall0 = os.times(), time.perf_counter()
        if backlog:
            sub = kind(model, port, version, topic_filter, client_id, True)
        else:
            pub.stdin.write("go\n")
            pub.stdin.flush()
        if not model.done.wait(600):
            raise TimeoutError(f"{impl} v{version}: only {model.n}/{n} messages in 600 s")
        t1, wall = os.times(), time.perf_counter() - wall0
        cpu, system = t1.user + t1.system - t0.user - t0.system, t1.system - t0.system
        note = ""
        if impl != "paho":
            note = f"; {sub.r.messages / max(1, sub.r.reads):.1f} messages per recv()"
        pub.stdin.write("go\n")
        pub.stdin.flush()
        pub.wait(60)
    finally:
        if pub.poll() is None:
            pub.kill()
        sub.stop()
    return cpu / n * 1e6, system / n * 1e6, n / wall, note


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--impl", choices=("all", *KINDS), default="all")
    ap.add_argument("--version", choices=("all", "5", "3.1.1"), default="all")
    ap.add_argument("--core", type=int, default=0, help="CPU the subscriber is pinned to")
    args = ap.parse_args()

    d = Path(tempfile.mkdtemp(prefix="bench-mqttin-"))
    port = free_port()
    conf = d / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "log_dest stderr",
             "log_type error", "max_queued_messages 1000000", "max_inflight_messages 1000"]
    if os.geteuid() == 0:
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n")
    broker = Broker(port=port, conf=conf, log_path=d / "broker.log").start()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.core})
    try:
        sim = SimFleet(devices=max(1, args.messages // 2), windows=2)
        msgs = [(t, b, False) for t, b in sim.messages() if t.endswith("/stats")]
        msgs = msgs[:args.messages]
        size = sum(len(b) for _, b, _ in msgs) / len(msgs)
        (d / "msgs.pickle").write_bytes(pickle.dumps(msgs))
        affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        print(f"{len(msgs)} stats messages, mean {size:.0f} B; this process on CPUs {affinity}; "
              f"load average {os.getloadavg()}; CPU calibration: sum(range(10**7)) took "
              f"{_calibration():.3f} CPU-s")
        impls = tuple(KINDS) if args.impl == "all" else (args.impl,)
        versions = ("5", "3.1.1") if args.version == "all" else (args.version,)
        for backlog in (False, True):
            print("backlog (the broker queued everything; the subscriber drains it):" if backlog
                  else "live (subscribed while the publisher sends; its rate bounds the wall "
                  "rate):")
            for impl in impls:
                if impl == "gmqtt" and importlib.util.find_spec("gmqtt") is None:
                    print("  gmqtt: not installed, skipped (pip install gmqtt)")
                    continue
                for version in versions:
                    us, sys_us, rate, note = run(impl, version, port, d / "msgs.pickle",
                                                 len(msgs), backlog)
                    print(f"  {impl:10} MQTT {version:5}: {us:6.1f} µs CPU per message "
                          f"({sys_us:.1f} in the kernel; {rate:,.0f} msg/s wall{note})",
                          flush=True)
    finally:
        broker.kill()
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
