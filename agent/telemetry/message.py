"""The one shape every telemetry message has, whatever sink carries it.

A message is `(topic, JSON payload, qos, retain)`; sinks differ only in transport, so the
pipeline builds messages once and the operator-side tools decode them the same way from a file,
stdout or a broker.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

DEFAULT_PREFIX = "eva"
KINDS = ("stats", "alarm", "status", "birth", "event")

# A topic level must not contain MQTT wildcards or separators, or one device could address
# (or subscribe to) another's topics; keep it to a conservative, shell- and ACL-safe alphabet.
_LEVEL = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_PREFIX = re.compile(r"^[A-Za-z0-9._-]{1,64}(/[A-Za-z0-9._-]{1,64}){0,3}$")


# One encoder for every message, built once: `json.dumps` with options builds a new one per
# call. Payloads are trees built by our code, so the circular-reference bookkeeping (a dict
# lookup per container, ~10 % of a stats payload's encoding) is skipped; a cycle would still
# fail, with RecursionError instead of ValueError.
_WIRE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                         check_circular=False)


def json_bytes(payload: Any) -> bytes:
    """Compact UTF-8 JSON: what goes over the wire and into the outbox (size counts)."""
    return _WIRE.encode(payload).encode("utf-8")


@dataclass(frozen=True)
class Message:
    """One outgoing telemetry message; `payload` must be JSON-serialisable (no NaN)."""

    topic: str
    payload: dict
    qos: int = 1
    retain: bool = False

    def __post_init__(self) -> None:
        t = self.topic
        if not t or "+" in t or "#" in t or "\0" in t:  # one per window: no generator
            raise ValueError(f"invalid telemetry topic {self.topic!r}")
        if self.qos not in (0, 1, 2):
            raise ValueError(f"invalid qos {self.qos!r}: expected 0, 1 or 2")

    def to_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, "payload": self.payload, "qos": self.qos,
                "retain": self.retain}

    def to_json_line(self) -> str:
        """`{"topic","payload","qos","retain"}` on one line (the file/stdout sink contract)."""
        return _WIRE.encode(self.to_dict()) + "\n"

    @classmethod
    def from_json_line(cls, line: str) -> Message:
        d = json.loads(line)
        return cls(d["topic"], d["payload"], int(d.get("qos", 1)), bool(d.get("retain", False)))


def check_level(value: str, what: str = "device id") -> str:
    """Return `value` if it is safe as one topic level (and as an MQTT username/client id)."""
    if not _LEVEL.fullmatch(value or ""):  # fullmatch: `$` also matches before a "\n"
        raise ValueError(f"invalid {what} {value!r}: use 1-64 of A-Z a-z 0-9 . _ -")
    return value


def topic(prefix: str | None, device_id: str, kind: str) -> str:
    """`{prefix}/{device_id}/{kind}`; prefix None or "" means the default "eva"."""
    prefix = prefix or DEFAULT_PREFIX
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(f"invalid topic prefix {prefix!r}: levels of A-Z a-z 0-9 . _ - "
                         "separated by /")
    if kind not in KINDS:
        raise ValueError(f"invalid message kind {kind!r}: expected one of {', '.join(KINDS)}")
    return f"{prefix}/{check_level(device_id)}/{kind}"
