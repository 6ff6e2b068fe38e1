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

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np

from refattn.backends import BACKENDS, Case, selected
from refattn.backends import cases as all_cases
from refattn.blockwise import attention_blockwise, attention_split_kv
from refattn.testing.agreement import (
    Agreement,
    Oracle,
    measure,
    measure_decode,
    rounded_arrays,
    share,
)
from refattn.testing.decoding import CACHE_KINDS, Step, make_cache, measure_cache, random_steps
from refattn.testing.problems import ProblemSpec, build_problem, random_spec


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
        for kind in CACHE_KINDS:
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


def format_table(rows: list[Row], skipped: dict[str, str]) -> str:
    """The verify table, then the skipped backends and the first failing problem of each row.

    ``max error`` and ``allowed`` are those of the problem whose output came
    closest to its bound; ``used`` is the largest share of a bound used by any
    problem, output or lse (over 100% fails).
    """
    header = (
        "backend", "device", "dtype", "property", "cases", "max error", "allowed", "used", "verdict"
    )  # fmt: skip
    lines = [header]
    for row in rows:
        worst = row.worst_out
        error = "-" if worst is None else f"{worst.error:.2e}"
        allowed = "-" if worst is None else f"{worst.allowed:.2e}"
        verdict = "pass" if row.passed else f"FAIL ({len(row.failures)})"
        c = row.case
        cells = (c.backend.name, c.device, c.dtype, row.check, str(row.cases))
        lines.append((*cells, error, allowed, f"{row.used:.0%}", verdict))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    for name, reason in skipped.items():
        text.append(f"{name}: skipped ({reason})")
    for row in rows:
        if row.failures:
            text.append(f"first failure of {row.case.id} {row.check}: {row.failures[0]}")
    return "\n".join(text)


def main(*, problems: int, sequences: int, histories: int = 10, seed: int) -> int:
    """Run verify on every selected backend; print the table; 0 if everything passed."""
    from refattn.tests.oracle import oracle_attention

    chosen = selected()
    skipped = {b.name: b.unavailable_reason() or "" for b in chosen if not b.available()}
    unselected = sorted(set(BACKENDS) - {b.name for b in chosen})
    skipped |= {name: "not in REFATTN_BACKENDS" for name in unselected}
    cases = all_cases()
    print(
        f"refattn verify: {len(cases)} backend/device/dtype cases, {problems} problems "
        f"{sequences} chunked sequences and {histories} histories per cache kind each, "
        f"seed {seed}",
        flush=True,
    )
    rows = run(
        cases,
        oracle_attention,
        problems=problems,
        sequences=sequences,
        histories=histories,
        seed=seed,
        progress=lambda row: print(f"  checked {row.case.id}", flush=True),
    )
    print(format_table(rows, skipped))
    failed = [row for row in rows if not row.passed]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0
