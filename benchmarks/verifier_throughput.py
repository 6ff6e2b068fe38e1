"""How many problems a second the verifier checks, before and after a change, in one run.

Checks a correct NumPy kernel (``CORRECT_KERNELS["textbook"]``) with
``check_attention`` and the default features, in each dtype, for a fixed
number of examples and seeds, and splits the wall time four ways:

- candidate: the kernel itself (``fn`` wrapped in a timer);
- allowance: the spec's allowance, the oracle and the spec in several
  rounding orders (``refattn.testing.verdict.allowance``, replaced by a timing
  wrapper wherever ``refattn`` binds it: ``judge`` reads it from its module's
  globals);
- build: making the float64 problem arrays from a spec
  (``refattn.testing.attention_check.build_problem``, patched the same way);
- search: the rest, the wall time less those three. Hypothesis drawing and
  shrinking, rounding the arrays, moving them to the backend, comparing, the
  report's bookkeeping.

Timers are exclusive: time spent in one timed function that another timed
function calls counts once, for the inner one.

The same measurement runs on two versions of ``refattn``. The "before" one
runs in a temporary ``git worktree`` of ``--before`` (a git revision, removed
afterwards), the "after" one in the working tree. Each runs in a subprocess
whose ``PYTHONPATH`` puts that version first; the subprocess checks that every
``refattn`` module it loaded comes from there. The runs alternate (before,
after, before, after, ...), ``--repeats`` times each, and the table keeps the
fastest of each, so background load hurts both alike. A short audited run
then counts, with ``sys.setprofile``, every call of the timed functions,
however they are reached, against the calls the timers saw.

A measurement that checked no problem, or whose check failed, is not a
throughput: the script exits non-zero.

    python benchmarks/verifier_throughput.py --before HEAD --examples 200 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.abc
import importlib.util
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import FrameType
from typing import Any

import tomllib
from rich.console import Console
from rich.table import Table

SCRIPT = Path(__file__).resolve()
#: The timed parts of a check, each with where its function is found.
TIMED = {
    "allowance": ("refattn.testing.verdict", "allowance"),
    "build": ("refattn.testing.attention_check", "build_problem"),
}
SPLIT = ("candidate", "allowance", "build", "search")
WARMUP_EXAMPLES = 5  #: per dtype, before timing: imports, first calls, Hypothesis' setup
AUDIT_EXAMPLES = 20  #: per dtype, for the run that counts every call of the timed functions


class MissingName(LookupError):
    """A name this benchmark needs is not in the version of refattn it runs on."""


@dataclass
class Row:
    """One version's check in one dtype: problems, wall seconds, and where they went."""

    dtype: str
    problems: int
    seconds: float
    split: dict[str, float | None]  #: seconds per part of SPLIT; None where not timed
    passed: bool
    scores: int | None = None  #: B * Hq * Sq * Sk summed over the problems; None if unread

    @property
    def rate(self) -> float:
        return self.problems / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Timers:
    """Exclusive seconds and calls per name, for functions wrapped by :meth:`wrap`."""

    seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    _nested: list[float] = field(default_factory=list)  #: timed seconds inside each open call

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._nested.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.seconds[name] += elapsed - self._nested.pop()
                self.calls[name] += 1
                if self._nested:
                    self._nested[-1] += elapsed

        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


# ----------------------------------------------------------------------------- the worker


def lookup(module_name: str, attribute: str) -> Any:
    """``module_name.attribute`` in the refattn being measured, or MissingName saying why."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise MissingName(f"{module_name} cannot be imported: {exc}") from exc
    if not hasattr(module, attribute):
        raise MissingName(f"{module_name} has no attribute {attribute!r}")
    return getattr(module, attribute)


def patch_everywhere(original: Any, replacement: Any) -> list[str]:
    """Rebind every refattn module attribute that is ``original`` to ``replacement``."""
    places = []
    for name, module in list(sys.modules.items()):
        if name != "refattn" and not name.startswith("refattn."):
            continue
        for attribute, value in list(vars(module).items()):
            if value is original:
                setattr(module, attribute, replacement)
                places.append(f"{name}.{attribute}")
    return sorted(places)


class PackageDirFinder(importlib.abc.MetaPathFinder):
    """Finds the packages a version's pyproject maps to other folders (``package-dir``)."""

    def __init__(self, folders: dict[str, Path]) -> None:
        self.folders = folders

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        init = folder / "__init__.py"
        return importlib.util.spec_from_file_location(
            fullname, init, submodule_search_locations=[str(folder)]
        )


def follow_package_dirs(root: Path) -> None:
    """Import the version under root's packages from its own folders, before anything else.

    PYTHONPATH alone does not do it: ``refattn.backends`` lives in ``backends/``
    (``[tool.setuptools.package-dir]``), and the editable install's finder maps
    it to the main checkout's folder, wherever ``refattn`` itself came from.
    """
    with open(root / "pyproject.toml", "rb") as f:
        setuptools = tomllib.load(f).get("tool", {}).get("setuptools", {})
    folders = {name: root / folder for name, folder in setuptools.get("package-dir", {}).items()}
    sys.meta_path.insert(0, PackageDirFinder({k: v for k, v in folders.items() if k}))


def check_origin(root: Path) -> str:
    """``refattn.__file__``, after checking that every loaded refattn module is under root."""
    import refattn

    strays = [
        f"{name} from {module.__file__}"
        for name, module in list(sys.modules.items())
        if (name == "refattn" or name.startswith("refattn."))
        and getattr(module, "__file__", None)
        and not Path(module.__file__ or "").resolve().is_relative_to(root)
    ]
    if strays:
        raise RuntimeError(f"refattn modules not from {root}: {strays[:5]}; PYTHONPATH did not win")
    return str(refattn.__file__)


@dataclass
class Setup:
    """What the worker checks with, found in the refattn it runs on."""

    check: Callable[..., Any]
    kernel: Callable[..., Any]  #: the timed candidate
    originals: dict[str, Any]  #: name -> the function before it was wrapped
    patched: dict[str, list[str]]
    notes: list[str]
    timers: Timers


def prepare() -> Setup:
    """Find the check, the kernel and the timed functions; wrap them; note what is missing."""
    check = lookup("refattn.testing", "check_attention")
    kernels = lookup("refattn.testing.known_bugs", "CORRECT_KERNELS")
    if "textbook" not in kernels:
        raise MissingName(f"CORRECT_KERNELS has no 'textbook'; it has {sorted(kernels)}")
    timers, notes = Timers(), []
    originals: dict[str, Any] = {"candidate": kernels["textbook"]}
    patched: dict[str, list[str]] = {}
    for name, (module_name, attribute) in TIMED.items():
        try:
            originals[name] = lookup(module_name, attribute)
        except MissingName as missing:
            notes.append(f"{name} not timed (its time counts as search): {missing}")
            continue
        patched[name] = patch_everywhere(originals[name], timers.wrap(name, originals[name]))
    if "on_example" not in inspect.signature(check).parameters:
        notes.append("check_attention has no on_example: problems counted as candidate calls")
    kernel = timers.wrap("candidate", originals["candidate"])
    return Setup(check, kernel, originals, patched, notes, timers)


def scores_of(outcomes: list[Any]) -> int | None:
    """B * Hq * Sq * Sk summed over the outcomes' specs: how big the drawn problems were."""
    names = ("batch", "q_heads", "q_len", "k_len")
    if not outcomes:
        return None
    try:
        return sum(math.prod(getattr(o.spec, name) for name in names) for o in outcomes)
    except AttributeError:
        return None


def run_check(setup: Setup, dtype: str, examples: int, seed: int) -> tuple[list[Any], int, bool]:
    """One ``check_attention`` in one dtype: (the outcomes, problems checked, passed)."""
    outcomes: list[Any] = []
    options: dict[str, Any] = {"dtypes": (dtype,), "max_examples": examples, "seed": seed}
    counted = "on_example" in inspect.signature(setup.check).parameters
    if counted:
        options["on_example"] = outcomes.append
    calls_before = setup.timers.calls["candidate"]
    report = setup.check(setup.kernel, **options)
    problems = len(outcomes) if counted else setup.timers.calls["candidate"] - calls_before
    return outcomes, problems, bool(report.passed)


def measure_dtype(setup: Setup, dtype: str, examples: int, seeds: Sequence[int]) -> Row:
    """Wall time of the check over all seeds in one dtype, split by the timers."""
    setup.timers.reset()
    outcomes: list[Any] = []
    problems, passed = 0, True
    start = time.perf_counter()
    for seed in seeds:
        seen, checked, ok = run_check(setup, dtype, examples, seed)
        outcomes, problems, passed = outcomes + seen, problems + checked, passed and ok
    seconds = time.perf_counter() - start
    split: dict[str, float | None] = {
        name: setup.timers.seconds[name] if name in setup.originals else None for name in SPLIT[:-1]
    }
    split["search"] = seconds - sum(t for t in split.values() if t is not None)
    return Row(dtype, problems, seconds, split, passed, scores_of(outcomes))


def audit(setup: Setup, dtypes: Sequence[str], examples: int, seed: int) -> dict[str, Any]:
    """Every call of each timed function (seen by ``sys.setprofile``) against the timers'."""
    codes = {getattr(fn, "__code__", None): name for name, fn in setup.originals.items()}
    seen: Counter[str] = Counter()

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code in codes:
            seen[codes[frame.f_code]] += 1

    setup.timers.reset()
    sys.setprofile(profile)
    threading.setprofile(profile)  # a check that runs the candidate in a thread is seen too
    try:
        for dtype in dtypes:
            run_check(setup, dtype, examples, seed)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return {
        name: {"calls": seen[name], "timed": setup.timers.calls[name]} for name in setup.originals
    }


def measure(
    root: Path, dtypes: Sequence[str], examples: int, seeds: Sequence[int]
) -> dict[str, Any]:
    """The worker's whole measurement, as the JSON it prints."""
    try:
        refattn_file = check_origin(root)
        setup = prepare()
        check_origin(root)  # prepare imported more of refattn
        for dtype in dtypes:
            run_check(setup, dtype, WARMUP_EXAMPLES, seeds[0] + 1)
        rows = [measure_dtype(setup, dtype, examples, seeds) for dtype in dtypes]
        calls = audit(setup, dtypes, min(examples, AUDIT_EXAMPLES), seeds[0])
    except MissingName as missing:
        return {"error": f"missing in this version: {missing}"}
    except Exception:
        return {"error": traceback.format_exc()}
    return {
        "refattn_file": refattn_file,
        "rows": [asdict(row) for row in rows],
        "patched": setup.patched,
        "audit": calls,
        "notes": setup.notes,
    }


def worker(args: argparse.Namespace) -> int:
    """Measure the refattn on sys.path; one JSON object on stdout, nothing else there."""
    root = Path(args.root).resolve()
    follow_package_dirs(root)
    with contextlib.redirect_stdout(sys.stderr):
        result = measure(root, args.dtypes, args.examples, args.seeds)
    print(json.dumps(result))
    return 1 if "error" in result else 0


# ----------------------------------------------------------------------------- the parent


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


@contextlib.contextmanager
def worktree(repo: Path, commit: str) -> Iterator[Path]:
    """A temporary checkout of ``commit``, removed afterwards."""
    scratch = Path(tempfile.mkdtemp(prefix="verifier-throughput-"))
    path = scratch / "before"
    try:
        git(repo, "worktree", "add", "--detach", "--quiet", str(path), commit)
        yield path
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(path)])
        shutil.rmtree(scratch, ignore_errors=True)
        subprocess.run(["git", "-C", str(repo), "worktree", "prune"])


def run_worker(root: Path, label: str, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement of the refattn under ``root``, in a subprocess; exits on any failure."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    command = [
        sys.executable,
        str(SCRIPT),
        "--worker",
        "--root",
        str(root),
        "--examples",
        str(args.examples),
        "--seeds",
        *map(str, args.seeds),
        "--dtypes",
        *args.dtypes,
    ]
    with tempfile.TemporaryDirectory() as cwd:  # Hypothesis writes .hypothesis/ where it runs
        done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    try:
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        sys.exit(f"{label}: the worker printed no result (exit {done.returncode}):\n{done.stderr}")
    if "error" in result:
        sys.exit(f"{label}: {result['error']}")
    if not Path(result["refattn_file"]).resolve().is_relative_to(root.resolve()):
        sys.exit(f"{label}: refattn came from {result['refattn_file']}, not from {root}")
    return result


def split_cell(row: Row, part: str) -> str:
    seconds = row.split[part]
    if seconds is None:
        return "n/a"
    share = 100 * seconds / row.seconds if row.seconds > 0 else 0.0
    return f"{share:.0f}% {seconds:.2f} s"


def table(best: dict[str, list[Row]]) -> Table:
    out = Table(title="check_attention on CORRECT_KERNELS['textbook'], fastest run of each")
    for name in ("version", "dtype"):
        out.add_column(name)
    for name in ("problems", "mean B·Hq·Sq·Sk", "seconds", "problems/s", *SPLIT):
        out.add_column(name, justify="right")
    for version, rows in best.items():
        for row in rows:
            size = (
                f"{row.scores / row.problems:.0f}"
                if row.scores is not None and row.problems
                else "n/a"
            )
            cells = [split_cell(row, part) for part in SPLIT]
            numbers = [str(row.problems), size, f"{row.seconds:.2f}", f"{row.rate:.1f}"]
            out.add_row(version, row.dtype, *numbers, *cells)
    return out


def audit_table(results: dict[str, list[dict[str, Any]]], labels: dict[str, str]) -> Table:
    """Whether the timers saw every call of each timed function, and where each was wrapped."""
    out = Table(title=f"every call of the timed functions, {AUDIT_EXAMPLES} problems per dtype")
    for name in ("version", "part", "timed / all calls", "wrapped at"):
        out.add_column(name)
    for version, runs in results.items():
        for name, counts in runs[0]["audit"].items():
            seen = f"{counts['timed']} / {counts['calls']}"
            if counts["timed"] != counts["calls"]:
                seen = f"[bold red]{seen} MISSED[/]"
            where = ", ".join(p.removeprefix("refattn.") for p in runs[0]["patched"].get(name, []))
            out.add_row(labels[version], name, seen, where or "the checked fn")
    return out


def fastest(results: list[dict[str, Any]]) -> list[Row]:
    """Per dtype, the run with the most problems a second."""
    runs = [Row(**row) for result in results for row in result["rows"]]
    best: dict[str, Row] = {}
    for row in runs:
        if row.dtype not in best or row.rate > best[row.dtype].rate:
            best[row.dtype] = row
    return list(best.values())


def measure_both(
    repo: Path, commit: str, args: argparse.Namespace, console: Console
) -> dict[str, list[dict[str, Any]]]:
    """Before and after, alternating, ``args.repeats`` times each."""
    results: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with worktree(repo, commit) as before_root:
        roots = {"before": before_root, "after": repo}
        for repeat in range(args.repeats):
            for version, root in roots.items():
                result = run_worker(root, version, args)
                results[version].append(result)
                times = ", ".join(
                    f"{row['dtype']} {row['problems']} in {row['seconds']:.2f} s"
                    for row in result["rows"]
                )
                console.print(f"{version}, run {repeat + 1} of {args.repeats}: {times}")
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="HEAD", help="git revision to compare against")
    parser.add_argument("--examples", type=int, default=200, help="problems per dtype and seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16"])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each version")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("examples", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def after_over_before(before: list[Row], after: list[Row]) -> dict[str, float | None]:
    rates = {row.dtype: row.rate for row in before}
    return {
        row.dtype: row.rate / rates[row.dtype] if rates.get(row.dtype) else None for row in after
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    # rich directly, not refattn.console: the parent must not depend on the refattn it measures
    console = Console(width=None if sys.stdout.isatty() else 160)
    repo = Path(git(SCRIPT.parent, "rev-parse", "--show-toplevel"))
    commit = git(repo, "rev-parse", "--verify", f"{args.before}^{{commit}}")
    changed = bool(git(repo, "status", "--porcelain", "--", "refattn", "backends"))
    labels = {
        "before": f"before ({commit[:7]})",
        "after": "after (working tree)",
    }
    results = measure_both(repo, commit, args, console)
    best = {labels[version]: fastest(runs) for version, runs in results.items()}
    console.print(table(best))
    ratios = after_over_before(best[labels["before"]], best[labels["after"]])
    shown = (f"{d} {r:.2f}x" if r is not None else f"{d} n/a" for d, r in ratios.items())
    console.print("after / before, problems/s: " + ", ".join(shown))
    console.print(audit_table(results, labels))
    if changed:
        console.print("The working tree has uncommitted changes to refattn/ or backends/.")
    for version, runs in results.items():
        for note in runs[0]["notes"]:
            console.print(f"[bold]{labels[version]}[/]: {note}")
    if args.json:
        write_rows(args, commit, changed, results, best, ratios)
    return verdict(results, labels, console)


def write_rows(
    args: argparse.Namespace,
    commit: str,
    changed: bool,
    results: dict[str, list[dict[str, Any]]],
    best: dict[str, list[Row]],
    ratios: dict[str, float | None],
) -> None:
    data = {
        "before": args.before,
        "before_commit": commit,
        "after": "working tree",
        "after_changed": changed,
        "after_head": git(SCRIPT.parent, "rev-parse", "HEAD"),
        "examples": args.examples,
        "seeds": args.seeds,
        "repeats": args.repeats,
        "rows": [
            {"version": v, **asdict(row), "problems_per_s": row.rate}
            for v, rows in best.items()
            for row in rows
        ],
        "ratio_after_before": ratios,
        "audit": {version: runs[0]["audit"] for version, runs in results.items()},
        "patched": {version: runs[0]["patched"] for version, runs in results.items()},
        "notes": {version: runs[0]["notes"] for version, runs in results.items()},
    }
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)


def verdict(
    results: dict[str, list[dict[str, Any]]], labels: dict[str, str], console: Console
) -> int:
    """Non-zero where any run checked nothing or its check failed: that is not a throughput."""
    bad = [
        f"{labels[version]}, run {repeat + 1}, {row['dtype']}: "
        f"{row['problems']} problems, passed={row['passed']}"
        for version, runs in results.items()
        for repeat, result in enumerate(runs)
        for row in result["rows"]
        if row["problems"] == 0 or not row["passed"]
    ]
    for line in bad:
        console.print(f"[bold red]not a throughput[/]: {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
