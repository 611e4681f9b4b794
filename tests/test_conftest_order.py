"""The suite's schedule hint (tests/conftest.py): the longest tests are collected first."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from tests.conftest import LONGEST_FIRST, longest_first

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
