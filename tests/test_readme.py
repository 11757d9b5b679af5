"""The README and its docs say what a new user needs, and stay true: the README is short and
starts with the two commands, every command is in docs/commands.md, the decision examples name
the bundled model, the extras and skip rules are stated, every relative link resolves."""

from __future__ import annotations

import json
import re

from agent import cli
from agent.recognition.model import Manifest
from agent.resources import default_model_dir
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
COMMANDS = (ROOT / "docs" / "commands.md").read_text(encoding="utf-8")
DECISIONS = (ROOT / "docs" / "decisions.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def test_readme_is_short_and_starts_with_the_two_commands() -> None:
    lines = README.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move details to docs/"
    first = README.split("```sh\n", 1)[1].split("```", 1)[0].splitlines()
    assert len(first) == 2 and "edge-voice-agent demo" in first[0] and "pip install ." in first[0]
    assert first[1].startswith("sudo bash .ci/run")
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest -q" in first[1] and ".venv/bin/python -m pytest -q\n" in ci


def test_readme_tree_names_every_package_and_the_docs_links_resolve() -> None:
    packages = {p.parent.name for p in (ROOT / "agent").glob("*/__init__.py")}
    tree = README.split("```\nagent/\n", 1)[1].split("```", 1)[0]
    assert {line.split("/")[0].strip() for line in tree.splitlines() if "/ " in line} == packages
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", doc.read_text()):
            if not re.match(r"https?:|mailto:", target):
                assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"


def test_every_subcommand_is_in_the_command_table() -> None:
    table = [line for line in COMMANDS.splitlines() if line.startswith("| `")]
    listed = {re.match(r"\| `edge-voice-agent (\w+)", line).group(1) for line in table}  # type: ignore[union-attr]
    commands = set(cli.build_parser().get_default("_parsers"))
    assert commands <= listed, f"missing from docs/commands.md: {commands - listed}"
    assert {"evaluate", "calibrate"} <= listed


def test_fleet_watch_row_says_it_needs_the_fleet_extra() -> None:
    (row,) = [x for x in COMMANDS.splitlines() if "`edge-voice-agent fleet watch" in x]
    assert "fleet` extra" in row and "pip install '.[fleet]'" in row


def test_decision_example_names_the_bundled_model() -> None:
    m = Manifest.read(default_model_dir() / "manifest.json")
    for text in (_section("Speak to it"), DECISIONS):
        (example,) = re.findall(r"^\{\"start\".*\}$", text, re.M)
        assert json.loads(example)["model"] == m.ref


def test_readme_says_why_unknown_is_never_accepted() -> None:
    text = " ".join(DECISIONS.split())
    assert "`unknown` decision is **never accepted**" in text
    assert "`unknown` (not one of its words) is never accepted" in " ".join(README.split())
    assert "no action to take" in text


def test_readme_states_when_shared_data_tests_skip() -> None:
    head = " ".join(README.split("## What it is")[0].split())
    assert "`$EVA_SHARED`" in head and "`../shared`" in head and "skip" in head


def test_unknown_is_never_accepted_in_any_mode() -> None:
    """What the README promises, checked on the policy itself."""
    import numpy as np

    from agent.recognition.decision import MODES, Policy

    classes = ("0", "1", "unknown")
    probs = np.array([0.005, 0.005, 0.99])
    for mode in MODES:
        if mode == "off":
            continue
        label, _, _, accepted = Policy(mode, 0.0, "unknown").decide(probs, classes)
        assert label == "unknown" and not accepted, mode
