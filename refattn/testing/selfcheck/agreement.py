"""The spec on one (backend, device, dtype), measured against the loop oracle.

The oracle is any function with the signature of ``attention`` that returns
``(out, lse)`` in float64 NumPy, and ``(out, lse, weights)`` when called with
``return_weights=True``; the tests and ``refattn verify`` pass the
independent loop oracle. Inputs are rounded to the dtype under test first, and
the oracle sees the same rounded values, so only the implementation's own
error is measured. The allowed error is the tighter of the spec's error bound
and, on backends other than NumPy, the cross-implementation rule against the
spec on NumPy in the same dtype (see :mod:`refattn.testing.tolerance`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from refattn.attention import attention
from refattn.backends import Case
from refattn.caches import KVCache, QuantizedCache
from refattn.testing.decoding import Step, decode
from refattn.testing.problems import Problem
from refattn.testing.tolerance import (
    ErrorBound,
    finite_max_abs,
    max_abs_error,
    quantized_error_bound,
    spec_error_bound,
)
from refattn.testing.verdict import allowance, run_spec

Oracle = Callable[..., Any]


@dataclass(frozen=True)
class Agreement:
    """The errors of one run against the oracle, and what was allowed."""

    error: float
    allowed: float
    lse_error: float
    lse_allowed: float

    @property
    def passed(self) -> bool:
        return self.error <= self.allowed and self.lse_error <= self.lse_allowed

    @property
    def ratio(self) -> float:
        """How much of the allowance was used (> 1 fails)."""
        return max(share(self.error, self.allowed), share(self.lse_error, self.lse_allowed))


def share(error: float, allowed: float) -> float:
    """``error / allowed``, with 0 / 0 = 0 and anything / 0 = inf."""
    return 0.0 if error == 0 else error / allowed if allowed > 0 else float("inf")


def measure(
    problem: Problem, case: Case, oracle: Oracle, fn: Callable[..., Any] = attention
) -> Agreement:
    """Run ``problem`` through ``fn`` on ``case`` and compare it with ``oracle``."""
    arrays = problem.rounded(case.dtype)
    scalars = problem.scalars()
    ref_out, ref_lse, weights = oracle(**arrays, **scalars, return_weights=True)
    out, lse = run_spec(case, arrays, scalars, fn)
    bound = _bound(arrays, case.dtype, scalars, ref_out, ref_lse, weights)
    allowed, lse_allowed = bound.out, bound.lse
    if case.backend.name != "numpy":
        # The cross-implementation rule, as check_attention applies it: k times the largest
        # error of the spec on NumPy over its rounding orders (one order alone can be
        # luckily exact where torch's float32 sums round another way), plus atol.
        _, _, rule = allowance(arrays, scalars, case.dtype)
        allowed, lse_allowed = min(allowed, rule.out), min(lse_allowed, rule.lse)
    return Agreement(
        error=max_abs_error(out, ref_out),
        allowed=allowed,
        lse_error=max_abs_error(lse, ref_lse),
        lse_allowed=lse_allowed,
    )


def measure_decode(problem: Problem, chunks: list[int], case: Case, oracle: Oracle) -> Agreement:
    """Decode ``problem`` chunk by chunk and compare with the oracle's full causal pass.

    Each chunk's queries attend to every key and value seen so far (kept by
    plain concatenation, which is what a cache stores); the chunk outputs,
    concatenated, must equal causal attention over the whole sequence. The
    problem must have ``q_len == k_len`` and no mask or bias (they are shaped
    for the full pass). Positions are passed only when they are not the
    defaults, so the default bottom-right alignment is what a chunk relies on.
    """
    if (
        problem.q.shape[2] != problem.k.shape[2]
        or problem.mask is not None
        or problem.bias is not None
    ):
        raise ValueError("a decode problem needs q_len == k_len and no mask or bias")
    if sum(chunks) != problem.q.shape[2]:
        raise ValueError(f"chunks must add up to {problem.q.shape[2]}; got {chunks}")
    arrays = problem.rounded(case.dtype)
    scalars = {**problem.scalars(), "causal": True}
    ref_out, ref_lse, weights = oracle(**arrays, **scalars, return_weights=True)
    default_positions = problem.spec.layout == "bottom_right"
    outs, lses, end = [], [], 0
    for size in chunks:
        start, end = end, end + size
        chunk = {
            **arrays,
            "q": arrays["q"][:, :, start:end],  # this chunk's queries only
            "k": arrays["k"][:, :, :end],  # every key so far
            "v": arrays["v"][:, :, :end],
            "q_pos": arrays["q_pos"][:, start:end],
            "k_pos": arrays["k_pos"][:, :end],
        }
        if default_positions:
            del chunk["q_pos"], chunk["k_pos"]
        out, lse = run_spec(case, chunk, scalars)
        outs.append(out)
        lses.append(lse)
    decoded, decoded_lse = np.concatenate(outs, axis=2), np.concatenate(lses, axis=2)
    bound = _bound(arrays, case.dtype, scalars, ref_out, ref_lse, weights)
    return Agreement(
        error=max_abs_error(decoded, ref_out),
        allowed=bound.out,
        lse_error=max_abs_error(decoded_lse, ref_lse),
        lse_allowed=bound.lse,
    )


def _bound(
    arrays: dict[str, np.ndarray],
    dtype: str,
    scalars: dict[str, Any],
    ref_out: np.ndarray,
    ref_lse: np.ndarray,
    weights: np.ndarray,
) -> ErrorBound:
    return spec_error_bound(
        arrays,
        dtype=dtype,
        scale=scalars["scale"],
        lse_scale=max(1.0, finite_max_abs(ref_lse)),
        out=ref_out,
        weights=weights,
    )


def measure_cache(
    cache: KVCache, case: Case, arrays: dict[str, np.ndarray], steps: list[Step], oracle: Oracle,
    **options: Any,
) -> Agreement:  # fmt: skip
    """Decode through ``cache`` and compare every row with the oracle's full causal pass
    over that row's history; the worst row's agreement."""
    decoded = decode(cache, case, arrays, steps, **options)
    if isinstance(decoded, str):
        raise AssertionError(f"refattn's {type(cache).__name__} returned {decoded}")
    attend = {**cache.attention_options, **options}
    worst: Agreement | None = None
    for b in range(arrays["q"].shape[0]):
        row = {name: arrays[name][b : b + 1] for name in ("q", "k", "v")}
        ref_out, _, weights = oracle(**row, causal=True, **attend, return_weights=True)
        bounds = {**row, **{n: x for n, x in options.items() if isinstance(x, np.ndarray)}}
        allowed = spec_error_bound(
            bounds, dtype=case.dtype, scale=options.get("scale"), out=ref_out, weights=weights
        ).out
        if isinstance(cache, QuantizedCache):
            q, k, v = row["q"], row["k"], row["v"]
            scale = options.get("scale")
            allowed += quantized_error_bound(
                q, k, v, bits=cache.bits, dtype=case.dtype, scale=scale
            )
        agreement = Agreement(max_abs_error(decoded[b : b + 1], ref_out), allowed, 0.0, 1.0)
        if worst is None or agreement.ratio > worst.ratio:
            worst = agreement
    assert worst is not None
    return worst
