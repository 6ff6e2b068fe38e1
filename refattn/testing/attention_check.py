r"""Check someone else's attention kernel against the spec: ``check_attention``.

``check_attention(fn)`` draws attention problems with Hypothesis
(:mod:`refattn.testing.strategies`), hands each to ``fn`` as an
:class:`~refattn.testing.candidate.AttentionProblem`, and judges what comes
back by the tolerance rule (:mod:`refattn.testing.verdict`). When one fails,
Hypothesis shrinks it to the smallest failing problem, and the
:class:`~refattn.testing.report.Report` prints it as code to paste into a test.

The problem's arrays live on the backend asked for (NumPy by default), in the
dtype under test; positions are always concrete int64 arrays. ``fn`` may
return arrays of another library (NumPy, PyTorch, CuPy, anything with
``__array__``): they are brought to NumPy before comparing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from refattn.testing.candidate import (
    AttentionProblem,
    check_budget,
    new_report,
    on_backend,
    precision_of,
    resolve_case,
    run_candidate,
)
from refattn.testing.constraints import Constraints, constraints_of
from refattn.testing.drawing import corners_of, features_of, resolve_features
from refattn.testing.precision import Precision
from refattn.testing.problems import ProblemSpec, build_problem
from refattn.testing.report import Outcome, Report
from refattn.testing.search import search
from refattn.testing.strategies import attention_specs
from refattn.testing.verdict import judge


def make_problem(
    spec: ProblemSpec,
    *,
    backend: str = "numpy",
    dtype: str = "float32",
    device: str | None = None,
    precision: Precision | None = None,
) -> AttentionProblem:
    """The :class:`AttentionProblem` of ``spec`` on ``backend``/``device`` in ``dtype``."""
    case = resolve_case(backend, device, dtype)
    chosen = precision_of(None, precision)
    return on_backend(spec, build_problem(spec).rounded(dtype), case, chosen)


def check_problem(
    fn: Callable[[AttentionProblem], Any],
    spec: ProblemSpec,
    *,
    backend: str = "numpy",
    dtype: str = "float32",
    device: str | None = None,
    precision: Precision | None = None,
) -> Outcome:
    """Run ``fn`` on one problem and judge it by the tolerance rule.

    ``precision`` is the contract ``fn`` is judged by: by default the one it
    declares as its ``precision`` attribute, else the spec's own
    (:mod:`refattn.testing.precision`).

    >>> import refattn
    >>> from refattn.testing import ProblemSpec, check_problem
    >>> def mine(p):
    ...     return refattn.attention(p.q, p.k, p.v, causal=p.causal, q_pos=p.q_pos,
    ...                              k_pos=p.k_pos, scale=p.scale, window=p.window)
    >>> check_problem(mine, ProblemSpec(q_len=2, k_len=5, causal=True, window=3)).passed
    True
    """
    case = resolve_case(backend, device, dtype)
    contract = precision_of(fn, precision)
    built = build_problem(spec)
    arrays = built.rounded(dtype)  # built once: the candidate's and the oracle's
    problem = on_backend(spec, arrays, case, contract)
    start = Outcome(spec=spec, dtype=dtype, backend=backend, device=case.device)
    result, failed = run_candidate(start, lambda: fn(problem))
    if failed is not None:
        return failed
    return judge(start, result, arrays, built.scalars(), spec.return_lse, contract)


def check_attention(
    fn: Callable[[AttentionProblem], Any],
    *,
    backend: str = "numpy",
    device: str | None = None,
    dtypes: Iterable[str] = ("float32",),
    features: Iterable[str] | None = None,
    max_examples: int = 200,
    seed: int | None = None,
    on_example: Callable[[Outcome], None] | None = None,
    max_failures: int = 5,
    precision: Precision | None = None,
    constraints: Constraints | None = None,
) -> Report:
    """Search for problems on which ``fn`` disagrees with the spec; shrink each kind found.

    Parameters
    ----------
    fn : ``fn(problem: AttentionProblem)`` returns ``out`` (B, Hq, Sq, Dv), or
        ``(out, lse)`` when ``problem.return_lse``; raises :class:`Unsupported`
        for a problem its kernel cannot express
    backend, device : where the problem's arrays live (``"numpy"``,
        ``"array_api_strict"``, ``"torch"``, ``"cupy"``); device defaults to the
        backend's first
    dtypes : each dtype is searched separately, ``max_examples`` problems each
    features : what may be drawn (:data:`~refattn.testing.strategies.FEATURES`);
        None draws everything but ``unseen_nan``
    seed : makes the search repeatable; None draws a fresh one
    on_example : called with every :class:`Outcome` of the search (a progress bar)
    max_failures : how many classes of failure to find and shrink per dtype
        (:mod:`refattn.testing.search`); 1 stops at the first failure
    precision : the candidate's precision contract
        (:class:`~refattn.testing.precision.Precision`); by default its
        ``precision`` attribute, else the spec's own rounding
    constraints : what the candidate's kernel requires
        (:class:`~refattn.testing.constraints.Constraints`: head dims, Dv == D,
        causal only, ...); only problems that meet them are drawn. By default
        its ``constraints`` attribute, else none

    Returns
    -------
    Report
        ``passed``, per-feature counts, the reasons problems were refused, and
        each class of failure found: the shrunk problem with its error, its
        bound and a reproducer (``to_code()``), and what its failing draws
        have in common.

    Examples
    --------
    >>> import refattn
    >>> from refattn.testing import check_attention
    >>> def mine(p):
    ...     return refattn.attention_blockwise(
    ...         p.q, p.k, p.v, causal=p.causal, q_pos=p.q_pos, k_pos=p.k_pos,
    ...         scale=p.scale, window=p.window, softcap=p.softcap,
    ...         alibi_slopes=p.alibi_slopes, return_lse=p.return_lse, block_k=4)
    >>> check_attention(mine, max_examples=20, seed=0).passed
    True
    """
    max_examples = check_budget("max_examples", max_examples)
    max_failures = check_budget("max_failures", max_failures)
    chosen = resolve_features(features)
    contract = precision_of(fn, precision)
    required = constraints_of(fn, constraints)
    if required.causal_only and "causal" not in chosen:
        raise ValueError("constraints say causal_only, so features must include 'causal'; "
                         f"got {sorted(chosen)}")  # fmt: skip
    report = new_report(fn, backend, device, dtypes, chosen)
    report.precision = contract
    strategy = attention_specs(chosen, constraints=required)
    for dtype in report.dtypes:

        def one(spec: ProblemSpec, dtype: str = dtype) -> tuple[Outcome, frozenset[str]]:
            outcome = check_problem(fn, spec, backend=backend, dtype=dtype, device=report.device,
                                    precision=contract)  # fmt: skip
            return outcome, features_of(spec)

        search(report, one, strategy, dtype, max_examples=max_examples, seed=seed,
               on_example=on_example,
               allowed=lambda spec: features_of(spec) <= chosen and required.allows(spec),
               corners=corners_of, max_failures=max_failures)  # fmt: skip
        if report.unavailable:
            break
    return report
