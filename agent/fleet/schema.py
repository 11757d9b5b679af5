"""The stats payload's wire contract as types, checked while the JSON is parsed.

Why: a `fleet serve` replica parses thousands of 4.8 KB stats payloads a second. Parsing them
into dicts and then checking their ~600 fields by hand in Python cost more than the parsing
itself (here ~40 us to parse plus ~90 us to check, per payload). Declared as types, msgspec
checks them in C while it decodes, in ~30 us (docs/fleet.md, "Performance"). What a type cannot
say (a hist sums to its count, device_id matches the topic, the window's ends are in order, its
wall-clock end is plausible) is checked after, by `check_stats`.

Every field is bounded, because one buggy or hostile device must not be able to take the fleet
down (issue 20): names and versions are short strings from a fixed alphabet, counters are
non-negative integers below 2^53, floats are finite, containers have a maximum size, and
there is no free-form nesting (a field this contract does not name is skipped, and nesting
deeper than the parser's limit refuses the payload). Patterns end in `\\Z`, not `$`: Python's
`$` also matches before a trailing newline. docs/stats.schema.json says the same (a test
holds the two together).

The result is plain dicts and lists, the same shapes the rest of agent.fleet has always read;
fields this contract does not name are dropped (a newer agent's extra fields are ignored, as
they were). `Invalid(msg, reason)`: reason is one of REASONS (invalid_json, too_large,
too_deep, schema, implausible_time; agent.fleet.state adds edges_mismatch).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from datetime import datetime
from operator import itemgetter
from typing import Annotated, Any, Literal, NotRequired, TypedDict

import msgspec
from msgspec import Meta

MAX_PAYLOAD_BYTES = 65536  # the broker's max_packet_size (docs/mosquitto); devices send <= 8 KB
MAX_COUNT = 2**53 - 1      # counters: exact in a float, in JSON everywhere, and in SQLite sums
FUTURE_S = 86400.0         # a window may end at most this far after the server's clock ...
PAST_S = 366 * 86400.0     # ... and at least this recently (unless its clock says unsynced)
_FLOAT_MAX = 1.7976931348623157e308

# Strings repeated in every window (~40 dict keys, ~20 drift baselines) are bounded in length
# by the types and checked against their alphabet after decoding, once per distinct value
# (`_alphabet`): a pattern in the type calls Python's re for each, which tripled the decoding
# time (31 -> 89 us a payload here).
Key = Annotated[str, Meta(max_length=64)]       # a metric name: LEVEL, checked in check_stats
Short = Annotated[str, Meta(max_length=32)]     # a baseline or a class: WORD / LABEL, likewise
LEVEL = r"^[A-Za-z0-9._-]{1,64}\Z"
WORD = r"^[A-Za-z0-9._-]{0,32}\Z"
LABEL = r"^[a-z0-9](?:[a-z0-9.-]| [a-z0-9.-])*\Z"  # a vocabulary word (recognition.vocabulary)
Count = Annotated[int, Meta(ge=0, le=MAX_COUNT)]
Finite = Annotated[float, Meta(ge=-_FLOAT_MAX, le=_FLOAT_MAX)]  # an int is taken as a float
NonNeg = Annotated[float, Meta(ge=0, le=_FLOAT_MAX)]
Level = Annotated[str, Meta(pattern=LEVEL)]   # one MQTT topic level / id
Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9._+-]{0,64}\Z")]   # model name, version
Ref = Annotated[str, Meta(pattern=r"^[A-Za-z0-9._+@-]{0,160}\Z")]  # name@version
Word = Annotated[str, Meta(pattern=WORD)]     # a mode, a state
Utc = Annotated[str, Meta(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"
                                  r"(\.[0-9]{1,6})?Z\Z")]
MAX_METRICS = 64           # metric entries per window (the catalogue has ~20)
MAX_CLASSES = 64           # a device sends at most agent.recognition.vocabulary.MAX_CLASSES (25)
MAX_HIST = 25              # [first bin, up to 24 counts]
REASONS = ("invalid_json", "too_large", "too_deep", "schema", "implausible_time")


class Invalid(ValueError):
    """A payload that does not match its schema: args = (which field, reason)."""


class Metric(TypedDict):
    """One `metrics` entry: a count and, when binned, a run-trimmed hist [first, c, c, ...]."""

    count: Count
    hist: Annotated[list[Count], Meta(max_length=MAX_HIST)]
    mean: Finite | None
    min: Finite | None
    max: Finite | None


class Window(TypedDict):
    start_s: NonNeg
    end_s: NonNeg
    start_utc: Utc
    end_utc: Utc
    utc_source: NotRequired[Literal["wall", "file"]]
    utc_synced: NotRequired[bool | None]


class Counts(TypedDict):
    frames: Count
    speech_frames: Count
    utterances: Count
    accepted: Count
    abstained: Count
    dropped_frames: Count
    state_write_errors: NotRequired[Count]  # added after schema 1: 0 when absent
    wakes: NotRequired[Count]               # wake mode only (recognition/wake.py): 0 when absent
    wake_commands: NotRequired[Count]
    wakes_unused: NotRequired[Count]


class Accuracy(TypedDict):
    n: Count
    value: NotRequired[Annotated[float, Meta(ge=0, le=1)] | None]


class Drift(TypedDict):
    score: NonNeg | None
    baseline: Short | None
    state: Literal["ok", "alarm", "no_data"]


class Outputs(TypedDict):
    classes: Annotated[dict[Short, Count], Meta(max_length=MAX_CLASSES)] | None
    suppressed: bool


class Model(TypedDict):
    name: Name
    version: NotRequired[Name]
    sha256: NotRequired[Annotated[str, Meta(pattern=r"^([0-9a-f]{64})?\Z")]]
    mode: NotRequired[Word]
    threshold: NotRequired[Finite | None]
    slot: NotRequired[Literal["bundled", "store", "configured", "none"]]


class Process(TypedDict):
    cpu_percent: NonNeg | None
    rss_mb: NonNeg | None
    uptime_s: NotRequired[NonNeg | None]


class SinceBoot(TypedDict):
    windows: Count
    frames: Count
    speech_frames: Count
    utterances: Count
    accepted: Count
    abstained: Count
    dropped_frames: Count


class Probation(TypedDict):
    windows_done: Count
    windows_total: Annotated[int, Meta(ge=1, le=MAX_COUNT)]


class Shadow(TypedDict):
    n: Count
    skipped: Count
    agreement: Finite | None
    abstain_rate: Finite | None
    estimated_accuracy: Finite | None
    latency_ms_mean: Finite | None
    latency_ms_p95: Finite | None


class Rollout(TypedDict):
    id: Level | None
    cohort: Literal["in", "out"] | None
    percent: Annotated[float, Meta(ge=0, le=100)] | None
    mode: Literal["shadow", "activate", "finish"] | None
    state: Word
    candidate: Ref | None
    previous: Ref | None
    probation: Probation | None
    shadow: Shadow | None
    reason: NotRequired[Annotated[str, Meta(max_length=200)] | None]  # why, in that state
    failed: NotRequired[Annotated[list[Ref], Meta(max_length=8)]]     # builds never re-run


class Stats(TypedDict):
    """agent.monitoring.payloads' stats payload, schema 1: every field bounded (see the module's
    doc)."""

    schema: Literal[1]
    device_id: Level
    boot_id: Level
    seq: Count
    historical: bool
    window: Window
    counts: Counts
    metrics: Annotated[dict[Key, Metric], Meta(max_length=MAX_METRICS)]
    drift: Annotated[dict[Key, Drift], Meta(max_length=MAX_METRICS)]
    estimated_accuracy: Accuracy
    outputs: Outputs
    model: Model
    process: Process
    since_boot: NotRequired[SinceBoot]
    rollout: NotRequired[Rollout]
    outbox_dropped: NotRequired[Annotated[int, Meta(ge=1, le=MAX_COUNT)]]


class BirthInfo(TypedDict):
    """What `fleet serve` keeps of a birth (agent.daemon.service.birth_payload): shown, so
    bounded."""

    agent_version: NotRequired[Name]
    config_digest: NotRequired[Annotated[str, Meta(pattern=r"^[0-9a-f]{0,64}\Z")]]
    window_s: NotRequired[NonNeg]
    drift_method: NotRequired[Word]
    model: NotRequired[Model]


class Alarm(TypedDict):
    """docs/alarm.schema.json, as far as `fleet serve` keeps it."""

    metric: Level
    stage: Word
    state: Literal["raised", "cleared"]
    value: Finite | None
    threshold: Finite
    window_end_s: NonNeg
    reason: Annotated[str, Meta(max_length=200)]


class Event(TypedDict):
    """docs/event.schema.json: a rollout step, kept (the last few) and shown as it came."""

    schema: NotRequired[Literal[1]]
    device_id: NotRequired[Level]
    event: Word
    rollout_id: NotRequired[Level | None]
    model: NotRequired[Ref | None]
    previous: NotRequired[Ref | None]
    state: NotRequired[Word]
    reason: NotRequired[Annotated[str, Meta(max_length=200)]]
    window_end_s: NotRequired[NonNeg]
    seq: NotRequired[Count]
    boot_id: NotRequired[Level]
    outbox_dropped: NotRequired[Annotated[int, Meta(ge=1, le=MAX_COUNT)]]
    historical: NotRequired[bool]


_STATS = msgspec.json.Decoder(Stats)
_ANY = msgspec.json.Decoder()


def _bytes(payload: bytes | bytearray | memoryview | str) -> bytes | str:
    if isinstance(payload, str):
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise Invalid(f"payload larger than {MAX_PAYLOAD_BYTES} bytes", "too_large")
        return payload
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise Invalid("payload is not text", "invalid_json")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise Invalid(f"payload larger than {MAX_PAYLOAD_BYTES} bytes", "too_large")
    return payload if type(payload) is bytes else bytes(payload)


def decode_json(payload: bytes | bytearray | memoryview | str | Mapping[str, Any]) -> Any:
    """Any JSON payload → Python (strict JSON: no NaN, UTF-8 checked); a Mapping is copied."""
    if isinstance(payload, Mapping):
        return dict(payload)
    try:
        return _ANY.decode(_bytes(payload))
    except msgspec.DecodeError:
        raise Invalid("payload is not valid UTF-8 JSON", "invalid_json") from None
    except RecursionError:
        raise Invalid("payload nested too deep", "too_deep") from None


def decode_stats(payload: bytes | bytearray | memoryview | str | Mapping[str, Any]) -> Any:
    """A stats payload → dicts, every typed field checked (raises Invalid)."""
    return convert(payload, Stats, _STATS)


def convert(payload: Any, typ: Any, decoder: msgspec.json.Decoder | None = None) -> Any:
    """`payload` (JSON bytes or already-decoded) checked against `typ` (raises Invalid)."""
    try:
        if isinstance(payload, Mapping):
            return msgspec.convert(payload, typ)
        if decoder is None:
            return msgspec.convert(decode_json(payload), typ)
        return decoder.decode(_bytes(payload))
    except msgspec.ValidationError as e:
        raise Invalid(str(e)[:200], "schema") from None
    except msgspec.DecodeError:
        raise Invalid("payload is not valid UTF-8 JSON", "invalid_json") from None
    except RecursionError:
        raise Invalid("payload nested too deep", "too_deep") from None


def utc_epoch(iso: str) -> float:
    """'2024-05-01T12:00:00.000Z' → epoch seconds (NaN if unreadable)."""
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except (ValueError, AttributeError, OverflowError):
        return math.nan


def plausible(p: Mapping[str, Any], now: float) -> bool:
    """Whether the window's wall-clock end lies in [now - PAST_S, now + FUTURE_S]."""
    end = utc_epoch(p["window"]["end_utc"])
    return now - PAST_S <= end <= now + FUTURE_S


_CHECKED: dict[str, set[str | None]] = {LEVEL: set(), WORD: {None}, LABEL: set()}
_MEMO = 4096  # distinct strings remembered per alphabet (a fleet uses a few dozen)
_RE = {pattern: re.compile(pattern) for pattern in _CHECKED}
_BASELINE = itemgetter("baseline")


def _alphabet(names: Collection[str | None], pattern: str) -> bool:
    """Whether every string matches `pattern` (a full match); known-good ones are remembered,
    so the usual window costs one set comparison (in C) per kind of name."""
    seen = _CHECKED[pattern]
    if seen.issuperset(names):
        return True
    for n in names:
        if n not in seen:
            if not _RE[pattern].search(n):
                return False
            if len(seen) < _MEMO:
                seen.add(n)
    return True


def check_stats(p: Mapping[str, Any], device: str, now: float | None = None) -> None:
    """What the types cannot say. `p` came from `decode_stats`. With `now` (the server's
    clock), a window ending more than FUTURE_S ahead (unless its clock says it is not
    synchronised), or more than PAST_S behind while its clock says it is, is refused: it would
    be plotted and pruned as if it were real history. Windows outside that range that are let
    through (a board without RTC at 1970) are counted but never plotted (agent.fleet.ingest)."""
    if p["device_id"] != device:
        raise Invalid("device_id does not match the topic", "schema")
    w = p["window"]
    if w["end_s"] < w["start_s"]:
        raise Invalid("window bounds", "schema")
    if now is not None:
        end, synced = utc_epoch(w["end_utc"]), w.get("utc_synced")
        if not end == end or (end > now + FUTURE_S and synced is not False) or (
                end < now - PAST_S and synced is True):
            raise Invalid("window end_utc is not within a day ahead or a year behind the "
                          "server's clock", "implausible_time")
    metrics, drift, classes = p["metrics"], p["drift"], p["outputs"]["classes"]
    if not (_alphabet(metrics, LEVEL) and _alphabet(drift, LEVEL) and
            _alphabet(list(map(_BASELINE, drift.values())), WORD) and
            (classes is None or _alphabet(classes, LABEL))):
        raise Invalid("a metric, baseline or class name outside its alphabet", "schema")
    for name, m in metrics.items():
        h = m["hist"]
        if h and (len(h) < 2 or sum(h) - h[0] != m["count"] or m["mean"] is None
                  or m["min"] is None or m["max"] is None):
            raise Invalid(f"metrics.{name}: hist does not sum to count, or has no "
                          "mean/min/max", "schema")
