"""Check attention kernels and KV caches against the spec.

Two systems live here, each written once:

- **the public verifier**, for other people's kernels and caches:
  ``check_attention(fn)``, ``check_attention_backward(fn)`` (its gradients)
  and ``check_cache(factory)`` search with Hypothesis
  for a problem on which a candidate disagrees with the spec, shrink it, and
  report it with a runnable reproducer. Its rooms: the problems
  (:mod:`~refattn.testing.problems`, drawn by the one generator of
  :mod:`~refattn.testing.drawing`), the Hypothesis strategies
  (:mod:`~refattn.testing.strategies`), what a candidate is handed and how it
  is run (:mod:`~refattn.testing.candidate`), the search
  (:mod:`~refattn.testing.search`) and its shrinking
  (:mod:`~refattn.testing.shrink`), the verdict on one problem
  (:mod:`~refattn.testing.verdict`, by the rule of
  :mod:`~refattn.testing.tolerance`), the report
  (:mod:`~refattn.testing.report`), the two checks
  (:mod:`~refattn.testing.attention_check`, :mod:`~refattn.testing.backward_check`,
  :mod:`~refattn.testing.cache_check`)
  and adapters for PyTorch SDPA, FlexAttention and flash-attn
  (:mod:`~refattn.testing.adapters`, imported on demand);
- **the self-check** behind ``refattn verify`` (:mod:`refattn.testing.selfcheck`):
  the spec itself on every backend and dtype, against the independent loop
  oracle (:mod:`~refattn.testing.oracle`).

Both decode through caches with the one driver of
:mod:`~refattn.testing.decoding`. :mod:`refattn.testing.known_bugs` holds
kernels and caches with one realistic bug each (and correct ones written
differently), to try a verdict on.
"""

from refattn.testing.attention_check import check_attention, check_problem, make_problem
from refattn.testing.backward_check import (
    check_attention_backward,
    check_backward_problem,
    make_backward_problem,
)
from refattn.testing.cache_check import check_cache, check_schedule
from refattn.testing.candidate import AttentionProblem, Result, Unavailable, Unsupported
from refattn.testing.constraints import Constraints
from refattn.testing.problems import CacheSpec, Problem, ProblemSpec, build_problem
from refattn.testing.report import Failure, FeatureCount, Outcome, Report
from refattn.testing.tolerance import TOLERANCES, Tolerance, max_abs_error, spec_error_bound

__all__ = [
    "TOLERANCES",
    "AttentionProblem",
    "CacheSpec",
    "Constraints",
    "Failure",
    "FeatureCount",
    "Outcome",
    "Problem",
    "ProblemSpec",
    "Report",
    "Result",
    "Tolerance",
    "Unavailable",
    "Unsupported",
    "build_problem",
    "check_attention",
    "check_attention_backward",
    "check_backward_problem",
    "check_cache",
    "check_problem",
    "check_schedule",
    "make_backward_problem",
    "make_problem",
    "max_abs_error",
    "spec_error_bound",
]
