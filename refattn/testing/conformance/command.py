"""``refattn conformance``: every installed attention kernel and KV cache, checked against the spec.

It finds what is installed among the implementations the adapter modules
list (:mod:`refattn.testing.conformance.registry`), runs each over the
features it declares in each of its dtypes, measures each library's
conventions with its probe, and prints the matrix: one row per
implementation and dtype, passed, failed, unsupported (with the main
reasons) or unavailable (with why). It exits 1 when a failure is explained
by no known defect, or when nothing at all was checked.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import TaskID
from rich.table import Table

from refattn.cli import comma_separated
from refattn.console import make_console, progress_bar, write_json
from refattn.testing.conformance import registry
from refattn.testing.conformance.implementations import Defect, Implementation
from refattn.testing.conformance.run import (
    Row,
    check_row,
    probe_conventions,
    results,
    unavailable_reason,
)

HELP = "check every installed attention kernel and KV cache against the spec: the matrix"
DESCRIPTION = (
    "Find the attention implementations and KV caches installed (PyTorch, transformers, "
    "ONNX Runtime, onnx.reference, JAX, and on a GPU flash-attn and FlashInfer), check each "
    "over the features it declares in each of its dtypes, measure each library's conventions, "
    "and print the matrix. Exits 1 on a failure no known defect explains."
)
#: Problems (or cache histories) per implementation and dtype unless ``--examples`` says.
DEFAULT_EXAMPLES = 50


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1 (0 problems would check nothing).

    >>> positive("3")
    3
    """
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (0 would check nothing); got {n}")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``refattn conformance``."""
    parser.add_argument("--examples", type=positive, default=DEFAULT_EXAMPLES,
                        help="problems (cache histories) per implementation and dtype "
                        f"(default {DEFAULT_EXAMPLES})")  # fmt: skip
    parser.add_argument("--only", metavar="NAME",
                        help="comma-separated implementations (a name, a part of one, or a "
                        "library) to run; default all")  # fmt: skip
    parser.add_argument("--dtypes", help="comma-separated dtypes to run (default: each "
                        "implementation's own)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the matrix as JSON to PATH")
    parser.add_argument("--list", action="store_true",
                        help="list the implementations and whether each can run here; check "
                        "nothing")  # fmt: skip


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``refattn conformance`` with parsed ``args``; the exit code."""
    console = make_console()
    try:
        chosen = registry.select(registry.implementations(), comma_separated(args.only))
        dtypes = comma_separated(args.dtypes)
        if dtypes is not None and not dtypes:
            raise ValueError("--dtypes names no dtype: nothing would be checked")
    except ValueError as exc:
        parser.error(str(exc))
    if args.list:
        console.print(listing(chosen))
        return 0
    return conformance(chosen, examples=args.examples, seed=args.seed, dtypes=dtypes,
                       json_path=args.json, console=console)  # fmt: skip


def conformance(
    chosen: Sequence[Implementation],
    *,
    examples: int,
    seed: int,
    dtypes: Sequence[str] | None = None,
    json_path: str | None = None,
    console: Console | None = None,
    known: Sequence[Defect] | None = None,
) -> int:
    """Check ``chosen`` and print the matrix; 0 when every failure is a known defect."""
    console = console or make_console()
    known = registry.defects() if known is None else known
    cases = [(i, d) for i in chosen for d in i.dtypes if dtypes is None or d in dtypes]
    if not cases:
        console.print("nothing to check: no implementation has the dtypes asked for")
        return 1
    start = time.perf_counter()
    rows: list[Row] = []
    with progress_bar(console) as bar:
        for implementation, dtype in cases:
            task = bar.add_task(f"{implementation.name}, {dtype}", total=examples)

            def advance(_: object, task: TaskID = task) -> None:
                bar.update(task, advance=1)

            rows.append(check_row(implementation, dtype, examples=examples, seed=seed,
                                  known=known, on_example=advance))  # fmt: skip
            bar.remove_task(task)
        probing = bar.add_task("measuring conventions", total=len(chosen))
        conventions = {}
        for implementation in chosen:
            measured = probe_conventions(implementation)
            if measured:
                conventions[implementation.name] = measured
            bar.update(probing, advance=1)
    seconds = time.perf_counter() - start
    console.print(matrix(rows))
    for line in failure_lines(rows):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    code, verdict = exit_code(rows)
    console.print(f"{verdict} in {seconds:.0f} s", highlight=False)
    if json_path:
        shown = [d for d in known if d.implementation in {i.name for i in chosen}]
        data = results(rows, conventions, shown, examples=examples, seed=seed, seconds=seconds,
                       implementations=chosen)  # fmt: skip
        write_json(json_path, data)
    return code


def exit_code(rows: Sequence[Row]) -> tuple[int, str]:
    """1 when some failure no defect explains, or nothing at all was checked; and the summary."""
    count = {v: sum(r.verdict == v for r in rows) for v in ("passed", "failed", "unsupported",
                                                            "unavailable")}  # fmt: skip
    unexplained = sum(len(r.unexplained) for r in rows)
    known = sum(len(r.failures) for r in rows) - unexplained
    summary = (
        f"{len(rows)} rows: {count['passed']} passed, {count['failed']} failed ({known} "
        f"failure classes explained by known defects, {unexplained} not), "
        f"{count['unsupported']} unsupported, {count['unavailable']} unavailable"
    )
    checked = count["passed"] + count["failed"]
    if checked == 0:
        return 1, summary + "; nothing was checked"
    return (1 if unexplained else 0), summary


def matrix(rows: Sequence[Row]) -> Table:
    """The matrix: one row per implementation and dtype."""
    table = Table(title="refattn conformance", show_lines=False)
    for name in ("implementation", "version", "dtype", "verdict", "checked", "features", "notes"):
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(row.implementation, row.version or "-", row.dtype, _verdict(row),
                      f"{row.supported}/{row.tried}" if row.tried else "-",
                      feature_summary(row.features), _notes(row))  # fmt: skip
    return table


def feature_summary(features: dict[str, str]) -> str:
    """Per-feature verdicts, grouped: ``"passed 9; failed: window; unsupported: lse"``.

    >>> feature_summary({"causal": "passed", "gqa": "passed", "lse": "unsupported"})
    'passed 2; unsupported: lse'
    """
    groups: dict[str, list[str]] = {}
    for feature, verdict in sorted(features.items()):
        groups.setdefault(verdict, []).append(feature)
    parts = [f"passed {len(groups.pop('passed'))}"] if "passed" in groups else []
    for verdict in ("failed", "unsupported", "not drawn"):
        if verdict in groups:
            parts.append(f"{verdict}: {', '.join(groups[verdict])}")
    return "; ".join(parts)


def failure_lines(rows: Sequence[Row]) -> list[str]:
    """Each failure class, with its classification: the known defect, or unexplained."""
    lines = []
    for row in rows:
        for failure in row.failures:
            why = f"known defect: {failure.known}" if failure.known else "UNEXPLAINED"
            lines.append(f"{row.implementation}, {failure.summary}\n    {why}")
    return lines


def listing(chosen: Sequence[Implementation]) -> Table:
    """The implementations, their dtypes and whether each can run here."""
    table = Table(title="refattn conformance --list")
    for name in ("implementation", "library", "kind", "dtypes", "here"):
        table.add_column(name, overflow="fold")
    for implementation in chosen:
        why = unavailable_reason(implementation)
        here = f"unavailable: {why}" if why else "runs"
        table.add_row(implementation.name, implementation.library, implementation.kind,
                      ", ".join(implementation.dtypes), here)  # fmt: skip
    return table


def _verdict(row: Row) -> str:
    if row.verdict == "failed" and not row.unexplained:
        return "failed (known)"
    return row.verdict


def _notes(row: Row) -> Any:
    if row.unavailable:
        return row.unavailable
    notes = [_short(reason) for reason in row.reasons]
    notes += [f"defect: {_short(f.known)}" for f in row.failures if f.known]
    notes += [f"UNEXPLAINED: {_short(f.summary.split(':')[0])}" for f in row.unexplained]
    return "\n".join(notes)


def _short(text: str, most: int = 70) -> str:
    """``text`` cut to ``most`` characters, with an ellipsis where it was cut.

    >>> _short("a" * 80, 10)
    'aaaaaaaaa…'
    """
    return text if len(text) <= most else text[: most - 1] + "…"
