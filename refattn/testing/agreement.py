"""Run one problem on one (backend, device, dtype) and measure it against an oracle.

The oracle is any function with the signature of ``attention`` that returns
``(out, lse)`` in float64 NumPy; the tests and ``refattn verify`` pass the
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
from refattn.backends import BACKENDS, Case
from refattn.backends.base import round_to
from refattn.testing.problems import Problem
from refattn.testing.tolerance import TOLERANCES, max_abs_error, spec_error_bound

Oracle = Callable[..., tuple[np.ndarray, np.ndarray]]

_FLOATS = ("q", "k", "v", "bias", "alibi_slopes", "sink_logits")


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
        return max(_ratio(self.error, self.allowed), _ratio(self.lse_error, self.lse_allowed))


def _ratio(error: float, allowed: float) -> float:
    return 0.0 if error == 0 else error / allowed if allowed > 0 else float("inf")


def rounded_arrays(problem: Problem, dtype: str) -> dict[str, np.ndarray]:
    """The problem's arrays with floats rounded to ``dtype`` and held as float64."""
    return {
        name: round_to(x, dtype).astype(np.float64) if name in _FLOATS else x
        for name, x in problem.arrays().items()
    }


def run_spec(case: Case, arrays: dict[str, np.ndarray], scalars: dict[str, Any]) -> tuple[Any, Any]:
    """``attention`` on the case's backend; returns (out, lse) as NumPy."""
    backend = case.backend
    on_backend = {
        name: backend.asarray(x, dtype=case.dtype, device=case.device) for name, x in arrays.items()
    }
    out, lse = attention(**on_backend, **scalars, return_lse=True)
    return backend.to_numpy(out), backend.to_numpy(lse)


def measure(problem: Problem, case: Case, oracle: Oracle) -> Agreement:
    """Run ``problem`` on ``case`` and compare it with ``oracle``."""
    arrays = rounded_arrays(problem, case.dtype)
    scalars = problem.scalars()
    ref_out, ref_lse = oracle(**arrays, **scalars)
    out, lse = run_spec(case, arrays, scalars)
    finite_lse = np.abs(ref_lse[np.isfinite(ref_lse)])
    lse_scale = float(finite_lse.max()) if finite_lse.size else 1.0
    bound = spec_error_bound(arrays, dtype=case.dtype, scale=scalars["scale"], lse_scale=lse_scale)
    allowed, lse_allowed = bound.out, bound.lse
    if case.backend.name != "numpy":
        spec_out, spec_lse = run_spec(Case(BACKENDS["numpy"], "cpu", case.dtype), arrays, scalars)
        rule = TOLERANCES[case.dtype]
        v_scale = float(np.nan_to_num(np.abs(arrays["v"]), posinf=0.0).max(initial=0.0))
        allowed = min(allowed, rule.allowed(max_abs_error(spec_out, ref_out), v_scale))
        lse_allowed = min(lse_allowed, rule.allowed(max_abs_error(spec_lse, ref_lse), lse_scale))
    return Agreement(
        error=max_abs_error(out, ref_out),
        allowed=allowed,
        lse_error=max_abs_error(lse, ref_lse),
        lse_allowed=lse_allowed,
    )
