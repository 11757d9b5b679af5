"""docs/faults.md is mirrored by tests: every test a row names must exist, so the table cannot
claim a behaviour nothing checks (and a renamed test cannot leave a stale row behind)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "faults.md"
TEST_ID = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def _rows() -> list[list[str]]:
    rows = []
    for line in TABLE.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|") or line.startswith("|---") or line.startswith("| Fault"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        rows.append(cells)
    return rows


def test_every_row_has_four_columns_and_names_a_test_or_says_it_has_none():
    rows = _rows()
    assert len(rows) >= 20
    for cells in rows:
        assert len(cells) == 4, cells
        fault, does, sees, test = cells
        assert fault and does and sees, cells
        assert test == "—" or TEST_ID.search(test), f"row {fault!r}: bad test column {test!r}"


def test_every_named_test_exists():
    named = [m.groups() for cells in _rows() for m in TEST_ID.finditer(cells[3])]
    for path, name in named:
        source = ROOT / path
        assert source.is_file(), f"docs/faults.md names {path}, which does not exist"
        assert re.search(rf"^(async )?def {name}\(", source.read_text(encoding="utf-8"),
                         re.M), f"docs/faults.md names {path}::{name}, which does not exist"
