"""The stats payload's wire contract as types, checked while the JSON is parsed.

Why: a `fleet serve` replica parses thousands of 4.8 KB stats payloads a second. Parsing them
into dicts and then checking their ~600 fields by hand in Python cost more than the parsing
itself (here ~40 us to parse plus ~90 us to check, per payload). Declared as types, msgspec
checks them in C while it decodes, in ~30 us (docs/fleet.md, "Performance"). What a type cannot
say (a hist sums to its count, device_id matches the topic, the window's ends are in order) is
checked after, by `check_stats`.

The result is plain dicts and lists, the same shapes the rest of agent.fleet has always read;
fields this contract does not name are dropped (a newer agent's extra fields are ignored, as
they were). A payload that is not JSON raises `Invalid(..., "invalid_json")`; one that is JSON
but breaks the contract raises `Invalid(msg, "schema")`, `msg` naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, NotRequired, TypedDict

import msgspec
from msgspec import Meta

MAX_PAYLOAD_BYTES = 65536  # devices send <= 8 KB; anything far larger is refused unparsed
_FLOAT_MAX = 1.7976931348623157e308

NonNegInt = Annotated[int, Meta(ge=0)]
Finite = Annotated[float, Meta(ge=-_FLOAT_MAX, le=_FLOAT_MAX)]  # an int is taken as a float
Level = Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]{1,64}$")]   # one MQTT topic level / id


class Invalid(ValueError):
    """A payload that does not match its schema: args = (which field, error kind)."""


class Metric(TypedDict):
    """One `metrics` entry: a count and, when binned, a run-trimmed hist [first, c, c, ...]."""

    count: NonNegInt
    hist: list[NonNegInt]
    mean: Finite | None
    min: Finite | None
    max: Finite | None


class Window(TypedDict):
    start_s: Annotated[float, Meta(ge=0, le=_FLOAT_MAX)]
    end_s: Annotated[float, Meta(ge=0, le=_FLOAT_MAX)]
    start_utc: str
    end_utc: str
    utc_source: NotRequired[Any]   # shown, not relied on
    utc_synced: NotRequired[Any]


class Counts(TypedDict):
    frames: NonNegInt
    speech_frames: NonNegInt
    utterances: NonNegInt
    accepted: NonNegInt
    abstained: NonNegInt
    dropped_frames: NonNegInt
    state_write_errors: NotRequired[NonNegInt]  # added after schema 1: 0 when absent


class Accuracy(TypedDict):
    n: NonNegInt
    value: NotRequired[Annotated[float, Meta(ge=0, le=1)] | None]


class Stats(TypedDict):
    """agent.payloads' stats payload, schema 1. `drift`, `since_boot` and `rollout` are read
    leniently by their users (an odd entry is skipped, not the whole window)."""

    schema: Literal[1]
    device_id: Level
    boot_id: Level
    seq: NonNegInt
    historical: bool
    window: Window
    counts: Counts
    metrics: dict[str, Metric]
    drift: Any
    estimated_accuracy: Accuracy
    outputs: Any
    model: dict[str, Any]
    process: Any
    since_boot: NotRequired[Any]
    rollout: NotRequired[Any]
    outbox_dropped: NotRequired[Annotated[int, Meta(ge=1)]]


_STATS = msgspec.json.Decoder(Stats)
_ANY = msgspec.json.Decoder()


def _bytes(payload: bytes | bytearray | memoryview | str) -> bytes | str:
    if isinstance(payload, str):
        return payload
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise Invalid("payload is not text", "invalid_json")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise Invalid(f"payload larger than {MAX_PAYLOAD_BYTES} bytes", "invalid_json")
    return payload if type(payload) is bytes else bytes(payload)


def decode_json(payload: bytes | bytearray | memoryview | str | Mapping[str, Any]) -> Any:
    """Any JSON payload → Python (strict JSON: no NaN, UTF-8 checked); a Mapping is copied."""
    if isinstance(payload, Mapping):
        return dict(payload)
    try:
        return _ANY.decode(_bytes(payload))
    except msgspec.DecodeError:
        raise Invalid("payload is not valid UTF-8 JSON", "invalid_json") from None


def decode_stats(payload: bytes | bytearray | memoryview | str | Mapping[str, Any]) -> Any:
    """A stats payload → dicts, every typed field checked (raises Invalid)."""
    try:
        if isinstance(payload, Mapping):
            return msgspec.convert(payload, Stats)
        return _STATS.decode(_bytes(payload))
    except msgspec.ValidationError as e:
        raise Invalid(str(e), "schema") from None
    except msgspec.DecodeError:
        raise Invalid("payload is not valid UTF-8 JSON", "invalid_json") from None


def check_stats(p: Mapping[str, Any], device: str) -> None:
    """What the types cannot say. `p` came from `decode_stats`."""
    if p["device_id"] != device:
        raise Invalid("device_id does not match the topic", "schema")
    w = p["window"]
    if w["end_s"] < w["start_s"]:
        raise Invalid("window bounds", "schema")
    for name, m in p["metrics"].items():
        h = m["hist"]
        if h and (len(h) < 2 or sum(h) - h[0] != m["count"] or m["mean"] is None
                  or m["min"] is None or m["max"] is None):
            raise Invalid(f"metrics.{name}: hist does not sum to count, or has no "
                          "mean/min/max", "schema")
