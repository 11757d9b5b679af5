"""`edge-voice-agent fleet serve`: the fleet's telemetry as Prometheus metrics, a web page with
history, and `/api/fleet.json`, from one process that can run as several replicas.

The network edges live here: two MQTT 5 connections feeding `FleetModel` through
agent.fleet.subscriber (gmqtt, packet size bounded; the stats, the bulk; the control plane, rare
and partly retained, on its own connection), an HTTP server
(the standard library's, bounded: `BoundedHTTPServer`) for
`/metrics`, `/`, `/device/ID`, `/api/fleet.json`, `/healthz`, and a maintenance thread
flushing the history. Scale-out: with `--share GROUP`, stats come through the shared
subscription `$share/GROUP/{prefix}/+/stats` (the broker hands each message to one replica);
alarms, status and birth (rare or retained) go to every replica on plain subscriptions, since
brokers do not send retained messages to shared subscriptions and every page should show every
alarm. No replica needs another's state: see agent.fleet.ingest and docs/fleet.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import socket
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from agent.errors import AgentError, ConfigError
from agent.fleet.options import broker_options, check_args, parse_broker
from agent.fleet.subscriber import Subscriber
from agent.telemetry.message import DEFAULT_PREFIX

log = logging.getLogger("edge-voice-agent.fleet")

DEFAULT_LISTEN = "127.0.0.1:9108"
FLUSH_S = 5.0
PRUNE_S = 600.0
PROM_HINT = "pip install 'edge-voice-agent[fleet]'"


def add_parser(fsub: Any) -> None:
    """`fleet serve` (agent.fleet.cli puts it under `fleet`)."""
    s = broker_options(fsub.add_parser("serve", help="Prometheus /metrics, a web page with history "
                                   "and /api/fleet.json; run several with --share to scale out"))
    s.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"HTTP address for /metrics, / and /api/fleet.json [{DEFAULT_LISTEN}]")
    s.add_argument("--share", default="", metavar="GROUP",
                   help="take stats through the shared subscription $share/GROUP/...: run one "
                        "replica per core or host with the same GROUP")
    s.add_argument("--replica", default="", help="name shown on the page and in eva_serve_info "
                   "[host-pid]")
    s.add_argument("--session-expiry", type=float, default=3600.0, metavar="S",
                   help="with --replica: keep the MQTT session (and the broker's queue for it) "
                        "this long across restarts; 0 = clean session [3600]")
    s.add_argument("--fleet-only", action="store_true",
                   help="export only fleet/model-level series, no eva_device_* (large fleets)")
    s.add_argument("--history", default="fleet-history.sqlite", metavar="PATH",
                   help="SQLite history file, or 'none' [fleet-history.sqlite]")
    s.add_argument("--history-days", type=float, default=14.0, metavar="D",
                   help="keep this many days of history [14]")
    s.add_argument("--history-mb", type=float, default=512.0, metavar="MB",
                   help="bound the history file to this size; oldest dropped first [512]")
    s.add_argument("--mqtt-version", choices=("5", "3.1.1"), default="5",
                   help="protocol of both broker connections: 5 only (3.1.1 has no Maximum "
                        "Packet Size to bound what serve reads; kept to say so) [5]")
    s.set_defaults(fleet_func=cmd_serve)


def _listen(spec: str) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    try:
        p = int(port)
    except ValueError:
        p = -1
    if not sep or not host or not 0 <= p < 65536:
        raise ConfigError(f"invalid --listen {spec!r}: expected HOST:PORT (e.g. {DEFAULT_LISTEN})")
    return host.strip("[]"), p


def _share_ok(group: str) -> bool:
    return not group or not any(c in group for c in "/+#")


BIG_VIEWS = ("/metrics", "/api/fleet.json")  # ~20 / 15 MB at 10,000 devices
MAX_CONNECTIONS = 32     # open HTTP connections (= handler threads) at once; more get a 503
MAX_PER_CLIENT = 8       # of which from one address: one client cannot take every slot
HTTP_TIMEOUT_S = 10.0    # per socket operation: an idle or trickling client is dropped
HEADERS = (  # the page has inline CSS and SVG, no script, no external resource
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; "
     "img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)
BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 5\r\nRetry-After: 1\r\nConnection: close\r\n\r\nbusy\n")


def _libc_trim() -> Any:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_TRIM = _libc_trim()


def release_memory() -> None:
    """Give the memory of a big response back to the system. glibc keeps freed heap memory for
    reuse, so after a 20 MB scrape the replica's RSS stayed ~40 MiB higher (an operator reads
    that as a leak); malloc_trim(0) returns it. A no-op where the C library is not glibc."""
    if _TRIM is not None:
        _TRIM(0)


# --- MQTT ------------------------------------------------------------------------------------
def _client_id(session: str, session_expiry_s: float) -> tuple[str, bool]:
    """(client id, persistent): a named replica with a session expiry keeps a stable id, so
    the broker queues for it while it restarts; otherwise a unique one."""
    persistent = bool(session) and session_expiry_s > 0
    return (f"eva-serve-{session}" if persistent
            else f"eva-serve-{os.getpid()}-{secrets.token_hex(3)}"), persistent


def stats_filter(prefix: str, share: str) -> str:
    return f"$share/{share}/{prefix}/+/stats" if share else f"{prefix}/+/stats"


def control_filters(prefix: str) -> list[tuple[str, int]]:
    """What every replica subscribes to on plain subscriptions, besides the stats: alarms
    (transitions, rare: each replica's "alarms now" is complete), presence and births
    (retained: brokers never send retained messages to shared subscriptions), rollout events
    and commands (so /api/fleet.json has all `fleet watch --json` has) and the broker's drop
    counter (QoS 0; an ACL may refuse it)."""
    from agent.fleet.state import BROKER_DROPPED_TOPIC

    return [(f"{prefix}/+/{kind}", 1) for kind in ("alarm", "status", "birth", "event",
                                                   "rollout")] + [(BROKER_DROPPED_TOPIC, 0)]


# --- HTTP ------------------------------------------------------------------------------------
class App:
    """Everything the HTTP handler serves; one per process."""

    def __init__(self, model: Any, history: Any, *, per_device: bool, replica: str,
                 broker: str = "", share: str = "", stats: Subscriber | None = None) -> None:
        from agent.fleet.exporter import FleetCollector

        self.model = model
        self.stats = stats
        self.history = history
        self.replica = replica
        self.broker = broker
        self.share = share
        self.collector = FleetCollector(model, per_device=per_device, replica=replica,
                                        link=stats)

    def metrics(self) -> tuple[list[bytes], str]:
        from prometheus_client import CONTENT_TYPE_LATEST

        return self.collector.exposition_chunks(), CONTENT_TYPE_LATEST

    def ingest_json(self) -> bytes:
        """Cheap counters for probes and benchmarks (no per-device work)."""
        m = self.model
        with m.lock:
            out: dict[str, Any] = {"messages": m.state.messages,
                                   "devices": len(m.state.devices),
                                   "outcomes": dict(m.outcomes), "replica": self.replica}
        r = self.stats
        if r is not None:  # the stats connection: messages, reconnects
            out["stats_reader"] = {"messages": r.messages, "connections": r.connections,
                                   "ingest_errors": r.ingest_errors}
        return json.dumps(out).encode()

    def fleet_json(self) -> list[bytes]:
        from msgspec.json import encode

        with self.model.reading():
            return self.model.state.to_json_chunks(encode, broker=self.broker)

    def page(self, query: dict[str, list[str]]) -> bytes:
        from agent.fleet import page, views

        q = query.get("q", [None])[0]
        rng = query.get("range", [views.DEFAULT_RANGE])[0]
        v = views.fleet_view(self.model, self.history, range_name=rng, q=q,
                             replica=self.replica, share=self.share)
        return page.fleet_page(v).encode()

    def device(self, dev_id: str) -> bytes:
        from agent.fleet import page, views

        return page.device_page(views.device_view(self.model, dev_id)).encode()


class BoundedHTTPServer(ThreadingHTTPServer):
    """The standard library's threading server with what it lacks for a service (issue 20:
    251 idle connections made every view unreachable): at most MAX_CONNECTIONS connections,
    each with its own thread, so the threads are bounded too, and at most MAX_PER_CLIENT from
    one address, so one client cannot hold every slot; one more gets a short 503 from the
    accept loop, without a thread; every socket operation times out (the handler's
    `timeout`), so an idle or trickling client frees its slot; a longer listen backlog.
    Measured against waitress 3 (connection_limit=32, channel_timeout=10, 4 threads): with 251
    idle connections open, waitress stopped accepting and another client timed out, where
    this server answered it at once; a 20 MB body took 110 ms there and 20 ms here. So no
    dependency for it (docs/fleet.md)."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: Any,
                 max_connections: int | None = None, per_client: int | None = None) -> None:
        self.max_connections = max_connections or MAX_CONNECTIONS
        self.per_client = per_client or MAX_PER_CLIENT
        self.open: dict[str, int] = {}  # client address -> connections open
        self.slots_lock = threading.Lock()
        self.refused = 0  # connections answered 503 (at a limit)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        host = client_address[0] if isinstance(client_address, tuple) else ""
        with self.slots_lock:
            mine = self.open.get(host, 0)
            full = mine >= self.per_client or sum(self.open.values()) >= self.max_connections
            if not full:
                self.open[host] = mine + 1
        if full:
            self.refused += 1
            try:
                request.settimeout(1.0)
                request.sendall(BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(host)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(client_address[0] if isinstance(client_address, tuple) else "")

    def _release(self, host: str) -> None:
        with self.slots_lock:
            n = self.open.get(host, 0) - 1
            if n > 0:
                self.open[host] = n
            else:
                self.open.pop(host, None)


def _handler(app: App) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "eva-fleet-serve"
        timeout = HTTP_TIMEOUT_S  # StreamRequestHandler: a timeout on the socket

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self._respond(head=False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._respond(head=True)

        def end_headers(self) -> None:
            for name, value in HEADERS:
                self.send_header(name, value)
            super().end_headers()

        def _respond(self, head: bool) -> None:
            u = urlsplit(self.path)
            t0 = time.perf_counter()
            try:
                if u.path == "/metrics":
                    body, ctype = app.metrics()
                elif u.path == "/api/fleet.json":
                    body, ctype = app.fleet_json(), "application/json"
                elif u.path == "/":
                    body, ctype = app.page(parse_qs(u.query)), "text/html; charset=utf-8"
                elif u.path.startswith("/device/"):
                    body = app.device(unquote(u.path[len("/device/"):]))
                    ctype = "text/html; charset=utf-8"
                elif u.path == "/healthz":
                    body, ctype = b"ok\n", "text/plain"
                elif u.path == "/api/ingest.json":
                    body, ctype = app.ingest_json(), "application/json"
                else:
                    self.send_error(404)
                    return
            except (BrokenPipeError, ConnectionResetError):
                return  # the client went away
            except Exception:  # one bad request must not take the server down
                log.exception("error serving %s", u.path)
                self.send_error(500)
                return
            try:
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                chunks = body if isinstance(body, list) else [body]
                self.send_header("Content-Length", str(sum(map(len, chunks))))
                # the server's own time for this response (what the benchmark reports)
                self.send_header("Server-Timing",
                                 f"render;dur={(time.perf_counter() - t0) * 1000:.1f}")
                self.end_headers()
                for chunk in () if head else chunks:
                    self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass  # the client went away, or reads too slowly
            if u.path in BIG_VIEWS:
                del body, chunks
                release_memory()

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http %s", format % args)

    return Handler


class Server:
    """The whole process minus argument parsing; tests and the benchmark use it directly."""

    def __init__(self, *, broker_url: str, listen: tuple[str, int], prefix: str = DEFAULT_PREFIX,
                 share: str = "", replica: str = "", per_device: bool = True,
                 history_path: str | None = None, history_days: float = 14.0,
                 history_mb: float = 512.0, mqtt_version: str = "5",
                 session_expiry_s: float = 0.0,
                 credentials: dict[str, Any] | None = None) -> None:
        from agent.fleet.history import History
        from agent.fleet.ingest import FleetModel

        tls, host, port = parse_broker(broker_url)
        self.replica = replica or f"{socket.gethostname()}-{os.getpid()}"
        try:
            self.history = (History(history_path, days=history_days, max_mb=history_mb)
                            if history_path else None)
        except (OSError, sqlite3.Error) as e:
            raise AgentError(f"cannot open the history {history_path!r}: {e} (--history PATH "
                             "in a writable directory, or --history none)") from None
        self.model = FleetModel(prefix, history=self.history)
        # Two connections into one model (FleetModel.ingest serialises them on its lock): the
        # stats, shared between replicas, and the control plane, which must not wait behind a
        # backlog of stats in the broker's in-flight window.
        client_id, persistent = _client_id(replica, session_expiry_s)
        common = {"host": host, "port": port, "tls": tls, "version": mqtt_version,
                  "persistent": persistent, "session_expiry_s": session_expiry_s,
                  **(credentials or {})}
        first, *rest = control_filters(prefix)
        self.control = Subscriber(self.model.ingest, topic_filter=first[0], extra_filters=rest,
                                  client_id=client_id, **common)
        self.stats = Subscriber(self.model.ingest, topic_filter=stats_filter(prefix, share),
                                client_id=f"{client_id}-stats", **common)
        self.app = App(self.model, self.history, per_device=per_device, replica=self.replica,
                       broker=self.stats.url, share=share, stats=self.stats)
        try:
            self.http = BoundedHTTPServer(listen, _handler(self.app))
        except OSError as e:
            raise AgentError(f"cannot listen on {listen[0]}:{listen[1]}: {e.strerror or e}"
                             " (--listen)") from None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> tuple[str, int]:
        return self.http.server_address[:2]  # type: ignore[return-value]

    def start(self) -> Server:
        self.control.start()
        try:
            self.stats.start()
        except AgentError:
            self.control.stop()
            raise
        for target in (self.http.serve_forever, self._maintain):
            t = threading.Thread(target=target, daemon=True, name=target.__name__)
            t.start()
            self._threads.append(t)
        log.info("serving http://%s:%d/ (replica %s)", *self.address, self.replica)
        return self

    def _maintain(self) -> None:
        last_prune = 0.0
        while not self._stop.wait(FLUSH_S):
            self.maintain(prune=time.monotonic() - last_prune >= PRUNE_S)
            if time.monotonic() - last_prune >= PRUNE_S:
                last_prune = time.monotonic()

    def maintain(self, prune: bool = False) -> None:
        self.model.settle()  # the windows merged since the last call: into the sums, the history
        if self.history is None:
            return
        try:
            self.history.flush()
            if prune:
                self.history.prune(time.time())
        except Exception as e:  # a full disk must not stop the metrics
            log.error("history %s: %s (the page's plots lag; /metrics is unaffected)",
                      self.history.path, e)

    def stop(self) -> None:
        self._stop.set()
        self.stats.stop()
        self.control.stop()
        if self._threads:  # shutdown() waits for serve_forever, which may never have started
            self.http.shutdown()
        self.http.server_close()
        if self.history is not None:
            self.model.settle()
            self.history.close()


def cmd_serve(args: argparse.Namespace) -> int:
    tls, _, _ = parse_broker(args.broker)
    listen = _listen(args.listen)
    if not _share_ok(args.share):
        raise ConfigError(f"invalid --share {args.share!r}: a group name without / + #")
    if not args.session_expiry >= 0:
        raise ConfigError("--session-expiry must be >= 0 seconds")
    for flag in ("history_days", "history_mb"):
        if not getattr(args, flag) > 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be > 0")
    args.duration = args.until_idle = None
    password = check_args(args, tls)
    try:
        import msgspec  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as e:
        raise AgentError(f"fleet serve needs {e.name}; install it with: {PROM_HINT}") from None
    history = None if args.history == "none" else args.history
    creds = {"username": args.username, "password": password, "ca_file": args.ca_file,
             "cert_file": args.cert_file, "key_file": args.key_file}
    server = Server(broker_url=args.broker, listen=listen, prefix=args.prefix,
                    share=args.share, replica=args.replica, per_device=not args.fleet_only,
                    history_path=history, history_days=args.history_days,
                    history_mb=args.history_mb, mqtt_version=args.mqtt_version,
                    session_expiry_s=args.session_expiry, credentials=creds)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT,
                                                                     signal.SIGTERM)}
    try:
        from agent.fleet.ingest import tune_gc

        tune_gc()
        server.start()
        stop.wait()
    finally:
        server.stop()
        for s, h in previous.items():
            signal.signal(s, h)
    return 0
