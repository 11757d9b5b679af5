"""Rollout commands: the operator's retained message, validated before anything acts on it.

The schema is docs/rollout.schema.json; this module checks the same rules by hand, because the
device does not carry a JSON-schema library (tests check both agree). A payload that fails is
refused as a whole, with a one-line reason that the device reports in an `event`.

`vocabulary_change` (optional, default false) is the operator saying that the model's classes
may differ from the running model's: without it a device refuses such a model (a new
vocabulary changes what every consumer of decisions hears; it is rolled out on purpose).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

SCHEMA = 1
MODES = ("shadow", "activate", "finish")  # finish: the rollout is over, nothing rolls back
MAX_BYTES = 4096
MAX_DEPTH = 4  # {"model": {...}} is 2 deep; JSON nested 1,500 deep crashed json.loads
FLEET_LEVEL = "fleet"
# always .fullmatch: with re.match, `$` also matched before a trailing newline ("1.0.0\n")
_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_VERSION = re.compile(r"[A-Za-z0-9._+-]{1,64}")
_SHA = re.compile(r"[0-9a-f]{64}")
_STRUCTURE = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')  # strings (skipped) and brackets


class CommandError(ValueError):
    """A rollout message that cannot be applied; str() is the one-line reason."""


@dataclass(frozen=True)
class RolloutCommand:
    id: str
    name: str
    version: str
    sha256: str
    percent: float
    mode: str
    vocabulary_change: bool = False

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_payload(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schema": SCHEMA, "id": self.id,
            "model": {"name": self.name, "version": self.version, "sha256": self.sha256},
            "percent": self.percent, "mode": self.mode}
        if self.vocabulary_change:
            d["vocabulary_change"] = True
        return d


def _keys(d: dict, required: set[str], where: str, optional: frozenset[str] = frozenset()
          ) -> None:
    missing = sorted(required - d.keys())
    if missing:
        raise CommandError(f"{where} lacks {', '.join(missing)}")
    extra = sorted(d.keys() - required - optional)
    if extra:
        raise CommandError(f"{where} has unknown field(s) {', '.join(extra)}")


def _str(d: dict, key: str, pattern: re.Pattern[str], where: str) -> str:
    v = d[key]
    if not isinstance(v, str) or not pattern.fullmatch(v):
        raise CommandError(f"{where}.{key} = {str(v)[:40]!r} is not valid "
                           f"(pattern ^{pattern.pattern}$)")
    return v


def parse(payload: bytes | str) -> RolloutCommand | None:
    """The command in a rollout message; None for an empty (withdrawn) message."""
    if isinstance(payload, str):
        payload = payload.encode()
    if not payload.strip():
        return None
    if len(payload) > MAX_BYTES:
        raise CommandError(f"rollout message of {len(payload)} bytes exceeds {MAX_BYTES}")
    if depth(payload) > MAX_DEPTH:
        raise CommandError(f"rollout message nested deeper than {MAX_DEPTH} levels")
    try:
        d = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CommandError(f"rollout message is not JSON ({' '.join(str(e).split())[:80]})") \
            from None
    if not isinstance(d, dict):
        raise CommandError("rollout message is not a JSON object")
    _keys(d, {"schema", "id", "model", "percent", "mode"}, "rollout",
          frozenset({"vocabulary_change"}))
    if d["schema"] != SCHEMA or isinstance(d["schema"], bool):
        raise CommandError(f"rollout schema {str(d['schema'])[:20]!r} is unknown "
                           f"(this agent reads {SCHEMA})")
    m = d["model"]
    if not isinstance(m, dict):
        raise CommandError("rollout.model is not an object")
    _keys(m, {"name", "version", "sha256"}, "rollout.model")
    pct = d["percent"]
    if isinstance(pct, bool) or not isinstance(pct, int | float) or not 0 <= pct <= 100:
        raise CommandError(f"rollout.percent = {str(pct)[:20]!r} is not a number from 0 to 100")
    if d["mode"] not in MODES:
        raise CommandError(f"rollout.mode = {str(d['mode'])[:20]!r} is unknown; allowed: "
                           f"{', '.join(MODES)}")
    vocab = d.get("vocabulary_change", False)
    if not isinstance(vocab, bool):
        raise CommandError(f"rollout.vocabulary_change = {str(vocab)[:20]!r} is not true or "
                           "false")
    return RolloutCommand(id=_str(d, "id", _ID, "rollout"),
                          name=_str(m, "name", _ID, "rollout.model"),
                          version=_str(m, "version", _VERSION, "rollout.model"),
                          sha256=_str(m, "sha256", _SHA, "rollout.model"),
                          percent=float(pct), mode=d["mode"], vocabulary_change=vocab)


def depth(payload: bytes) -> int:
    """How deep the brackets of a JSON text nest, strings skipped: checked before decoding,
    which recurses once per level (bounded work: the text is at most MAX_BYTES)."""
    level = top = 0
    for m in _STRUCTURE.finditer(payload):
        c = m.group()
        if c in (b"[", b"{"):
            level += 1
            top = max(top, level)
        elif c in (b"]", b"}"):
            level -= 1
    return top


def topics(prefix: str, device_id: str) -> tuple[str, str]:
    """(fleet-wide, this device's) rollout topics; the device's own message wins."""
    return f"{prefix}/{FLEET_LEVEL}/rollout", f"{prefix}/{device_id}/rollout"
