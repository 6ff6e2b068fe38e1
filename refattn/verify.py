"""``refattn verify``: the spec on every available backend and dtype, against the loop oracle.

Properties per (backend, device, dtype):

* ``= oracle``: random attention problems, every option drawn, compared with
  the independent float64 loop oracle under refattn's tolerance rules;
* ``blockwise = oracle`` and ``split-KV = oracle``: the same problems through
  the online-softmax form with random block sizes, and through split-KV
  decoding with a random number of splits;
* ``decode = full``: random sequences decoded in random chunks, compared with
  the oracle's full causal pass;
* ``cache: <kind>``: random rows fed through each KV cache kind in ragged
  steps, each row compared with the oracle's full causal pass over its history
  (windowed with sinks for the ring; within its stated bound for int8).

Problems come from a seeded NumPy generator, so a run is repeatable and a
failing row names a problem that can be rebuilt from its spec.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from refattn.backends import BACKENDS, Case, selected
from refattn.backends import cases as all_cases
from refattn.blockwise import attention_blockwise, attention_split_kv
from refattn.caches import KINDS
from refattn.testing.agreement import (
    Agreement,
    Oracle,
    measure,
    measure_decode,
    rounded_arrays,
    share,
)
from refattn.testing.decoding import Step, make_cache, measure_cache, random_steps
from refattn.testing.problems import ProblemSpec, build_problem, random_spec
from refattn.testing.report import Report


@dataclass
class Row:
    """One line of the verify table."""

    case: Case
    check: str
    cases: int = 0
    worst_out: Agreement | None = None  # the largest error / allowed on the output
    used: float = 0.0  # the largest share of the allowance used, output or lse
    failures: list[ProblemSpec] = field(default_factory=list)

    def add(self, spec: ProblemSpec, agreement: Agreement) -> None:
        self.cases += 1
        out_ratio = share(agreement.error, agreement.allowed)
        if self.worst_out is None or out_ratio > share(
            self.worst_out.error, self.worst_out.allowed
        ):
            self.worst_out = agreement
        self.used = max(self.used, agreement.ratio)
        if not agreement.passed:
            self.failures.append(spec)

    @property
    def passed(self) -> bool:
        return not self.failures


def decode_spec(rng: np.random.Generator) -> tuple[ProblemSpec, list[int]]:
    """A causal self-attention sequence (maybe left padded) and a chunk schedule."""
    n = int(rng.integers(1, 24))
    spec = replace(
        random_spec(rng),
        q_len=n,
        k_len=n,
        causal=True,
        layout=str(rng.choice(["bottom_right", "left_padded"])),
        mask=False,
        bias=False,
    )
    prefill = int(rng.integers(0, n + 1))
    chunks = [prefill] if prefill else []
    while sum(chunks) < n:
        chunks.append(int(rng.integers(1, n - sum(chunks) + 1)))
    return spec, chunks


def cache_history(rng: np.random.Generator) -> tuple[ProblemSpec, list[Step], dict[str, Any]]:
    """Rows of tokens, a ragged schedule, and the cache's own parameters."""
    kv_heads = int(rng.integers(1, 3))
    spec = ProblemSpec(
        batch=int(rng.integers(1, 4)),
        q_heads=kv_heads * int(rng.integers(1, 3)),
        kv_heads=kv_heads,
        q_len=(n := int(rng.integers(1, 20))),
        k_len=n,
        head_dim=(d := int(rng.choice([3, 8, 16]))),
        value_dim=d,
        causal=True,
        seed=int(rng.integers(2**31)),
    )
    steps = random_steps(rng, spec.batch, n)
    shape: dict[str, Any] = {
        "window": int(rng.integers(1, 8)),
        "sink_tokens": int(rng.integers(0, 3)),
        "block_size": int(rng.integers(1, 5)),
    }
    return spec, steps, shape


def run(
    cases: Iterable[Case],
    oracle: Oracle,
    *,
    problems: int = 100,
    sequences: int = 30,
    histories: int = 10,
    seed: int = 0,
    progress: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Check every case on the same problems; return one row per case and property."""
    rng = np.random.default_rng(seed)
    attention_specs = [random_spec(rng) for _ in range(problems)]
    decode_specs = [decode_spec(rng) for _ in range(sequences)]
    cache_histories = [cache_history(rng) for _ in range(histories)]
    forms = {
        "blockwise = oracle": [
            partial(attention_blockwise, block_q=int(rng.integers(1, 9)),
                    block_k=int(rng.integers(1, 9)))
            for _ in attention_specs
        ],
        "split-KV = oracle": [
            partial(attention_split_kv, num_splits=int(rng.integers(1, 6)))
            for _ in attention_specs
        ],
    }  # fmt: skip
    rows = []
    for case in cases:
        row = Row(case, "= oracle")
        for spec in attention_specs:
            row.add(spec, measure(build_problem(spec), case, oracle))
        rows.append(row)
        for name, fns in forms.items():
            form_row = Row(case, name)
            for spec, fn in zip(attention_specs, fns, strict=True):
                form_row.add(spec, measure(build_problem(spec), case, oracle, fn))
            rows.append(form_row)
        decode_row = Row(case, "decode = full")
        for spec, chunks in decode_specs:
            decode_row.add(spec, measure_decode(build_problem(spec), chunks, case, oracle))
        rows.append(decode_row)
        for kind in KINDS:
            cache_row = Row(case, f"cache: {kind}")
            for spec, steps, shape in cache_histories:
                arrays = rounded_arrays(build_problem(spec), case.dtype)
                cache = make_cache(
                    kind, case, batch=spec.batch, kv_heads=spec.kv_heads,
                    head_dim=spec.head_dim, capacity=spec.k_len, **shape,
                )  # fmt: skip
                cache_row.add(spec, measure_cache(cache, case, arrays, steps, oracle))
            rows.append(cache_row)
        if progress is not None:
            progress(decode_row)
    return rows


def table_rows(rows: list[Row]) -> list[dict[str, Any]]:
    """One plain dict per row: the table's cells, for printing and for ``--json``.

    ``max error`` and ``allowed`` are those of the problem whose output came
    closest to its bound; ``used`` is the largest share of a bound used by any
    problem, output or lse (over 100% fails).
    """
    return [
        {
            "backend": row.case.backend.name,
            "device": row.case.device,
            "dtype": row.case.dtype,
            "property": row.check,
            "cases": row.cases,
            "max_error": None if row.worst_out is None else row.worst_out.error,
            "allowed": None if row.worst_out is None else row.worst_out.allowed,
            "used": row.used,
            "passed": row.passed,
            "failures": [asdict(spec) for spec in row.failures],
        }
        for row in rows
    ]


def format_table(rows: list[Row], skipped: dict[str, str]) -> Table:
    """The verify table: a line per (backend, device, dtype) and property."""
    table = Table(title="refattn verify: the spec against the loop oracle", title_justify="left")
    for name in ("backend", "device", "dtype", "property"):
        table.add_column(name)
    for name in ("cases", "max error", "allowed", "used"):
        table.add_column(name, justify="right")
    table.add_column("verdict")
    for cells in table_rows(rows):
        error, allowed = cells["max_error"], cells["allowed"]
        n_failed = len(cells["failures"])
        table.add_row(
            cells["backend"], cells["device"], cells["dtype"], cells["property"],
            str(cells["cases"]),
            "-" if error is None else f"{error:.2e}",
            "-" if allowed is None else f"{allowed:.2e}",
            f"{cells['used']:.0%}",
            "pass" if cells["passed"] else f"[bold red]FAIL ({n_failed})[/]",
        )  # fmt: skip
    return table


def main(
    *,
    problems: int,
    sequences: int,
    histories: int = 10,
    seed: int,
    dtypes: tuple[str, ...] | None = None,
    json_path: str | None = None,
    console: Console | None = None,
) -> int:
    """Run verify on every selected backend; print the table; 0 if everything passed."""
    from refattn.tests.oracle import oracle_attention

    console = console or make_console()
    chosen = selected()
    skipped = {b.name: b.unavailable_reason() or "" for b in chosen if not b.available()}
    unselected = sorted(set(BACKENDS) - {b.name for b in chosen})
    skipped |= {name: "not in REFATTN_BACKENDS" for name in unselected}
    cases = [c for c in all_cases() if dtypes is None or c.dtype in dtypes]
    console.print(
        f"refattn verify: {len(cases)} backend/device/dtype cases, {problems} problems "
        f"{sequences} chunked sequences and {histories} histories per cache kind each, "
        f"seed {seed}"
    )
    with progress_bar(console) as bar:
        task = bar.add_task("verifying", total=len(cases))
        rows = run(
            cases,
            oracle_attention,
            problems=problems,
            sequences=sequences,
            histories=histories,
            seed=seed,
            progress=lambda row: bar.update(task, advance=1, description=row.case.id),
        )
    console.print(format_table(rows, skipped))
    for name, reason in skipped.items():
        console.print(f"{name}: skipped ({reason})", highlight=False)
    for row in rows:
        if row.failures:
            console.print(
                f"first failure of {row.case.id} {row.check}: {row.failures[0]}",
                highlight=False, markup=False, soft_wrap=True,
            )  # fmt: skip
    failed = [row for row in rows if not row.passed]
    if json_path:
        write_json(json_path, {"spec": table_rows(rows), "skipped": skipped})
    console.print(f"{len(rows) - len(failed)} passed, {len(failed)} failed", highlight=False)
    return 1 if failed else 0


def check_candidate(
    target: str,
    *,
    backends: list[str],
    dtypes: tuple[str, ...] | None,
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
            backend = BACKENDS[name]
            if not backend.available():
                console.print(f"{name}: skipped ({backend.unavailable_reason()})")
                continue
            device = backend.devices()[0]
            kinds = tuple(d for d in backend.dtypes(device) if dtypes is None or d in dtypes)
            if dtypes is None:
                kinds = ("float32",)
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


def make_console() -> Console:
    """A console that keeps tables whole when output is piped or captured."""
    return Console(width=None if sys.stdout.isatty() else 160, file=sys.stdout)


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=float)
