"""The self-check behind ``refattn verify``: the spec on every backend and dtype, against the
loop oracle.

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

Problems come from the one problem generator
(:func:`refattn.testing.drawing.draw_spec`) fed by a seeded NumPy generator,
so a run is repeatable and a failing row names a problem that can be rebuilt
from its spec.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from math import ceil
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from refattn.backends import BACKENDS, Case, cases, selected
from refattn.blockwise import attention_blockwise, attention_split_kv
from refattn.caches import KINDS
from refattn.console import make_console, progress_bar, write_json
from refattn.testing import oracle
from refattn.testing.decoding import Step, cache_on
from refattn.testing.drawing import (
    ALL_FEATURES,
    MASK_FEATURES,
    NumpyDraws,
    draw_spec,
    draw_steps,
)
from refattn.testing.problems import ProblemSpec, build_problem
from refattn.testing.selfcheck.agreement import (
    Agreement,
    Oracle,
    measure,
    measure_cache,
    measure_decode,
    share,
)

#: What the self-check's attention problems draw: everything the spec takes but long rows
#: and tile-sized ones (hundreds to thousands of keys), which the loop oracle would take
#: minutes over.
SELF_CHECK_FEATURES = ALL_FEATURES - {"long", "tiles"}


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
    draws = NumpyDraws(rng)
    n = draws.integer(1, 23)
    drawn = draw_spec(draws, SELF_CHECK_FEATURES - {*MASK_FEATURES, "bias", "no_queries"})
    spec = replace(drawn, q_len=n, k_len=n, causal=True,
                   layout=draws.choice(("bottom_right", "left_padded")))  # fmt: skip
    prefill = draws.integer(0, n)
    chunks = [prefill] if prefill else []
    while sum(chunks) < n:
        chunks.append(draws.integer(1, n - sum(chunks)))
    return spec, chunks


def cache_history(rng: np.random.Generator) -> tuple[ProblemSpec, list[Step], dict[str, Any]]:
    """Rows of tokens, a ragged schedule, and the caches' own parameters (for the kinds
    that take them: the ring's window and sink tokens, the paged cache's block size)."""
    draws = NumpyDraws(rng)
    kv_heads, n, d = draws.integer(1, 2), draws.integer(1, 19), draws.choice((3, 8, 16))
    spec = ProblemSpec(
        batch=draws.integer(1, 3), q_heads=kv_heads * draws.integer(1, 2), kv_heads=kv_heads,
        q_len=n, k_len=n, head_dim=d, value_dim=d, causal=True, seed=draws.integer(0, 2**31),
    )  # fmt: skip
    steps = draw_steps(draws, [n] * spec.batch)
    own = {
        "sliding": {"window": draws.integer(1, 7), "sink_tokens": draws.integer(0, 2)},
        "paged": {"block_size": draws.integer(1, 4)},
    }
    return spec, steps, own


def run(
    cases: Iterable[Case],
    oracle: Oracle,
    *,
    problems: int = 100,
    sequences: int = 30,
    histories: int = 10,
    seed: int = 0,
    shares: Mapping[str, float] | None = None,
    progress: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Check every case on the same problems; return one row per case and property.

    ``shares`` maps a backend's name to the part of the problems, sequences and histories
    its cases take (the first ones of each, at least one): 1 for a backend it leaves out.
    """
    rng = np.random.default_rng(seed)
    attention_specs = [draw_spec(NumpyDraws(rng), SELF_CHECK_FEATURES) for _ in range(problems)]
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
        fraction = (shares or {}).get(case.backend.name, 1.0)

        def part(items: list[Any], fraction: float = fraction) -> list[Any]:
            return items[: max(1, ceil(len(items) * fraction))]

        row = Row(case, "= oracle")
        for spec in part(attention_specs):
            row.add(spec, measure(build_problem(spec), case, oracle))
        rows.append(row)
        for name, fns in forms.items():
            form_row = Row(case, name)
            for spec, fn in part(list(zip(attention_specs, fns, strict=True))):
                form_row.add(spec, measure(build_problem(spec), case, oracle, fn))
            rows.append(form_row)
        decode_row = Row(case, "decode = full")
        for spec, chunks in part(decode_specs):
            decode_row.add(spec, measure_decode(build_problem(spec), chunks, case, oracle))
        rows.append(decode_row)
        for kind in KINDS:
            cache_row = Row(case, f"cache: {kind}")
            for spec, steps, own in part(cache_histories):
                arrays = build_problem(spec).rounded(case.dtype)
                cache = cache_on(
                    kind, case, batch=spec.batch, kv_heads=spec.kv_heads,
                    head_dim=spec.head_dim, max_len=spec.k_len, **own.get(kind, {}),
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


def format_table(rows: list[Row]) -> Table:
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
    dtypes: Sequence[str] | None = None,
    backends: Sequence[str] | None = None,
    json_path: str | None = None,
    console: Console | None = None,
) -> int:
    """Run the self-check on ``backends`` (default: ``REFATTN_BACKENDS``, or all) in
    ``dtypes`` (default: every one each backend has); print the table; 0 if all passed.

    A backend the run does not name takes its
    :attr:`~refattn.backends.base.Backend.verify_share` of the counts (JAX a fifth), said
    under the header; named, it takes them all.
    """
    console = console or make_console()
    chosen = selected(backends, opt_in=True)
    named = backends is not None or bool(os.environ.get("REFATTN_BACKENDS", "").strip())
    shares = {} if named else {b.name: b.verify_share for b in chosen if b.verify_share < 1}
    skipped = {b.name: b.unavailable_reason() or "" for b in chosen if not b.available()}
    unselected = sorted(set(BACKENDS) - {b.name for b in chosen})
    skipped |= {name: "not selected" for name in unselected}
    checked = [c for c in cases(backends, opt_in=True) if dtypes is None or c.dtype in dtypes]
    if not checked:
        console.print(f"refattn verify: no backend here runs {list(dtypes or [])}: nothing checked")
        return 1
    console.print(
        f"refattn verify: {len(checked)} backend/device/dtype cases, {problems} problems "
        f"{sequences} chunked sequences and {histories} histories per cache kind each, "
        f"seed {seed}"
    )
    for name, fraction in shares.items():
        if any(c.backend.name == name for c in checked):
            console.print(
                f"  {name}: the first {fraction:.0%} of them (a program compiled per new shape; "
                f"--backends {name} runs them all)", highlight=False,
            )  # fmt: skip
    with progress_bar(console) as bar:
        task = bar.add_task("verifying", total=len(checked))
        rows = run(
            checked,
            oracle.oracle_attention,  # looked up now, so a test can put a wrong one in its place
            problems=problems,
            sequences=sequences,
            histories=histories,
            seed=seed,
            shares=shares,
            progress=lambda row: bar.update(task, advance=1, description=row.case.id),
        )
    console.print(format_table(rows))
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
