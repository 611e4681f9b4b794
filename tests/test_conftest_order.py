"""The suite's schedule (tests/conftest.py): the longest tests are collected first, and an
xdist group that pytest-xdist left untagged is caught."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import LONGEST_FIRST, longest_first, ungrouped

ROOT = Path(__file__).resolve().parents[1]


def test_the_longest_modules_come_first_then_the_slow_ones_then_the_rest():
    def item(name: str, slow: bool = False) -> SimpleNamespace:
        return SimpleNamespace(path=ROOT / name, keywords={"slow": 1} if slow else {}, name=name)

    assert all((ROOT / name).is_file() for name in LONGEST_FIRST)  # a rename drops the hint
    items = [
        item("tests/a/test_fast.py"),
        item("tests/b/test_mixed.py"),
        item(LONGEST_FIRST[1], slow=True),
        item("tests/b/test_mixed.py", slow=True),
        item(LONGEST_FIRST[0], slow=True),
        item("tests/c/test_fast.py"),
        item(LONGEST_FIRST[0]),
    ]
    ordered = [(i.name, bool(i.keywords)) for i in longest_first(items)]
    assert ordered == [
        (LONGEST_FIRST[0], True),
        (LONGEST_FIRST[0], False),  # modules kept whole
        (LONGEST_FIRST[1], True),
        ("tests/b/test_mixed.py", False),  # a module with a slow test: before the others
        ("tests/b/test_mixed.py", True),
        ("tests/a/test_fast.py", False),
        ("tests/c/test_fast.py", False),
    ]


def test_an_xdist_group_left_untagged_is_named():
    def item(nodeid: str, group: str | None) -> SimpleNamespace:
        mark = pytest.mark.xdist_group(group).mark if group else None
        return SimpleNamespace(nodeid=nodeid, get_closest_marker=lambda name: mark)

    tagged = item("tests/test_demo_figures.py::test_a@demo_figures", "demo_figures")
    plain = item("tests/test_x.py::test_b", None)
    assert ungrouped([tagged, plain]) == []
    lost = item("tests/test_demo_figures.py::test_a", "demo_figures")  # pytest 9.2 + xdist 3.8
    assert ungrouped([tagged, lost, plain]) == ["tests/test_demo_figures.py::test_a"]
