"""`edge-voice-agent fleet watch`: subscribe to a fleet's broker and merge what it reports.

The operator's end of the telemetry: one paho client subscribes to `{prefix}/+/#` at QoS 1 and
feeds every message to a `FleetState`; the main thread either redraws a rich dashboard or, with
`--json`, prints the merged state once when the run ends (`--duration`, `--until-idle`, SIGINT,
SIGTERM). Only this module touches the network; the merging is in agent.fleet.state.

rich is an optional extra ("fleet"): devices never need it, and `--json` works without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets
import signal
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from agent.fleet.options import broker_options, check_args, parse_broker

log = logging.getLogger("edge-voice-agent.fleet")

CONNECT_TIMEOUT_S = 10.0
RICH_HINT = "pip install 'edge-voice-agent[fleet]'"


def add_parser(fsub: Any) -> None:
    """`fleet watch` (agent.fleet.cli puts it under `fleet`)."""
    w = broker_options(fsub.add_parser("watch", help="live dashboard (or --json) of every "
                                       "device under a prefix"))
    w.add_argument("--json", action="store_true",
                   help="print the merged state as one JSON object when the run ends")
    w.add_argument("--duration", type=float, default=None, metavar="S",
                   help="stop after S seconds (default: until SIGINT/SIGTERM)")
    w.add_argument("--until-idle", type=float, default=None, metavar="S",
                   help="stop after S seconds without a new message")
    w.set_defaults(fleet_func=cmd_watch)


def _load_rich() -> None:
    try:
        import rich  # noqa: F401
    except ImportError:
        raise AgentError(f"the live dashboard needs rich; install it with: {RICH_HINT} "
                         "(or use --json)") from None


# --- the subscriber -------------------------------------------------------------------------
def prepare_client(c: Any, handler: Any, *, username: str | None, password: str | None,
                   tls: bool, ca_file: Any, cert_file: Any, key_file: Any) -> Any:
    """Credentials, TLS, reconnect back-off and callbacks of the paho subscriber of `fleet watch`
    and `fleet rollout status` (a Watcher: `handler` has the four `_on_*` methods; `fleet
    serve` reads through agent.fleet.subscriber)."""
    if username:
        c.username_pw_set(username, password)
    if tls:
        c.tls_set(ca_certs=str(ca_file) if ca_file else None,
                  certfile=str(cert_file) if cert_file else None,
                  keyfile=str(key_file) if key_file else None,
                  cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    c.reconnect_delay_set(1, 30)
    c.on_connect = handler._on_connect
    c.on_subscribe = handler._on_subscribe
    c.on_message = handler._on_message
    c.on_disconnect = handler._on_disconnect
    return c


class Watcher:
    """A paho client feeding a FleetState; thread-safe snapshots for the main thread."""

    def __init__(self, *, host: str, port: int, tls: bool, prefix: str, username: str = "",
                 password: str | None = None, ca_file: Path | None = None,
                 cert_file: Path | None = None, key_file: Path | None = None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        try:
            from agent.fleet.state import FleetState
        except ImportError as e:
            raise AgentError(f"fleet watch needs {e.name}; install it with: {RICH_HINT}"
                             ) from None

        self.host, self.port, self.tls = host, port, tls
        self.url = f"{'mqtts' if tls else 'mqtt'}://{host}:{port}"
        self.subscription = f"{prefix}/+/#"
        self.state = FleetState(prefix)
        self.lock = threading.Lock()  # held to read `state` (the network thread writes it)
        self._connack = threading.Event()
        self._subscribed = threading.Event()
        self._refused: str | None = None
        self.last_activity = time.monotonic()
        # A unique id: several operators (or a dashboard and a script) may watch at once, and
        # a broker disconnects the older of two clients with the same id.
        client_id = f"eva-fleet-{os.getpid()}-{secrets.token_hex(3)}"
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                        protocol=mqtt.MQTTv311, clean_session=True)
        self.client = prepare_client(c, self, username=username, password=password, tls=tls,
                                     ca_file=ca_file, cert_file=cert_file, key_file=key_file)

    def start(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Connect and subscribe (bounded); AgentError with one line if that fails."""
        try:
            self.client.connect(self.host, self.port, keepalive=30)
        except (OSError, ValueError) as e:
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise AgentError(f"cannot connect to broker {self.url}: {reason}") from None
        self.client.loop_start()
        ok = self._connack.wait(timeout_s) and self._refused is None \
            and self._subscribed.wait(timeout_s)
        if not ok:
            why = (f"refused the connection: {self._refused}" if self._refused else
                   f"did not complete the connection within {timeout_s:g} s")
            self.stop()
            raise AgentError(f"broker {self.url} {why}")
        self.last_activity = time.monotonic()
        log.info("subscribed to %s on %s", self.subscription, self.url)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            snap = self.state.to_json()
        snap["broker"] = self.url
        return snap

    # paho callbacks (network thread)
    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self._refused = str(rc)
            self._connack.set()
            client.disconnect()  # a refusal (bad credentials, ACL) does not heal by retrying
            return
        self._refused = None
        self._connack.set()
        # again after every reconnect; the broker's drop counter tells its losses from the
        # devices' (agent.fleet.loss); an ACL that refuses $SYS only costs that signal
        from agent.fleet.state import BROKER_DROPPED_TOPIC

        client.subscribe([(self.subscription, 1), (BROKER_DROPPED_TOPIC, 0)])

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        if rcs and rcs[0].is_failure:
            log.error("broker refused the subscription to %s (ACL?)", self.subscription)
        self._subscribed.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            self.state.ingest(msg.topic, bytes(msg.payload), bool(msg.retain))
        self.last_activity = time.monotonic()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any,
                       props: Any) -> None:
        if self._subscribed.is_set() and rc.is_failure:
            log.warning("lost the broker %s (%s); reconnecting", self.url, rc)


# --- the run --------------------------------------------------------------------------------
def _wait(stop: threading.Event, watcher: Watcher, duration: float | None,
          idle: float | None, tick: float | None = None) -> None:
    """Block until SIGINT/SIGTERM, `duration` elapsed, or `idle` seconds without a message.

    Waits on the stop event until the nearest deadline (re-computed, since messages move the
    idle deadline); `tick` bounds each wait so the dashboard can redraw.
    """
    end = time.monotonic() + duration if duration is not None else None
    while not stop.is_set():
        now = time.monotonic()
        deadlines = [d for d in (end, watcher.last_activity + idle if idle is not None else None)
                     if d is not None]
        if deadlines and now >= min(deadlines):
            return
        timeout = min(deadlines) - now if deadlines else None
        if tick is not None:
            timeout = tick if timeout is None else min(timeout, tick)
            stop.wait(timeout)
            return
        stop.wait(timeout)


def cmd_watch(args: argparse.Namespace) -> int:
    tls, host, port = parse_broker(args.broker)
    password = check_args(args, tls)
    if not args.json:
        _load_rich()  # fail before connecting when the extra is missing
    watcher = Watcher(host=host, port=port, tls=tls, prefix=args.prefix,
                      username=args.username, password=password, ca_file=args.ca_file,
                      cert_file=args.cert_file, key_file=args.key_file)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT,
                                                                     signal.SIGTERM)}
    try:
        watcher.start()
        try:
            if args.json:
                _wait(stop, watcher, args.duration, args.until_idle)
                snap = watcher.snapshot()
                sys.stdout.write(json.dumps(snap, separators=(",", ":"), allow_nan=False)
                                 + "\n")
                sys.stdout.flush()
            else:
                _dashboard(stop, watcher, args.duration, args.until_idle)
        finally:
            watcher.stop()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0


def _dashboard(stop: threading.Event, watcher: Watcher, duration: float | None,
               idle: float | None) -> None:
    from rich.console import Console
    from rich.live import Live

    end = time.monotonic() + duration if duration is not None else None
    console = Console()
    with Live(render(watcher.snapshot()), console=console, refresh_per_second=2,
              screen=False) as live:
        while not stop.is_set():
            remaining = None if end is None else end - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            if idle is not None and time.monotonic() - watcher.last_activity >= idle:
                break
            _wait(stop, watcher, remaining, idle, tick=0.5)
            live.update(render(watcher.snapshot()))


# --- rendering (pure: a snapshot in, a rich renderable out) ---------------------------------
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def plain(s: Any) -> str:
    """A device's string as inert terminal text: control characters (escape sequences that
    clear the screen, set the title, write the clipboard) and bidi overrides shown escaped.
    Rich markup is left as it is: callers put the result in a `Text`, never in markup."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256
                        else f"\\u{ord(m.group()):04x}", str(s))


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}g}"


def render(snap: dict[str, Any]) -> Any:
    """The dashboard for one `FleetState.to_json()` snapshot (needs rich)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    f = snap["fleet"]
    errs = sum(f["errors"].values())
    head = Text.assemble(
        ("eva fleet ", "bold"), f"{snap.get('broker', '')} {snap['prefix']}/+/#  ·  ",
        (f"{f['online']}", "green"), f"/{f['devices']} online  ·  {f['windows']} windows  ·  "
        f"{snap['messages']} messages  ·  {f['duplicates']} duplicates dropped  ·  ",
        (f"{f['missing']} missing", "yellow" if f["missing"] else ""), "  ·  ",
        (f"{errs} errors", "red" if errs else ""))
    t = Table(expand=False, show_footer=False, title=None)
    for col, justify in (("device", "left"), ("state", "left"), ("boot", "left"),
                         ("model version slot", "left"), ("windows", "right"), ("utt/min", "right"),
                         ("abstain", "right"), ("est. acc", "right"), ("input dBFS", "right"),
                         ("active alarms", "left"), ("gaps", "right"), ("errors", "right")):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    for dev_id, d in snap["devices"].items():
        state = {True: Text("online", "green"), False: Text("offline", "red")}.get(
            d["online"], Text("?"))
        model = (d.get("last_window") or {}).get("model") or d["model"] or {}
        state_ = ((d.get("last_window") or {}).get("rollout") or {}).get("state")
        alarms = ", ".join(a["metric"] + ("" if a["scope"] == "window" else f" ({a['scope']})")
                           for a in d["active_alarms"])
        n_err = sum(d["errors"].values())
        # every string a device chose is a Text: shown as it is, never read as markup
        t.add_row(Text(plain(dev_id)), state, Text(plain((d["boot_id"] or "–")[:8])),
                  Text(plain(" ".join(str(model.get(k, "")) for k in ("name", "version", "slot")
                                      ).strip() + (f" ({state_})" if state_ and state_ != "idle"
                                                   else "") or "–")),
                  str(d["windows"]), _fmt(d["utterances_per_min"]), _pct(d["abstain_rate"]),
                  _pct(d["estimated_accuracy"]["value"]), _fmt(d["input_rms_dbfs"]),
                  Text(plain(alarms), "red") if alarms else "–",
                  Text(str(d["missing"]), "yellow") if d["missing"] else "0",
                  Text(str(n_err), "red") if n_err else "0")
    t.add_section()
    t.add_row("[bold]fleet[/]", f"{f['online']}/{f['devices']}", "", "", str(f["windows"]),
              _fmt(f["utterances_per_min"]), _pct(f["abstain_rate"]),
              _pct(f["estimated_accuracy"]["value"]), _fmt(f["input_rms_dbfs"]),
              str(f["active_alarms"]), str(f["missing"]), str(errs))
    q = Table(title="fleet-wide quantiles (merged histograms)", title_justify="left")
    for col in ("metric", "stage", "unit", "n", "mean", "p50", "p95"):
        q.add_column(col, justify="left" if col in ("metric", "stage", "unit") else "right")
    for name, m in f["metrics"].items():
        if m["count"]:
            q.add_row(Text(plain(name)), Text(plain(m.get("stage") or "")),
                      Text(plain(m.get("unit") or "")), str(m["count"]),
                      _fmt(m["mean"], 4), _fmt(m["p50"], 4), _fmt(m["p95"], 4))
    return Group(head, t, q)
