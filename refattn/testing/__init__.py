"""Tools to check attention implementations against the spec: problems and tolerances."""

from refattn.testing.problems import Problem, ProblemSpec, build_problem, random_spec
from refattn.testing.tolerance import TOLERANCES, Tolerance, max_abs_error, spec_error_bound

__all__ = [
    "TOLERANCES",
    "Problem",
    "ProblemSpec",
    "Tolerance",
    "build_problem",
    "max_abs_error",
    "random_spec",
    "spec_error_bound",
]
