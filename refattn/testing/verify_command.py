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
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.progress import TaskID
from rich.table import Table

from refattn.backends import BACKENDS, get, selected
from refattn.cli import comma_separated
from refattn.console import make_console, progress_bar, write_json
from refattn.testing.precision import DTYPES
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
        type=_count(least=1),
        help="problems per case (sets --problems; with --candidate, Hypothesis examples per "
        "dtype, default 200)",
    )
    parser.add_argument(
        "--problems", type=_count(least=1), default=100, help="attention problems per case"
    )
    parser.add_argument(
        "--sequences", type=_count(least=0), default=30, help="chunked sequences per case (0: none)"
    )
    parser.add_argument(
        "--histories", type=_count(least=0), default=10,
        help="decoding histories per cache kind and case (0: none)",
    )  # fmt: skip
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


def _count(*, least: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``least``, or an error saying so."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = least - 1
        if n < least:
            kind = "a positive integer" if least == 1 else f"an integer >= {least}"
            raise argparse.ArgumentTypeError(f"must be {kind}; got {text!r}")
        return n

    return parse


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the command as parsed; its exit code. Every argument is checked before anything
    runs, and a wrong one ends the command with its name, the accepted values and what was
    given (exit code 2), so a run never passes for having checked nothing."""
    backends, dtypes = _backends_and_dtypes(args, parser)
    features = comma_separated(args.features)
    if features is not None and not args.candidate:
        parser.error("argument --features: only with --candidate (the self-check draws all)")
    if args.json:
        _check_writable(parser, args.json)
    if args.candidate:
        fn = _import_candidate(parser, args.candidate)
        from refattn.testing.drawing import resolve_features

        try:
            resolve_features(features)
        except ValueError as exc:
            parser.error(f"argument --features: {exc}")
        return check_candidate(
            args.candidate, backends=backends or ["numpy"], dtypes=dtypes,
            examples=args.examples or 200, features=features, seed=args.seed,
            json_path=args.json, fn=fn,
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
    fn: Callable[..., Any] | None = None,
) -> int:
    """``refattn verify --candidate module:function``: check_attention on each backend."""
    from refattn.testing import check_attention

    console = console or make_console()
    fn = fn or import_target(target)
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
        if report.unavailable:
            console.print(f"{report.name} on {report.backend}: {report.verdict}", highlight=False)
            continue
        console.print(report_table(report))
        for line in report.notes():
            console.print(line.replace("features=", "--features"), highlight=False, markup=False)
        for i, failure in enumerate(report.failures, 1):
            console.print(
                f"\nfailure class {i} of {len(report.failures)}: {failure.summary()}\n{failure}",
                highlight=False, markup=False, soft_wrap=True,
            )  # fmt: skip
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


def _backends_and_dtypes(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[list[str] | None, list[str] | None]:
    """``--backends`` and ``--dtypes`` checked: known names, at least one, and every dtype
    asked for present on every backend asked for (none is silently left out)."""
    backends, dtypes = comma_separated(args.backends), comma_separated(args.dtypes)
    for option, names, known in (("--backends", backends, tuple(BACKENDS)),
                                 ("--dtypes", dtypes, DTYPES)):  # fmt: skip
        if names is None:
            continue
        unknown = [n for n in names if n not in known]
        if not names or unknown:
            given = f"unknown {unknown}" if unknown else f"none ({getattr(args, option[2:])!r})"
            parser.error(f"argument {option}: must name some of {', '.join(known)}; got {given}")
    for backend in selected(backends or (["numpy"] if args.candidate else None)):
        reason = backend.unavailable_reason()
        if reason:
            if backends is not None:  # asked for by name: it must run
                parser.error(f"argument --backends: {backend.name} cannot run here: {reason}")
            continue
        has = [d for device in backend.devices() for d in backend.dtypes(device)]
        missing = [d for d in dtypes or () if d not in has]
        if missing:
            parser.error(
                f"argument --dtypes: {backend.name} has no {', '.join(missing)} (it has "
                f"{', '.join(dict.fromkeys(has))}); name the backends that do with --backends"
            )
    return backends, dtypes


def _check_writable(parser: argparse.ArgumentParser, path: str) -> None:
    """``--json PATH`` checked before the run, so a long run does not end in a write error."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        parser.error(f"argument --json: {path!r} is a directory; expected a file to write")
    if not os.path.isdir(folder):
        parser.error(f"argument --json: cannot write {path!r}: its folder does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        parser.error(f"argument --json: cannot write {path!r}: permission denied")


def _import_candidate(parser: argparse.ArgumentParser, target: str) -> Callable[..., Any]:
    """The candidate imported, or one line saying why it could not be."""
    try:
        return import_target(target)
    except Exception as exc:  # an import error, a missing name, a module that raises
        parser.error(f"argument --candidate: cannot import {target!r}: {type(exc).__name__}: {exc}")


def import_target(target: str) -> Callable[..., Any]:
    """``module:function`` (or ``module.function``) imported, modules found from the current
    directory first, as ``python -m`` finds them."""
    module_name, sep, attr = target.partition(":")
    if not sep:
        module_name, _, attr = target.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"candidate must look like module:function; got {target!r}")
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"{module_name} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"candidate {target!r} is not callable")
    return obj
