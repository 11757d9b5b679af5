"""Every setting as a typed dataclass field; TOML file, then CLI flags, then validation.

Each field's metadata says what it means and what is allowed, so the same table drives the
TOML loader, the generated `--section-key` flags, validation messages and the README.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/edge-voice-agent/config.toml")


def _f(default: Any, help: str, *, choices: tuple | None = None, lo: float | None = None,
       hi: float | None = None, alias: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "lo": lo, "hi": hi,
                                             "alias": alias})


@dataclass
class AudioConfig:
    source: str = _f("mic", "mic, mic:NAME_OR_INDEX, or an audio file path", alias="source")
    speed: float = _f(0.0, "pace file sources at X times real time; 0 = as fast as possible",
                      lo=0.0, hi=1000.0, alias="speed")
    block_ms: int = _f(100, "audio read size in milliseconds", lo=10, hi=1000)
    mic_rate: int = _f(0, "microphone sample rate in Hz; 0 = the device's default",
                       lo=0, hi=192000)
    mic_channels: int = _f(0, "microphone channels (down-mixed to mono); 0 = device default",
                           lo=0, hi=32)
    queue_blocks: int = _f(100, "capture queue length in blocks; overflow is counted, never blocks",
                           lo=2, hi=10000)


@dataclass
class VadConfig:
    frame_ms: int = _f(30, "webrtcvad frame length", choices=(10, 20, 30))
    aggressiveness: int = _f(2, "webrtcvad aggressiveness, 0 (least) to 3 (most)", lo=0, hi=3)
    preroll_ms: int = _f(150, "audio kept before the trigger and given to the model", lo=0, hi=1000)
    trigger_frames: int = _f(2, "speech frames within trigger_window that start an utterance",
                             lo=1, hi=50)
    trigger_window: int = _f(3, "frames considered for the trigger", lo=1, hi=50)
    hangover_ms: int = _f(240, "non-speech after the last speech frame that ends an utterance",
                          lo=0, hi=3000)
    min_speech_ms: int = _f(90, "utterances with less speech than this are discarded",
                            lo=0, hi=5000)
    max_utterance_ms: int = _f(3000, "utterances are force-cut at this length", lo=100, hi=60000)
    quiet_after_ms: int = _f(0, "quiet after an utterance's last speech before it is released; "
                             "another utterance starting sooner marks it as running speech",
                             lo=0, hi=5000)
    energy_gate_db: float = _f(3.0, "a frame counts as speech only this far above the noise floor",
                               lo=0.0, hi=60.0)


@dataclass
class ModelConfig:
    path: str = _f("", "model directory (manifest.json + its components); empty = bundled default",
                   alias="model")
    threads: int = _f(1, "ONNX Runtime intra-op threads", lo=1, hi=64)
    thresholds: str = _f("", "thresholds.json for this model; empty = the bundled "
                         "calibration/<model name>/thresholds.json")


@dataclass
class DecisionConfig:
    mode: str = _f("partial", "degree of automation",
                   choices=("off", "shadow", "assist", "partial", "full"), alias="mode")
    threshold: float = _f(-1.0, "confidence to act at; -1 = the model's calibrated threshold",
                          lo=-1.0, hi=1.0, alias="threshold")
    max_command_ms: int = _f(1600, "a segment with a longer speech span is not a command said on "
                             "its own and never acts", lo=100, hi=60000)
    min_quiet_before_ms: int = _f(700, "a segment that follows other speech by less than this "
                                  "is part of running speech and never acts", lo=0, hi=60000)
    act_on_forced_cut: bool = _f(False, "let a segment force-cut at vad.max_utterance_ms act")

    def addressing(self):
        """The addressing rule these settings make (agent/recognition/decision.py)."""
        from agent.recognition.decision import Addressing

        return Addressing(self.max_command_ms / 1000, self.min_quiet_before_ms / 1000,
                          self.act_on_forced_cut)


@dataclass
class AddressingConfig:
    """`[addressing]`: how a command is addressed to the device (docs/wake.md)."""

    mode: str = _f("always", "always: every command said on its own may act; wake: only the "
                   "one command after the wake phrase (addressing.wake_model)",
                   choices=("always", "wake"))
    window_s: float = _f(5.0, "wake mode: seconds after the wake phrase within which the one "
                         "command must start", lo=0.5, hi=60.0)
    wake_model: str = _f("", "wake mode: the wake model directory (classes [WORD, unknown], "
                         "calibration/ inside), made by 'edge-voice-agent train --vocabulary "
                         "WORD'")
    wake_threshold: float = _f(-1.0, "wake score that counts as the wake phrase; -1 = the wake "
                               "model's calibrated threshold", lo=-1.0, hi=1.0)


@dataclass
class OutputConfig:
    decisions: str = _f("", "decisions JSON Lines path, '-' for stdout; empty = STATE_DIR/"
                        "decisions.jsonl", alias="decisions")
    socket: str = _f("", "local decision socket (Unix domain, same lines as the decisions file); "
                     "empty = $RUNTIME_DIRECTORY/decisions.sock under systemd, else STATE_DIR/"
                     "decisions.sock; none = no socket")


@dataclass
class MonitoringConfig:
    window_s: float = _f(60.0, "stats window length in audio seconds", lo=1.0, hi=86400.0,
                         alias="window")
    drift_method: str = _f("js", "drift score: js (Jensen-Shannon distance, bounded 0-1) or psi",
                           choices=("js", "psi"))
    drift_span_s: float = _f(30.0, "drift is scored on the trailing windows covering this span",
                             lo=1.0, hi=86400.0)
    device_baseline_s: float = _f(120.0, "audio seconds the device baseline is learned from",
                                  lo=1.0, hi=30 * 86400.0)
    device_baseline_min_utterances: int = _f(20, "utterances needed before the device baseline "
                                             "freezes", lo=0, hi=100000)
    k: int = _f(20, "class counts are published only for windows with at least k utterances",
                lo=1, hi=100000)
    baseline: str = _f("", "training baseline.json; empty = the bundled calibration/<model>/"
                       "baseline.json")


@dataclass
class TelemetryConfig:
    sink: str = _f("none", "where aggregated monitoring goes: none, stdout, file:PATH, "
                   "mqtt://HOST:PORT or mqtts://HOST:PORT", alias="telemetry")
    prefix: str = _f("eva", "topic prefix: {prefix}/{device_id}/stats|alarm|status|birth")
    username: str = _f("", "MQTT username; empty = the device id when a password file is set")
    password_file: str = _f("", "file whose first line is the MQTT password")
    ca_file: str = _f("", "mqtts: CA bundle; empty = the system trust store")
    cert_file: str = _f("", "mqtts: client certificate (with key_file)")
    key_file: str = _f("", "mqtts: client private key")
    keepalive_s: int = _f(30, "MQTT keepalive", lo=5, hi=3600)
    mqtt_protocol: str = _f("auto", "MQTT protocol: auto = 5 with a 3.1.1 fallback",
                            choices=("auto", "5", "3.1.1"))
    max_inflight: int = _f(16, "QoS 1 messages in flight before waiting for acknowledgements",
                           lo=1, hi=1000)
    reconnect_min_s: float = _f(1.0, "first reconnect delay (doubles, with jitter)",
                                lo=0.05, hi=600.0)
    reconnect_max_s: float = _f(60.0, "longest reconnect delay", lo=0.1, hi=3600.0)
    outbox_max_messages: int = _f(10000, "outbox bound in messages (oldest dropped, counted)",
                                  lo=1, hi=10_000_000)
    outbox_max_bytes: int = _f(16 * 1024 * 1024, "outbox bound in bytes", lo=1024, hi=2**40)
    outbox_max_age_s: float = _f(7 * 86400.0, "outbox messages older than this are dropped",
                                 lo=1.0, hi=365 * 86400.0)
    outbox_sync: str = _f("normal", "normal: survives kill -9; full: also power loss (one fsync "
                          "per message)", choices=("normal", "full"))
    historical_on_reconnect: bool = _f(False, "also mark messages queued during an outage "
                                       "historical (not only those from an earlier process)")
    drain_timeout_s: float = _f(10.0, "at the end of a file source, wait this long for the "
                                "outbox to drain", lo=0.0, hi=3600.0, alias="drain-timeout")


@dataclass
class AgentConfig:
    device_id: str = _f("", "device id in telemetry; empty = derived from the machine",
                        alias="device-id")
    state_dir: str = _f("", "local state (decisions, baselines, outbox); empty = "
                        "$STATE_DIRECTORY or ~/.local/state/edge-voice-agent",
                        alias="state-dir")


@dataclass
class RolloutConfig:
    inbox: str = _f("", "folder an update tool drops model directories into (never downloaded "
                    "by the agent); empty = STATE_DIR/inbox")
    probation_windows: int = _f(5, "stats windows (with enough utterances) a newly activated "
                                "model is watched before it is committed", lo=1, hi=10000)
    baseline_windows: int = _f(3, "recent windows of the running model needed before a switch "
                               "(what probation compares with)", lo=1, hi=1000)
    min_utterances: int = _f(5, "a window counts for probation only with this many utterances",
                             lo=1, hi=100000)
    breach_windows: int = _f(2, "consecutive breaching windows that roll back", lo=1, hi=100)
    max_abstain_increase: float = _f(0.2, "rollback when the abstain rate rises more than this "
                                     "(absolute) over the previous model's", lo=0.0, hi=1.0)
    max_accuracy_drop: float = _f(0.1, "rollback when the estimated accuracy falls more than "
                                  "this", lo=0.0, hi=1.0)
    max_latency_ratio: float = _f(3.0, "rollback when compute latency p95 grows more than this "
                                  "factor (and by over 5 ms)", lo=1.0, hi=1000.0)
    max_retry_increase: float = _f(0.25, "rollback when the share of abstentions asked again "
                                   "rises more than this", lo=0.0, hi=1.0)
    retry_s: float = _f(4.0, "a new utterance within this many seconds after a decision counts "
                        "as asking again (abstained) or repeating (accepted)", lo=0.5, hi=60.0)
    max_repeat_increase: float = _f(0.25, "rollback when the share of accepted decisions said "
                                    "again at once (a likely correction) rises more than this",
                                    lo=0.0, hi=1.0)
    max_precision_drop: float = _f(0.01, "rollback when the estimated precision of accepted "
                                   "decisions (their mean calibrated confidence, each model at "
                                   "its own threshold) falls more than this", lo=0.0, hi=1.0)
    trusted_keys: str = _f("", "public keys ('ed25519:…' from 'models keygen', separated by "
                           "spaces or commas) whose signature a model bundle needs; empty = "
                           "unsigned bundles are accepted")

    def trusted(self) -> list[str]:
        return trusted_list(self.trusted_keys)


def trusted_list(text: str) -> list[str]:
    return [k for k in text.replace(",", " ").split() if k]


@dataclass
class SamplesConfig:
    enabled: bool = _f(False, "keep audio of abstained, low-confidence and shadow-disagreeing "
                       "utterances on the device for labelling (opt-in; never published)")
    max_count: int = _f(200, "most samples kept (oldest deleted first)", lo=1, hi=1_000_000)
    max_bytes: int = _f(20 * 1024 * 1024, "most bytes of samples kept", lo=1024, hi=2**40)
    max_age_s: float = _f(14 * 86400.0, "samples older than this are deleted", lo=60.0,
                          hi=365 * 86400.0)
    confidence_below: float = _f(0.6, "also keep accepted utterances below this confidence",
                                 lo=0.0, hi=1.0)


@dataclass
class PersonalConfig:
    adaptation: bool = _f(True, "adapt the head input to this device's own utterances (label-"
                          "free, kept in STATE_DIR/personal, never published)")
    adaptation_min_utterances: int = _f(20, "utterances heard before adaptation changes a "
                                        "decision", lo=1, hi=100000)
    adaptation_prior: float = _f(20.0, "shrinkage: the shift is weighted n / (n + prior)",
                                 lo=0.0, hi=100000.0)
    adaptation_horizon: int = _f(500, "utterances the running mean remembers", lo=10,
                                 hi=1000000)
    adaptation_max_shift: float = _f(0.5, "largest shift (RMS, in training standard "
                                     "deviations)", lo=0.0, hi=10.0)
    enrollment: bool = _f(True, "use the enrollment in STATE_DIR/personal when there is one "
                          "('edge-voice-agent enroll')")
    enrollment_weight: float = _f(0.25, "weight of the similarity to the enrolled examples "
                                  "(0.25: the largest that kept every held-out FSDD speaker's "
                                  "precision >= 0.99, benchmarks/bench_personal.py --sweep)",
                                  lo=0.0, hi=100.0)


@dataclass
class ActionsConfig:
    """`[actions]`: these two settings, and `"label" = [argv...]` lines (agent/actions/table.py),
    which the loader collects into `labels` (a table, so it has no flag)."""

    timeout_s: float = _f(5.0, "an action still running after this is killed (its process "
                          "group) and counted", lo=0.1, hi=3600.0)
    queue_max: int = _f(16, "decisions waiting per action while it runs; more are dropped and "
                        "counted", lo=1, hi=10000)
    labels: dict = field(default_factory=dict, metadata={"table": True, "help": "label → argv"})


@dataclass
class Config:
    agent: AgentConfig = field(default_factory=AgentConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    vad: VadConfig = field(default_factory=VadConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    decision: DecisionConfig = field(default_factory=DecisionConfig)
    addressing: AddressingConfig = field(default_factory=AddressingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    personal: PersonalConfig = field(default_factory=PersonalConfig)
    actions: ActionsConfig = field(default_factory=ActionsConfig)
    # Alarm rules are tables keyed by metric ([alarms.snr_db] ...); validated by
    # agent.monitoring.drift.
    alarms: dict = field(default_factory=dict)
    rollup_alarms: dict = field(default_factory=dict)

    def alarm_rules(self) -> list:
        from agent.monitoring.drift import DEFAULT_ALARMS, rules_from_config

        return rules_from_config(self.alarms or DEFAULT_ALARMS, "alarms")

    def rollup_alarm_rules(self) -> list:
        from agent.monitoring.drift import DEFAULT_ROLLUP_ALARMS, rules_from_config

        return rules_from_config(self.rollup_alarms or DEFAULT_ROLLUP_ALARMS, "rollup_alarms")

    def state_path(self) -> Path:
        if self.agent.state_dir:
            return Path(self.agent.state_dir)
        if os.environ.get("STATE_DIRECTORY"):  # set by systemd's StateDirectory=
            return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "edge-voice-agent"

    def decisions_target(self) -> str:
        return self.output.decisions or str(self.state_path() / "decisions.jsonl")


RULE_SECTIONS = ("alarms", "rollup_alarms")


def sections() -> list[tuple[str, type]]:
    """The scalar-setting sections (alarm rule tables are handled apart)."""
    return [(f.name, f.type if isinstance(f.type, type) else globals()[f.type])
            for f in dataclasses.fields(Config) if f.name not in RULE_SECTIONS]


def settings() -> list[tuple[str, dataclasses.Field]]:
    """All scalar (section, field) pairs in declaration order (tables like actions.labels have
    no flag)."""
    return [(name, f) for name, cls in sections() for f in dataclasses.fields(cls)
            if not f.metadata.get("table")]


def _field_type(f: dataclasses.Field) -> type:
    t = f.type
    return {"str": str, "int": int, "float": float, "bool": bool}.get(t, t) if isinstance(t, str) \
        else t


def toml_repr(value: Any) -> str:
    """A value as it is written in TOML (`true`, `"60"`), the language of the config file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def coerce(section: str, f: dataclasses.Field, value: Any, origin: str,
           typed: bool = False) -> Any:
    """Convert and check one value; raise ConfigError naming key, value and what is allowed.

    `typed`: the value comes from TOML, which has its own numbers and booleans, so a quoted
    number (`window_s = "60"`) is refused like any other string; flags arrive as text."""
    key = f"{section}.{f.name}"
    t = _field_type(f)
    meta = f.metadata
    shown = toml_repr(value)
    quoted = typed and t is not str and isinstance(value, str)
    try:
        if quoted:
            bare = coerce(section, f, value, origin)  # what it would be without the quotes
            article = "an" if t is int else "a"
            raise ConfigError(f"{origin}: {key} = {shown} is a string, not {article} {t.__name__}; "
                              f"write it without quotes: {f.name} = {toml_repr(bare)}")
    except ConfigError as e:
        if "without quotes" in str(e):
            raise
        raise ConfigError(f"{origin}: {key} = {shown} is not a valid {t.__name__}; "
                          f"allowed: {_allowed(f)}") from None
    try:
        if t is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = value.lower() in ("true", "1", "yes")
            elif not isinstance(value, bool):
                raise ValueError
        elif t is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
        elif t is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        else:
            if not isinstance(value, str):
                raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{origin}: {key} = {shown} is not a valid {t.__name__}; "
                          f"allowed: {_allowed(f)}") from None
    shown = toml_repr(value)
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ConfigError(f"{origin}: {key} = {shown} is not allowed; allowed: {_allowed(f)}")
    if (meta["lo"] is not None and value < meta["lo"]) or \
            (meta["hi"] is not None and value > meta["hi"]):
        raise ConfigError(f"{origin}: {key} = {shown} is out of range; allowed: {_allowed(f)}")
    check = _CHECKS.get(key)
    if check is not None:
        try:
            check(value)
        except ConfigError as e:
            raise ConfigError(f"{origin}: {key} = {shown}: {e}") from None
    return value


def _check_sink(spec: str) -> None:
    from agent.telemetry.sinks import parse_sink_spec

    parse_sink_spec(spec)


# Checks beyond type, choices and range, run where the value is set, so the error names the
# file (or the command line) it came from.
def _check_keys(text: str) -> None:
    from agent.rollout.signing import parse_public

    for k in trusted_list(text):
        parse_public(k, "a key")


_CHECKS = {"telemetry.sink": _check_sink, "rollout.trusted_keys": _check_keys}


def _allowed(f: dataclasses.Field) -> str:
    m = f.metadata
    if m["choices"] is not None:
        return ", ".join(str(c) for c in m["choices"])
    t = _field_type(f).__name__
    if m["lo"] is not None:
        return f"{t} from {m['lo']:g} to {m['hi']:g}"
    return t


def load(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the TOML file (if any), then `overrides` {"section.key": value}; validated."""
    cfg = Config()
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; pass an existing file to "
                              "--config") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML ({e}); fix the syntax") \
                from None
        _apply_mapping(cfg, data, str(path))
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        _set(cfg, section, key, value, "command line")
    validate(cfg)
    return cfg


def _apply_mapping(cfg: Config, data: dict, origin: str) -> None:
    known = dict(sections())
    for section, values in data.items():
        if section in RULE_SECTIONS:
            if not isinstance(values, dict | list):
                raise ConfigError(f"{origin}: [{section}] must hold tables, one per metric")
            setattr(cfg, section, values)
            continue
        if section not in known:
            raise ConfigError(f"{origin}: unknown section [{section}]; allowed: "
                              f"{', '.join([*known, *RULE_SECTIONS])}")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: {section} must be a table [{section}]")
        for key, value in values.items():
            if section == "actions" and key not in _scalar_names(cfg.actions):
                from agent.actions.table import parse_entry

                parse_entry(key, value, origin)  # raises ConfigError naming the key
                cfg.actions.labels[key] = value
                continue
            _set(cfg, section, key, value, origin, typed=True)


def _scalar_names(sec: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(sec) if not f.metadata.get("table")}


def _set(cfg: Config, section: str, key: str, value: Any, origin: str,
         typed: bool = False) -> None:
    sec = getattr(cfg, section, None)
    fields = {f.name: f for f in dataclasses.fields(sec) if not f.metadata.get("table")} \
        if sec is not None and dataclasses.is_dataclass(sec) else {}
    if key not in fields:
        allowed = ", ".join(fields) if fields else ", ".join(n for n, _ in sections())
        raise ConfigError(f"{origin}: unknown setting {section}.{key}; allowed: {allowed}")
    setattr(sec, key, coerce(section, fields[key], value, origin, typed))


def validate(cfg: Config) -> None:
    """Cross-field rules that single-field checks cannot express."""
    v = cfg.vad
    if v.trigger_frames > v.trigger_window:
        raise ConfigError(f"vad.trigger_frames = {v.trigger_frames} exceeds vad.trigger_window = "
                          f"{v.trigger_window}; allowed: trigger_frames <= trigger_window")
    if v.max_utterance_ms <= v.min_speech_ms:
        raise ConfigError(f"vad.max_utterance_ms = {v.max_utterance_ms} must exceed "
                          f"vad.min_speech_ms = {v.min_speech_ms}")
    if cfg.addressing.mode == "wake" and not cfg.addressing.wake_model:
        raise ConfigError('addressing.mode = "wake" needs addressing.wake_model (a model '
                          "directory made by 'edge-voice-agent train --vocabulary WORD'); set "
                          '--addressing-wake-model DIR or use mode = "always"')
    cfg.alarm_rules()          # raise ConfigError naming the bad rule key, if any
    cfg.rollup_alarm_rules()


def flag_name(section: str, f: dataclasses.Field) -> str:
    return f"--{section}-{f.name.replace('_', '-')}"


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)
