"""The README's and the docs' examples run and print what they say they print.

The ``python`` blocks of a page run in order in one namespace (a page reads
as one session); ``print(...)  # text`` promises what the line prints.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [
    ROOT / "README.md",
    *sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.relative_to(DOCS).parts),
]


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_page_examples_run_and_print_their_comments(page: Path) -> None:
    if not page.exists():
        pytest.skip(f"{page.name} is not in this checkout")
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    if page.name == "README.md":
        assert blocks, "README.md has no python example"
    imported = re.findall(r"^(?:import|from) (\w+)", "\n".join(blocks), flags=re.M)
    missing = sorted({name for name in imported if importlib.util.find_spec(name) is None})
    if missing:  # a page about a peer (torch) without the peer installed
        pytest.skip(f"{page.name}'s examples import {missing}, not installed here")
    namespace: dict[str, object] = {"__name__": "__main__"}
    for block in blocks:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(block, str(page), "exec"), namespace)
        promised = re.findall(r"print\(.*\)\s+# (.*)", block)
        assert printed.getvalue().strip().splitlines() == promised
