"""``refattn verify``: the self-check of the spec, or a check of someone else's kernel.

Without ``--candidate`` it runs the self-check
(:mod:`refattn.testing.selfcheck`): the spec on every available backend and
dtype against the loop oracle. With ``--candidate module:function`` it runs
the public verifier, :func:`refattn.testing.check_attention`, on that function
on each named backend. This module declares the command's arguments and
prints; neither system owns it.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.progress import TaskID
from rich.table import Table

from refattn.backends import get
from refattn.cli import comma_separated
from refattn.console import make_console, progress_bar, write_json
from refattn.testing.report import Report

HELP = "run the spec on every available backend and dtype against the loop oracle"
DESCRIPTION = (
    "Check the spec on every available backend and dtype against the independent loop oracle, "
    "or, with --candidate, check someone else's attention function with check_attention."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``refattn verify``."""
    parser.add_argument(
        "--examples",
        type=int,
        help="problems per case (sets --problems; with --candidate, Hypothesis examples per "
        "dtype, default 200)",
    )
    parser.add_argument("--problems", type=int, default=100, help="attention problems per case")
    parser.add_argument("--sequences", type=int, default=30, help="chunked sequences per case")
    parser.add_argument(
        "--histories", type=int, default=10, help="decoding histories per cache kind and case"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--backends",
        help="comma-separated backends to run (default: REFATTN_BACKENDS or all; "
        "with --candidate, numpy)",
    )
    parser.add_argument(
        "--dtypes", help="comma-separated dtypes (default: all; with --candidate, float32)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--candidate",
        metavar="MODULE:FUNCTION",
        help="check a third-party attention function fn(problem) with check_attention "
        "instead of the spec (e.g. refattn.testing.adapters:torch_sdpa)",
    )
    parser.add_argument(
        "--features", help="with --candidate: comma-separated features to draw (default: all)"
    )


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the command as parsed; its exit code."""
    backends, dtypes = comma_separated(args.backends), comma_separated(args.dtypes)
    if args.candidate:
        return check_candidate(
            args.candidate, backends=backends or ["numpy"], dtypes=dtypes,
            examples=args.examples or 200, features=comma_separated(args.features),
            seed=args.seed, json_path=args.json,
        )  # fmt: skip
    from refattn.testing.selfcheck.run import main

    return main(
        problems=args.examples or args.problems, sequences=args.sequences,
        histories=args.histories, seed=args.seed, dtypes=dtypes, backends=backends,
        json_path=args.json,
    )  # fmt: skip


def check_candidate(
    target: str,
    *,
    backends: list[str],
    dtypes: Sequence[str] | None,
    examples: int,
    features: list[str] | None,
    seed: int | None,
    json_path: str | None = None,
    console: Console | None = None,
) -> int:
    """``refattn verify --candidate module:function``: check_attention on each backend."""
    from refattn.testing import check_attention

    console = console or make_console()
    fn = import_target(target)
    reports = []
    with progress_bar(console) as bar:
        for name in backends:
            backend = get(name)
            if not backend.available():
                console.print(f"{name}: skipped ({backend.unavailable_reason()})")
                continue
            kinds = tuple(dtypes or ("float32",))
            task = bar.add_task(f"{target} on {name}", total=examples * len(kinds))

            def advance(_: object, task: TaskID = task) -> None:
                bar.update(task, advance=1)

            report = check_attention(
                fn, backend=name, dtypes=kinds, features=features, max_examples=examples,
                seed=seed, on_example=advance,
            )  # fmt: skip
            bar.update(task, completed=examples * len(kinds))
            reports.append(report)
    for report in reports:
        console.print(report_table(report))
        for dtype in report.dtypes:
            supported, tried = report.supported(dtype), report.tried(dtype)
            if supported < tried / 4:
                console.print(
                    f"{dtype}: only {supported} of {tried} problems were supported; "
                    "--features narrows the draws to what the candidate expresses",
                    highlight=False,
                )
        for failure in report.failures:
            console.print(str(failure), highlight=False, markup=False, soft_wrap=True)
    if json_path:
        write_json(json_path, {"candidate": target, "reports": [r.to_dict() for r in reports]})
    passed = bool(reports) and all(r.passed for r in reports)
    console.print(f"{target}: {'passed' if passed else 'FAILED'}", highlight=False)
    return 0 if passed else 1


def report_table(report: Report) -> Table:
    """Per dtype and feature: problems tried, passed, failed and unsupported."""
    verdict = "passed" if report.passed else "[bold red]FAILED[/]"
    table = Table(
        title=f"{report.name} on {report.backend} ({report.device}): {verdict}",
        title_justify="left",
    )
    table.add_column("dtype")
    table.add_column("feature")
    for name in ("tried", "passed", "failed", "unsupported"):
        table.add_column(name, justify="right")
    for dtype, per in report.counts.items():
        for tag, c in sorted(per.items(), key=lambda item: (item[0] != "all", item[0])):
            failed = f"[bold red]{c.failed}[/]" if c.failed else "0"
            table.add_row(dtype, tag, str(c.tried), str(c.passed), failed, str(c.unsupported))
    return table


def import_target(target: str) -> Callable[..., Any]:
    """``module:function`` (or ``module.function``) imported."""
    module_name, sep, attr = target.partition(":")
    if not sep:
        module_name, _, attr = target.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"candidate must look like module:function; got {target!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"candidate {target!r} is not callable")
    return obj
