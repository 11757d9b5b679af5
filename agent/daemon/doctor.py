"""`edge-voice-agent doctor`: check, before (or beside) the service, everything it depends on.

One line per check, OK / FAIL / SKIP plus a detail naming the thing and the fix, or with
`--json` a list of {check, status, detail}. Exit 0 only when no check FAILs: install scripts and
support staff can gate on it. Checks only read, except the state directory check, which writes
and removes one temporary file, and the audio check, which reads one block from the configured
microphone (a level, never the audio, is reported).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from agent.config import Config
from agent.daemon.clock import SYNC_FLOOR

OK, FAIL, SKIP = "OK", "FAIL", "SKIP"
# The wall clock must be past this release's date: a board without a real-time clock boots at
# 1970 (or at fake-hwclock's last save) until NTP syncs, and then TLS certificates are "not yet
# valid" and windows get wrong UTC labels. Raise it with each release.
BUILD_DATE = SYNC_FLOOR
# Below this much free space in the state directory the outbox starts dropping old telemetry
# to keep its reserve, and decisions soon stop being written.
MIN_FREE_BYTES = 4 * 1024 * 1024
AUDIO_READ_TIMEOUT_S = 3.0
BROKER_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Check:
    check: str
    status: str  # OK | FAIL | SKIP
    detail: str


def _msg(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _is_mic(cfg: Config) -> bool:
    return cfg.audio.source == "mic" or cfg.audio.source.startswith("mic:")


# --- audio ----------------------------------------------------------------------------------
def check_audio_devices(cfg: Config) -> Check:
    """Input devices PortAudio sees; absence fails only when a microphone is configured."""
    from agent.audio.sources import input_devices
    from agent.errors import AgentError

    mic = _is_mic(cfg)
    try:
        devices = input_devices()
    except AgentError as e:
        return Check("audio_devices", FAIL if mic else SKIP,
                     _msg(e) if mic else f"source is a file; {_msg(e)}")
    listing = "; ".join(f"{i}: {n}" for i, n in devices)
    if not devices:
        if mic:
            return Check("audio_devices", FAIL, "no audio input device found; connect a "
                         "microphone (and check the service user is in the audio group)")
        return Check("audio_devices", SKIP, "no audio input devices; the source is a file")
    return Check("audio_devices", OK, f"{len(devices)} input device(s): {listing}")


def check_audio_source(cfg: Config) -> Check:
    """The configured source opens and delivers audio (one block from a microphone)."""
    from agent.audio.sources import FileSource, MicSource

    a = cfg.audio
    if not _is_mic(cfg):
        try:
            f = FileSource(a.source, a.block_ms)
        except Exception as e:  # noqa: BLE001 - every failure is a FAIL line
            return Check("audio_source", FAIL, _msg(e))
        f.close()
        return Check("audio_source", OK, f.describe())
    result: list[Check] = []

    def probe() -> None:
        try:
            src = MicSource(a.source[4:] or None, a.mic_rate, a.mic_channels, a.block_ms)
            it = iter(src)
            try:
                block = next(it)
            finally:
                it.close()
            import numpy as np

            peak = float(np.max(np.abs(block.samples))) if block.samples.size else 0.0
            level = 20 * np.log10(max(peak, 1e-6))
            result.append(Check("audio_source", OK, f"{src.describe()} opened; read "
                                f"{a.block_ms} ms, peak {level:.0f} dBFS"))
        except Exception as e:  # noqa: BLE001
            result.append(Check("audio_source", FAIL, f"{_msg(e)} (if the service is running "
                                "it may hold the device: a busy device is expected then)"))

    t = threading.Thread(target=probe, daemon=True, name="doctor-audio")
    t.start()
    t.join(AUDIO_READ_TIMEOUT_S)
    if not result:
        return Check("audio_source", FAIL, f"microphone gave no audio within "
                     f"{AUDIO_READ_TIMEOUT_S:g} s; the device or its driver hangs")
    return result[0]


# --- model and calibration ------------------------------------------------------------------
def check_model(cfg: Config) -> Check:
    """Loads the model the way the service does: every component's sha256 against the manifest."""
    from agent.daemon.service import load_model

    try:
        m = load_model(cfg).manifest
    except Exception as e:  # noqa: BLE001
        return Check("model", FAIL, _msg(e))
    return Check("model", OK, f"{m.ref} at {m.sample_rate} Hz, {len(m.components)} components "
                 f"verified (build sha256 {m.sha256[:12]}…)")


def check_actions(cfg: Config) -> Check:
    """The `[actions]` table as the service loads it: every program found and executable, every
    label one the model has (noted otherwise: the table may be written for the next model)."""
    from agent.actions.table import check, parse

    table = parse(cfg.actions.labels, cfg.actions.timeout_s, cfg.actions.queue_max)
    if not table:
        return Check("actions", OK, "none configured (see docs/actions.md)")
    try:
        classes = _manifest(cfg).classes
    except Exception:  # noqa: BLE001 - reported by the model check
        classes = None
    try:
        warnings = check(table, classes)
    except Exception as e:  # noqa: BLE001
        return Check("actions", FAIL, _msg(e))
    note = f"; note: {'; '.join(warnings)}" if warnings else ""
    return Check("actions", OK, f"{len(table.actions)} entries: {table.describe()}{note}")


def _manifest(cfg: Config):
    from agent.recognition.model import MANIFEST, Manifest
    from agent.resources import default_model_dir

    return Manifest.read(Path(cfg.model.path or default_model_dir()) / MANIFEST)


def check_thresholds(cfg: Config) -> Check:
    """thresholds.json exists, parses, and was calibrated for this model build (sha256)."""
    from agent.recognition.decision import Thresholds
    from agent.resources import calibration_dir

    if cfg.decision.mode == "off":
        return Check("thresholds", SKIP, "decision.mode is off: no threshold is used")
    if cfg.decision.threshold >= 0:
        return Check("thresholds", SKIP, f"decision.threshold = {cfg.decision.threshold:g} is "
                     "set explicitly")
    try:
        m = _manifest(cfg)
        path = Path(cfg.model.thresholds) if cfg.model.thresholds else \
            calibration_dir(m.name) / "thresholds.json"
        t = Thresholds.read(path)
    except Exception as e:  # noqa: BLE001
        return Check("thresholds", FAIL, _msg(e))
    if t.sha256 != m.sha256:
        return Check("thresholds", FAIL, f"{path} was calibrated for sha256 {t.sha256[:12]}…, "
                     f"the model is {m.sha256[:12]}…; recalibrate or set decision.threshold")
    return Check("thresholds", OK, f"{path}: threshold {t.threshold:.3f} for precision "
                 f"{t.target_precision:g}, matches the model")


def check_baseline(cfg: Config) -> Check:
    """The training baseline drift is scored against: present, readable, for this model."""
    from agent.monitoring.drift import Baseline
    from agent.resources import calibration_dir

    try:
        m = _manifest(cfg)
        path = Path(cfg.monitoring.baseline) if cfg.monitoring.baseline else \
            calibration_dir(m.name) / "baseline.json"
        if not path.is_file():
            return Check("baseline", FAIL, f"{path} does not exist: drift is scored against the "
                         "device baseline only; run 'edge-voice-agent calibrate'")
        b = Baseline.load(path)
    except Exception as e:  # noqa: BLE001
        return Check("baseline", FAIL, _msg(e))
    built_for = b.meta.get("model_sha256")
    if built_for not in (None, m.sha256):
        return Check("baseline", FAIL, f"{path} was made for model sha256 {built_for[:12]}…, "
                     f"not {m.sha256[:12]}…; recalibrate")
    return Check("baseline", OK, f"{path}: {len(b.hists)} metrics")


# --- state directory ------------------------------------------------------------------------
def check_personal(cfg: Config, state_cfg: Config) -> Check:
    """Device adaptation and enrollment can work: the model's head-input reference, and the
    personal state files read back (doctor never moves or changes them)."""
    import json as json_

    from agent.daemon.service import load_model
    from agent.personal.device import reference_for
    from agent.personal.store import Corrupt, PersonalStore, read_npz

    p = cfg.personal
    if cfg.decision.mode == "off" or not (p.adaptation or p.enrollment):
        return Check("personal", SKIP, "personalisation is off (decision.mode off, or "
                     "personal.adaptation and personal.enrollment false)")
    try:
        model = load_model(cfg)
    except Exception as e:  # noqa: BLE001 - the model check says why
        return Check("personal", SKIP, f"no model to personalise: {_msg(e)}")
    ref, why = reference_for(model)
    if ref is None:
        return Check("personal", SKIP, f"adaptation and enrollment are off: {why}")
    store = PersonalStore(state_cfg.state_path())
    parts = [f"reference for {model.manifest.ref}"]
    for name, path in (("enrollment", store.enrollment_path),
                       ("adaptation", store.adaptation_path)):
        if not path.exists():
            parts.append(f"no {name} yet")
            continue
        try:
            z = read_npz(path)
            meta = json_.loads(str(z["meta"]))
        except (Corrupt, KeyError, ValueError, OSError) as e:
            return Check("personal", FAIL, f"{path} is unreadable ({_msg(e)}); the agent moves "
                         f"it aside at start{' (enroll again)' if name == 'enrollment' else ''}")
        parts.append(f"enrolled ({len(z['labels'])} recordings)" if name == "enrollment"
                     else f"adaptation learned from {meta.get('n', 0)} utterances")
    return Check("personal", OK, "; ".join(parts))


def check_state_dir(cfg: Config) -> Check:
    """Exists (or can be created), is writable, and only its owner can read or change it: it
    holds decisions (per-utterance content), baselines and the telemetry outbox."""
    path = cfg.state_path()
    if not path.exists():
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
            return Check("state_dir", OK, f"{path} does not exist yet; it will be created "
                         f"under {parent} (writable)")
        return Check("state_dir", FAIL, f"{path} does not exist and cannot be created "
                     f"({parent} is not a writable directory); set agent.state_dir")
    if not path.is_dir():
        return Check("state_dir", FAIL, f"{path} is not a directory; set agent.state_dir")
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-"):
            pass
    except OSError as e:
        return Check("state_dir", FAIL, f"{path} is not writable ({e.strerror}); fix its owner "
                     "or set agent.state_dir")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH | stat.S_IRWXO):
        return Check("state_dir", FAIL, f"{path} has mode {mode:04o}: others can read or "
                     f"change decisions and telemetry; chmod 0700 {path}")
    return Check("state_dir", OK, f"{path} writable, mode {mode:04o}")


# --- broker ---------------------------------------------------------------------------------
def check_broker(cfg: Config, timeout_s: float = BROKER_TIMEOUT_S) -> Check:
    """A real MQTT CONNECT with the configured TLS and credentials (not just a TCP probe).

    The client id is `<device id>-doctor-<random>`, never the device id itself: connecting with
    the service's own id would take over its session and fire its last will (`offline`).
    """
    from agent.telemetry.sinks import parse_sink_spec

    t = cfg.telemetry
    kind, host, port = parse_sink_spec(t.sink)
    if kind not in ("mqtt", "mqtts"):
        return Check("broker", SKIP, f"telemetry is {t.sink}")
    import ssl

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from agent.telemetry.device_id import resolve_device_id

    try:
        device_id = resolve_device_id(cfg.agent.device_id)
        password = None
        if t.password_file:
            password = Path(t.password_file).read_text().splitlines()[0]
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(t, name)
            if value and not Path(value).is_file():
                return Check("broker", FAIL, f"telemetry.{name} {value!r} does not exist")
    except (OSError, IndexError) as e:
        return Check("broker", FAIL, f"telemetry credentials cannot be read: {_msg(e)}")
    except Exception as e:  # noqa: BLE001
        return Check("broker", FAIL, _msg(e))
    protocols = [mqtt.MQTTv311] if t.mqtt_protocol == "3.1.1" else [mqtt.MQTTv5]
    if t.mqtt_protocol == "auto":
        protocols.append(mqtt.MQTTv311)
    username = t.username or (device_id if password is not None else "")
    detail = ""
    for proto in protocols:
        done = threading.Event()
        outcome: dict[str, object] = {}
        c = mqtt.Client(CallbackAPIVersion.VERSION2,
                        client_id=f"{device_id}-doctor-{uuid.uuid4().hex[:6]}", protocol=proto)
        if username:
            c.username_pw_set(username, password)
        if kind == "mqtts":
            try:
                c.tls_set(ca_certs=t.ca_file or None, certfile=t.cert_file or None,
                          keyfile=t.key_file or None, cert_reqs=ssl.CERT_REQUIRED,
                          tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (OSError, ValueError, ssl.SSLError) as e:
                return Check("broker", FAIL, f"TLS files unusable: {_msg(e)}")

        def on_connect(client, userdata, flags, rc, props, outcome=outcome, done=done):
            outcome["rc"] = rc
            done.set()

        c.on_connect = on_connect
        c.connect_timeout = timeout_s
        try:
            c.connect(host, port, keepalive=max(5, t.keepalive_s))
        except (OSError, ssl.SSLError) as e:
            return Check("broker", FAIL, f"{host}:{port}: {_msg(e)}"
                         f"{' (TLS)' if kind == 'mqtts' else ''}")
        c.loop_start()
        try:
            if not done.wait(timeout_s):
                return Check("broker", FAIL, f"{host}:{port}: no CONNACK within {timeout_s:g} s")
            rc = outcome["rc"]
            if not rc.is_failure:  # type: ignore[attr-defined]
                name = "5" if proto == mqtt.MQTTv5 else "3.1.1"
                how = "TLS" if kind == "mqtts" else "plain TCP"
                who = f"as {username}" if username else "anonymously"
                return Check("broker", OK, f"{host}:{port} accepted MQTT {name} over {how} {who}")
            detail = f"{host}:{port} refused the connection: {rc}"
            if getattr(rc, "value", None) != 132:  # 132 = unsupported protocol: try 3.1.1
                break
        finally:
            with contextlib.suppress(Exception):
                c.disconnect()
            c.loop_stop()
    return Check("broker", FAIL, detail)


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_state_space(cfg: Config, min_free: int = MIN_FREE_BYTES) -> Check:
    """Free space (and a writable mount) where decisions, baselines and the outbox live."""
    path = _existing(cfg.state_path())
    try:
        st = os.statvfs(path)
    except OSError as e:
        return Check("state_space", FAIL, f"{path}: cannot read free space ({e.strerror})")
    if st.f_flag & os.ST_RDONLY:
        return Check("state_space", FAIL, f"{path} is on a read-only file system; remount it "
                     "read-write or set agent.state_dir")
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    shown = f"{free / 2**20:.1f} MiB free of {total / 2**20:.1f} MiB at {path}"
    if free < min(min_free, total // 10):
        return Check("state_space", FAIL, f"{shown}: the telemetry outbox drops old messages "
                     "to keep its reserve and decisions stop being written; free space or set "
                     "agent.state_dir")
    return Check("state_space", OK, shown)


def check_outbox(cfg: Config) -> Check:
    """The telemetry outbox is a sound SQLite database (PRAGMA quick_check), read-only."""
    import sqlite3

    from agent.telemetry.outbox import OUTBOX_FILENAME

    path = cfg.state_path() / OUTBOX_FILENAME
    if not path.exists():
        if not cfg.telemetry.sink.startswith("mqtt"):
            return Check("outbox", SKIP, f"telemetry is {cfg.telemetry.sink}: no outbox")
        return Check("outbox", OK, f"{path} does not exist yet; created at the first start")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
        try:
            result = db.execute("PRAGMA quick_check").fetchone()[0]
            queued = db.execute("SELECT count(*) FROM outbox").fetchone()[0] \
                if result == "ok" else 0
        finally:
            db.close()
    except sqlite3.Error as e:
        result = _msg(e)
    if result != "ok":
        return Check("outbox", FAIL, f"{path} is damaged ({result}); the agent moves it aside "
                     "and starts a fresh one at its next start (its unsent telemetry is lost); "
                     "move it away now to inspect it")
    return Check("outbox", OK, f"{path}: integrity ok, {queued} message(s) queued")


# --- clock ----------------------------------------------------------------------------------
def check_clock(build_date: datetime = BUILD_DATE,
                wall: Callable[[], float] = time.time,
                mono: Callable[[], float] = time.monotonic) -> Check:
    now = wall()
    if now < build_date.timestamp():
        shown = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d %H:%M")
        return Check("clock", FAIL, f"wall clock reads {shown} UTC, before this release "
                     f"({build_date:%Y-%m-%d}): not synchronised yet? (check NTP, "
                     "timedatectl); TLS and UTC window labels depend on it")
    a = mono()
    time.sleep(0.01)
    b = mono()
    if not b > a:
        return Check("clock", FAIL, "the monotonic clock does not advance")
    shown = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Check("clock", OK, f"wall clock {shown} (after {build_date:%Y-%m-%d}); monotonic "
                 "advances")


def run_checks(cfg: Config) -> list[Check]:
    from agent.errors import AgentError
    from agent.rollout.resolve import store_config

    store: list[Check] = []
    try:  # the model the service would run: the model store's active one, if any
        mcfg = store_config(cfg)
    except AgentError as e:
        mcfg, store = cfg, [Check("model store", FAIL, _msg(e))]
    return [check_audio_devices(cfg), check_audio_source(cfg), *store, check_model(mcfg),
            check_thresholds(mcfg), check_baseline(mcfg), check_personal(mcfg, cfg),
            check_actions(mcfg), check_state_dir(cfg),
            check_state_space(cfg), check_outbox(cfg),
            check_broker(cfg), check_clock()]


def main(load_config: Callable[[], Config], as_json: bool = False) -> int:
    """Print the report; 0 when nothing FAILed, 1 otherwise."""
    try:
        cfg = load_config()
    except Exception as e:  # noqa: BLE001 - a broken config is a finding, not a crash
        checks = [Check("config", FAIL, _msg(e))]
    else:
        checks = [Check("config", OK, "loaded and valid"), *run_checks(cfg)]
    if as_json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        width = max(len(c.check) for c in checks)
        for c in checks:
            print(f"{c.status:<4}  {c.check:<{width}}  {c.detail}")
    sys.stdout.flush()
    return 1 if any(c.status == FAIL for c in checks) else 0
