"""`edge-voice-agent fleet rollout start | status | finish | abort`: the operator's end of a
rollout.

`start` builds the command, validates it with the device's own parser (agent.rollout.command)
and publishes it retained at QoS 1 on `{prefix}/fleet/rollout` (or `{prefix}/{device}/rollout`
with --device), so devices that connect later still get it; with --model-dir the folder must be
a complete bundle (agent.rollout.bundle), and the command names its digest. `abort` publishes
an empty retained message, which withdraws it: devices stop the shadow or roll back. `finish`
republishes the retained command with mode "finish": devices keep what they run (a committed
model stays) and the rollout is over. `status` listens for a while
(retained births and commands arrive at once, stats every window) and shows, per cohort, which
model each device runs, from which slot, its rollout state, probation and shadow figures.

The model files are not sent here: an update tool delivers them to each device's inbox.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import ssl
import sys
import threading
from pathlib import Path
from typing import Any

from agent.errors import AgentError, ConfigError
from agent.fleet.options import broker_options, check_args, parse_broker
from agent.rollout import command as cmd_mod
from agent.rollout.cohort import in_cohort
from agent.rollout.command import CommandError, RolloutCommand

PUBLISH_TIMEOUT_S = 10.0


def add_parser(fsub: Any) -> None:
    """`fleet rollout ...` (agent.fleet.cli puts it under `fleet`)."""
    r = fsub.add_parser("rollout", help="start, watch or abort a model rollout")
    rsub = r.add_subparsers(dest="rollout_command", required=True, metavar="ROLLOUT_COMMAND")
    s = broker_options(rsub.add_parser("start", help="publish (retained) a validated rollout"))
    s.add_argument("--id", required=True, help="rollout id (with the device id it draws the "
                   "canary cohort; keep it when raising --percent)")
    s.add_argument("--model-dir", type=Path, default=None,
                   help="the model directory being delivered: name, version and sha256 are read "
                   "from it")
    s.add_argument("--model", default=None, metavar="NAME@VERSION",
                   help="instead of --model-dir (then --sha256 is needed)")
    s.add_argument("--sha256", default=None, help="the bundle digest (printed by 'models "
                   "sign' and 'models install')")
    s.add_argument("--percent", type=float, required=True, help="share of devices, 0-100")
    s.add_argument("--mode", choices=[m for m in cmd_mod.MODES if m != "finish"],
                   required=True)
    s.add_argument("--device", default=None, help="one device only ({prefix}/{device}/rollout)")
    s.add_argument("--allow-vocabulary-change", action="store_true",
                   help="the model's classes may differ from what the devices run (a new "
                   "vocabulary, on purpose); without it devices refuse such a model")
    a = broker_options(rsub.add_parser("abort", help="withdraw the rollout message (devices stop "
                                   "the shadow or roll back)"))
    a.add_argument("--device", default=None)
    f = broker_options(rsub.add_parser("finish", help="end a rollout without rolling back: devices "
                                   "keep the model they run (publishes the retained command "
                                   "again with mode 'finish')"))
    f.add_argument("--device", default=None)
    st = broker_options(rsub.add_parser("status", help="per cohort: model, slot, probation, shadow "
                                    "agreement and abstain rate of every device"))
    st.add_argument("--duration", type=float, default=10.0, metavar="S",
                    help="listen this long (stats come once per device window) [10]")
    st.add_argument("--json", action="store_true")
    r.set_defaults(fleet_func=run)


def command_from_args(args: argparse.Namespace) -> RolloutCommand:
    """The command `start` publishes, validated exactly as a device will validate it."""
    if args.model_dir is not None:
        from agent.recognition.model import MANIFEST, Manifest
        from agent.rollout.bundle import bundle_digest, bundle_problem

        why = bundle_problem(args.model_dir)
        if why is not None:
            raise ConfigError(f"rollout not sent: {args.model_dir} is not a complete model "
                              f"bundle: {' '.join(why.split())}")
        m = Manifest.read(args.model_dir / MANIFEST)
        name, version, sha = m.name, m.version, bundle_digest(args.model_dir)
        if args.sha256 and args.sha256 != sha:
            raise ConfigError(f"--sha256 {args.sha256[:12]}… differs from {args.model_dir}'s "
                              f"bundle sha256 {sha[:12]}…")
    elif args.model and args.sha256:
        name, _, version = args.model.partition("@")
        sha = args.sha256
    else:
        raise ConfigError("name the model with --model-dir DIR, or --model NAME@VERSION and "
                          "--sha256")
    payload = {"schema": cmd_mod.SCHEMA, "id": args.id,
               "model": {"name": name, "version": version, "sha256": sha},
               "percent": args.percent, "mode": args.mode}
    if getattr(args, "allow_vocabulary_change", False):
        payload["vocabulary_change"] = True
    try:
        c = cmd_mod.parse(json.dumps(payload))
    except CommandError as e:
        raise ConfigError(f"rollout not sent: {e}") from None
    assert c is not None
    return c


def _topic(args: argparse.Namespace) -> str:
    from agent.telemetry.message import check_level

    fleet, _ = cmd_mod.topics(args.prefix, "x")
    if args.device is None:
        return fleet
    try:
        return f"{args.prefix}/{check_level(args.device)}/rollout"
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _client(args: argparse.Namespace) -> tuple[Any, str, str, int]:
    """A paho client for the operator's broker options, not yet connected; its URL for errors."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    tls, host, port = parse_broker(args.broker)
    args.until_idle = getattr(args, "until_idle", None)
    args.duration = getattr(args, "duration", None)
    password = check_args(args, tls)
    c = mqtt.Client(CallbackAPIVersion.VERSION2,
                    client_id=f"eva-rollout-{os.getpid()}-{secrets.token_hex(3)}",
                    protocol=mqtt.MQTTv311)
    if args.username:
        c.username_pw_set(args.username, password)
    if tls:
        c.tls_set(ca_certs=str(args.ca_file) if args.ca_file else None,
                  certfile=str(args.cert_file) if args.cert_file else None,
                  keyfile=str(args.key_file) if args.key_file else None,
                  cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    return c, f"{'mqtts' if tls else 'mqtt'}://{host}:{port}", host, port


def _start(c: Any, url: str, host: str, port: int) -> None:
    """Connect and start the network loop, or one line naming the broker."""
    try:
        c.connect(host, port, keepalive=30)
    except (OSError, ValueError) as e:
        raise AgentError(f"cannot connect to broker {url}: "
                         f"{getattr(e, 'strerror', None) or e}") from None
    c.loop_start()


def publish(args: argparse.Namespace, topic: str, payload: bytes) -> None:
    """One retained QoS 1 publish, acknowledged by the broker, or a one-line error."""
    c, url, host, port = _client(args)
    connected = threading.Event()
    refused: list[str] = []

    def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            refused.append(str(rc))
        connected.set()

    c.on_connect = on_connect
    _start(c, url, host, port)
    try:
        if not connected.wait(PUBLISH_TIMEOUT_S) or refused:
            raise AgentError(f"broker {url} " + (f"refused the connection: {refused[0]}"
                                                 if refused else "did not answer"))
        info = c.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(PUBLISH_TIMEOUT_S)
        if not info.is_published():
            raise AgentError(f"broker {url} did not acknowledge the rollout on {topic} within "
                             f"{PUBLISH_TIMEOUT_S:g} s (ACL: is this the operator account?)")
    finally:
        c.disconnect()
        c.loop_stop()


def run(args: argparse.Namespace) -> int:
    if args.rollout_command == "start":
        c = command_from_args(args)
        topic = _topic(args)
        body = json.dumps(c.to_payload(), separators=(",", ":"))
        publish(args, topic, body.encode())
        print(f"published (retained) on {topic}: {body}")
        print(f"devices in the {c.percent:g} % cohort install {c.ref} from their inbox "
              f"and start '{c.mode}'; follow with: edge-voice-agent fleet rollout status")
    elif args.rollout_command == "finish":
        return finish(args)
    elif args.rollout_command == "abort":
        topic = _topic(args)
        publish(args, topic, b"")
        print(f"withdrawn: empty retained message on {topic}; devices stop the shadow or roll "
              "back to their previous model")
    else:
        return status(args)
    return 0


def retained(args: argparse.Namespace, topic: str, timeout_s: float = 5.0) -> bytes:
    """The retained message on `topic` (b"" when there is none), read over one connection."""
    c, url, host, port = _client(args)
    got: list[bytes] = []
    done = threading.Event()

    def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            done.set()
            return
        client.subscribe(topic, qos=1)

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic == topic and msg.retain:
            got.append(bytes(msg.payload))
            done.set()

    def on_subscribe(client: Any, userdata: Any, mid: Any, codes: Any, props: Any) -> None:
        # the broker sends a retained message right after the SUBACK: no message within a
        # second of it means there is none
        t = threading.Timer(1.0, done.set)
        t.daemon = True
        t.start()

    c.on_connect, c.on_message, c.on_subscribe = on_connect, on_message, on_subscribe
    _start(c, url, host, port)
    try:
        done.wait(timeout_s)
    finally:
        c.disconnect()
        c.loop_stop()
    return got[0] if got else b""


def finish(args: argparse.Namespace) -> int:
    """The retained command again, with mode "finish": devices keep what they run."""
    topic = _topic(args)
    try:
        c = cmd_mod.parse(retained(args, topic))
    except CommandError as e:
        raise ConfigError(f"the retained message on {topic} is not a valid rollout ({e}); "
                          "nothing to finish") from None
    if c is None:
        raise ConfigError(f"no rollout is published on {topic}; nothing to finish")
    if c.mode == "finish":
        print(f"rollout {c.id} on {topic} is already finished")
        return 0
    done = RolloutCommand(c.id, c.name, c.version, c.sha256, c.percent, "finish",
                          c.vocabulary_change)
    body = json.dumps(done.to_payload(), separators=(",", ":"))
    publish(args, topic, body.encode())
    print(f"finished: published (retained) on {topic}: {body}; devices keep the model they "
          f"run ({c.ref} where it was committed) and nothing rolls back")
    return 0


def status(args: argparse.Namespace) -> int:
    from agent.fleet.watch import Watcher

    tls, host, port = parse_broker(args.broker)
    args.until_idle = None
    password = check_args(args, tls)
    w = Watcher(host=host, port=port, tls=tls, prefix=args.prefix, username=args.username,
                password=password, ca_file=args.ca_file, cert_file=args.cert_file,
                key_file=args.key_file)
    w.start()
    try:
        threading.Event().wait(args.duration)
        with w.lock:
            snap = w.state.to_json()
            rollouts = dict(w.state.rollouts)
    finally:
        w.stop()
    report = summarize(snap, rollouts, args.prefix)
    if args.json:
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        sys.stdout.write(render_text(report))
    return 0


def _command(raw: bytes | None) -> dict[str, Any] | None:
    try:
        c = cmd_mod.parse(raw or b"")
    except CommandError as e:
        return {"invalid": str(e)}
    return c.to_payload() if c else None


def summarize(snap: dict[str, Any], rollouts: dict[str, bytes], prefix: str) -> dict[str, Any]:
    """Per cohort of the fleet rollout: every device's model, slot and rollout figures."""
    fleet_cmd = _command(rollouts.get(cmd_mod.FLEET_LEVEL))
    cohorts: dict[str, list[dict[str, Any]]] = {"in": [], "out": [], "unknown": []}
    for dev_id, d in snap["devices"].items():
        last = d.get("last_window") or {}
        model = last.get("model") or d.get("model") or {}
        ro = last.get("rollout") or {}
        own = _command(rollouts.get(dev_id))
        cmd = own or fleet_cmd
        if cmd and "invalid" not in cmd:
            cohort = "in" if in_cohort(cmd["id"], dev_id, cmd["percent"]) else "out"
        else:
            cohort = "unknown"
        shadow = ro.get("shadow") or {}
        prob = ro.get("probation")
        cohorts[cohort].append({
            "device": dev_id, "online": d.get("online"),
            "model": f"{model.get('name', '?')}@{model.get('version', '?')}",
            "slot": model.get("slot"), "state": ro.get("state"), "rollout_id": ro.get("id"),
            "probation": f"{prob['windows_done']}/{prob['windows_total']}" if prob else None,
            "shadow_agreement": shadow.get("agreement"),
            "shadow_abstain_rate": shadow.get("abstain_rate"),
            "abstain_rate": d.get("abstain_rate"),
            "estimated_accuracy": (d.get("estimated_accuracy") or {}).get("value"),
            "device_command": own is not None,
            "last_event": (d.get("events") or [{}])[-1].get("event"),
            "reason": ro.get("reason"), "failed": ro.get("failed") or []})
    return {"prefix": prefix, "fleet_rollout": fleet_cmd,
            "device_rollouts": {k: _command(v) for k, v in rollouts.items()
                                if k != cmd_mod.FLEET_LEVEL},
            "cohorts": cohorts}


def _f(x: Any) -> str:
    """A cell: a device's strings as inert text (agent.fleet.watch.plain)."""
    from agent.fleet.watch import plain

    if isinstance(x, list):
        return ",".join(plain(str(v)) for v in x) or "–"
    return "–" if x is None else (f"{x:.2f}" if isinstance(x, float) else plain(x))


def render_text(r: dict[str, Any]) -> str:
    c = r["fleet_rollout"]
    lines = [f"fleet rollout on {r['prefix']}/fleet/rollout: " +
             (json.dumps(c) if c else "none")]
    for dev, dc in r["device_rollouts"].items():
        lines.append(f"device rollout on {r['prefix']}/{_f(dev)}/rollout: {json.dumps(dc)}")
    cols = {"device": "device", "model": "model", "slot": "slot", "state": "state",
            "probation": "probation", "shadow_agreement": "shadow agree",
            "shadow_abstain_rate": "shadow abstain", "abstain_rate": "abstain",
            "estimated_accuracy": "est. acc", "last_event": "last event", "failed": "failed",
            "reason": "reason"}
    for name, devs in r["cohorts"].items():
        if not devs:
            continue
        lines.append(f"cohort {name} ({len(devs)} device{'s' if len(devs) != 1 else ''}):")
        rows = [list(cols.values())] + [[_f(d[k]) for k in cols] for d in devs]
        widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
        lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
                  for row in rows]
    return "\n".join(lines) + "\n"
