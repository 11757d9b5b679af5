"""The README says what a new user needs, and stays true: every command is in the table, the
decision example names the bundled model, the extras and skip rules are stated."""

from __future__ import annotations

import json
import re

from agent import cli
from agent.model import Manifest
from agent.resources import default_model_dir
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def test_every_subcommand_is_in_the_command_table() -> None:
    table = [line for line in _section("Commands").splitlines() if line.startswith("| `")]
    listed = {re.match(r"\| `edge-voice-agent (\w+)", line).group(1) for line in table}  # type: ignore[union-attr]
    commands = set(cli.build_parser().get_default("_parsers"))
    assert commands <= listed, f"missing from the README's command table: {commands - listed}"
    assert {"evaluate", "calibrate"} <= listed


def test_fleet_watch_row_says_it_needs_the_fleet_extra() -> None:
    (row,) = [x for x in _section("Commands").splitlines() if "`edge-voice-agent fleet watch" in x]
    assert "fleet` extra" in row and "pip install '.[fleet]'" in row


def test_decision_example_names_the_bundled_model() -> None:
    m = Manifest.read(default_model_dir() / "manifest.json")
    (example,) = re.findall(r"^\{\"start\".*\}$", _section("Commands"), re.M)
    assert json.loads(example)["model"] == m.ref


def test_readme_says_why_unknown_is_never_accepted() -> None:
    text = " ".join(_section("Commands").split())
    assert "`unknown` decision is **never accepted**" in text
    assert "no action to take" in text


def test_readme_states_when_shared_data_tests_skip() -> None:
    head = " ".join(README.split("## What it is")[0].split())
    assert "`$EVA_SHARED`" in head and "`../shared`" in head and "skip" in head


def test_unknown_is_never_accepted_in_any_mode() -> None:
    """What the README promises, checked on the policy itself."""
    import numpy as np

    from agent.decision import MODES, Policy

    classes = ("0", "1", "unknown")
    probs = np.array([0.005, 0.005, 0.99])
    for mode in MODES:
        if mode == "off":
            continue
        label, _, _, accepted = Policy(mode, 0.0, "unknown").decide(probs, classes)
        assert label == "unknown" and not accepted, mode
