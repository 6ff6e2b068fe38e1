"""Check attention kernels and KV caches against the spec.

``check_attention(fn)`` and ``check_cache(factory)`` search with Hypothesis
for a problem on which someone else's kernel or cache disagrees with the
spec, shrink it, and report it with a runnable reproducer. The strategies
they draw from are in :mod:`refattn.testing.strategies`, the tolerance rule
in :mod:`refattn.testing.tolerance`, adapters for PyTorch SDPA,
FlexAttention and flash-attn in :mod:`refattn.testing.adapters` (imported
on demand).
"""

from refattn.testing.cache_verifier import check_cache, check_schedule
from refattn.testing.problems import CacheSpec, Problem, ProblemSpec, build_problem, random_spec
from refattn.testing.report import Failure, FeatureCount, Outcome, Report
from refattn.testing.tolerance import TOLERANCES, Tolerance, max_abs_error, spec_error_bound
from refattn.testing.verifier import (
    AttentionProblem,
    Unsupported,
    check_attention,
    check_problem,
    make_problem,
    to_numpy,
)

__all__ = [
    "TOLERANCES",
    "AttentionProblem",
    "CacheSpec",
    "Failure",
    "FeatureCount",
    "Outcome",
    "Problem",
    "ProblemSpec",
    "Report",
    "Tolerance",
    "Unsupported",
    "build_problem",
    "check_attention",
    "check_cache",
    "check_problem",
    "check_schedule",
    "make_problem",
    "max_abs_error",
    "random_spec",
    "spec_error_bound",
    "to_numpy",
]
