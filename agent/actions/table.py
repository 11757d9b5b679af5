"""The `[actions]` table: which program runs for which accepted label.

    [actions]
    timeout_s = 5                                  # settings are numbers ...
    "7" = ["/usr/local/bin/door", "open"]          # ... actions are argv lists, one per label
    "*" = ["/usr/bin/logger", "-t", "eva"]         # every label without its own entry

Labels are whatever class names the running model's manifest has (its vocabulary: the
digits of the bundled model, or an integrator's own words, docs/vocabulary.md), so nothing here
knows a vocabulary: a key is a label, `"*"` matches every label, and the most specific entry
wins (a label's own entry over `"*"`). A key that the model does not have is one warning at
load and at every model switch, not an error: the table may be written for the next model (or
kept from the last one, after a vocabulary change). A key that no model can have (it breaks the
word rule of agent.recognition.vocabulary, e.g. "Lights") is refused in one line.

Parsing is pure (`parse_entry`, used by the config loader, so a typo names the file); `check`
looks at the disk: an action whose program does not exist or cannot be run is refused there,
at start and at every reload, before anything is swapped.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.errors import ConfigError
from agent.recognition.vocabulary import word_problem

ANY = "*"
SETTINGS = ("timeout_s", "queue_max")  # agent.config.ActionsConfig; every other key is a label
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_QUEUE_MAX = 16


@dataclass(frozen=True)
class Action:
    """One entry: the label key it was written under and the argv run without a shell."""

    key: str
    argv: tuple[str, ...]


@dataclass(frozen=True)
class ActionTable:
    """An immutable table; a reload builds a new one and swaps the reference (atomic)."""

    actions: Mapping[str, Action] = field(default_factory=dict)
    timeout_s: float = DEFAULT_TIMEOUT_S
    queue_max: int = DEFAULT_QUEUE_MAX

    def match(self, label: str) -> Action | None:
        """The most specific entry for `label`: its own, else `"*"`, else none."""
        return self.actions.get(label) or self.actions.get(ANY)

    def __bool__(self) -> bool:
        return bool(self.actions)

    def describe(self) -> str:
        return ", ".join(f"{k!r} → {a.argv[0]}" for k, a in sorted(self.actions.items())) or \
            "none"


def parse_entry(key: str, value: Any, origin: str = "config") -> Action:
    """One `label = [argv...]` line; ConfigError names the key and what is allowed."""
    where = f"{origin}: actions.{key}" if key.isidentifier() else f"{origin}: actions.{key!r}"
    if not key:
        raise ConfigError(f"{where}: a label cannot be empty; use a class name of the model "
                          f"or \"{ANY}\"")
    why = word_problem(key) if key != ANY else None
    if why:
        raise ConfigError(f"{where}: {why}, so no model has it as a class; use a class name "
                          f"of the model or \"{ANY}\"")
    if isinstance(value, str):
        first = value.split()[0] if value.split() else "program"
        raise ConfigError(f"{where} = {value!r} is a string; an action is a list (program, "
                          f"arguments) run without a shell: \"{key}\" = [{first!r}, ...]")
    if not isinstance(value, list) or not value or \
            not all(isinstance(a, str) for a in value) or not value[0]:
        raise ConfigError(f"{where} = {value!r} is not allowed; allowed: a non-empty list of "
                          f"strings (program, arguments), or a setting: {', '.join(SETTINGS)}")
    return Action(key, tuple(value))


def parse(labels: Mapping[str, Any], timeout_s: float = DEFAULT_TIMEOUT_S,
          queue_max: int = DEFAULT_QUEUE_MAX, origin: str = "config") -> ActionTable:
    """The table from the `[actions]` label entries and its two settings."""
    return ActionTable({k: parse_entry(k, v, origin) for k, v in labels.items()},
                       timeout_s, queue_max)


def resolve(argv0: str, path: str | None = None) -> str | None:
    """The program an action would run: an absolute path as is, a bare name through PATH;
    None when it does not exist or is not executable."""
    if os.sep in argv0:
        return argv0 if os.path.isfile(argv0) and os.access(argv0, os.X_OK) else None
    return shutil.which(argv0, path=path)


def check(table: ActionTable, classes: Iterable[str] | None = None) -> list[str]:
    """Refuse (ConfigError, one line) an action whose program cannot run; return warnings for
    keys the model has no class for (one line each, for the caller to log)."""
    for key, a in sorted(table.actions.items()):
        if resolve(a.argv[0]) is None:
            raise ConfigError(f"action for label {key!r}: program {a.argv[0]!r} does not exist "
                             "or is not executable (as the service sees the file system: see "
                             "docs/actions.md); install it or fix [actions] in the config")
    return [] if classes is None else label_warnings(table, classes)


def label_warnings(table: ActionTable, classes: Iterable[str]) -> list[str]:
    """One line per action key the model has no class for (`"*"` always has one)."""
    known = set(classes)
    shown = ", ".join(sorted(known)[:20]) + (", …" if len(known) > 20 else "")
    return [f"action for label {k!r}: the model has no such class (its classes: {shown}); "
            "it runs only if a later model has it"
            for k in sorted(table.actions) if k != ANY and k not in known]
