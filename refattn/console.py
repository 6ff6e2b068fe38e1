"""What the ``refattn`` commands print with: a console, a progress bar and a JSON file.

``refattn verify`` and ``refattn bench`` both print rich tables that must stay
whole when the output is piped into a file or captured by a test, show a
transient progress bar while they work, and can write their results as JSON.
Neither command owns these, so they live here.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def make_console() -> Console:
    """A console that keeps tables whole when output is piped or captured."""
    return Console(width=None if sys.stdout.isatty() else 160, file=sys.stdout)


def progress_bar(console: Console) -> Progress:
    """A bar that names the current task, counts done of total and disappears when done."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def write_json(path: str, data: dict[str, Any]) -> None:
    """``data`` as indented JSON; NumPy scalars and other numbers are written as floats."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=float)
