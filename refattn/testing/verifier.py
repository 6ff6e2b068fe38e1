r"""Check someone else's attention kernel against the spec: ``check_attention``.

``check_attention(fn)`` draws attention problems with Hypothesis
(:mod:`refattn.testing.strategies`), hands each to ``fn`` as an
:class:`AttentionProblem`, and compares what comes back with the spec. When
one fails, Hypothesis shrinks it to the smallest failing problem, and the
:class:`~refattn.testing.report.Report` prints it as code to paste into a test.

The verdict on one problem (:func:`check_problem`) is DESIGN's tolerance rule
(:mod:`refattn.testing.tolerance`): with the inputs rounded to the dtype
:math:`t` under test, the oracle is the spec in float64 on NumPy and
:math:`\text{spec}_t` the spec on NumPy in :math:`t`;

.. math::

    \max |\text{out} - \text{oracle}| \le k_t \max |\text{spec}_t - \text{oracle}|
        + \text{atol}_t \max(1, \max|v|)

and the same for the log-sum-exp, scaled by :math:`\max(1, \max|\text{lse}|)`.
The spec's error is the largest over a few correct evaluations that round in
different orders (one pass, keys reversed, the scale on the keys, the dot
products summed in another order, online softmax): on a row whose
best keys nearly tie under scores near 1e4, one order alone can be luckily
exact, and k times a lucky error would flag a correct kernel (see
:func:`allowance`).

A NaN, or an infinity where the oracle has none, is an infinite error; a
fully masked row must give 0 and an lse of :math:`-\infty`.

The problem's arrays live on the backend asked for (NumPy by default), in the
dtype under test; positions are always concrete int64 arrays. ``fn`` may
return arrays of another library (NumPy, PyTorch, CuPy, anything with
DLPack or ``__array__``): they are brought to NumPy before comparing.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from refattn.attention import attention
from refattn.backends import Case, get
from refattn.blockwise import attention_blockwise
from refattn.testing.agreement import rounded_arrays, run_spec
from refattn.testing.problems import ProblemSpec, build_problem
from refattn.testing.report import Outcome, Report
from refattn.testing.search import qualified_name, resolve_case, search
from refattn.testing.strategies import attention_specs, features_of, resolve_features
from refattn.testing.tolerance import TOLERANCES, ErrorBound, finite_max_abs, max_abs_error


class Unsupported(Exception):
    """Raised by a candidate for a problem its kernel cannot express; counted, not failed."""


@dataclass(frozen=True)
class AttentionProblem:
    """One attention call, as a candidate receives it.

    The arrays are on the checked backend and device, in the checked dtype;
    ``q_pos`` and ``k_pos`` are int64 and always given (``k_pos = -1`` marks
    an empty slot). The candidate computes, for query head ``h`` and KV head
    ``h // (Hq // Hkv)``, softmax over the visible keys of
    ``softcap(scale * q.k) - slope * |q_pos - k_pos|`` and the weighted sum of
    the values (see ``refattn.attention``).
    """

    q: Any  #: (B, Hq, Sq, D)
    k: Any  #: (B, Hkv, Sk, D)
    v: Any  #: (B, Hkv, Sk, Dv)
    causal: bool
    q_pos: Any  #: (B, Sq) int64
    k_pos: Any  #: (B, Sk) int64, -1 for an empty slot
    scale: float  #: always concrete: 1/sqrt(D) unless the problem sets one
    window: int | None  #: a key is visible when q_pos - k_pos < window
    softcap: float | None  #: scores become softcap * tanh(scores / softcap)
    alibi_slopes: Any | None  #: (Hq,) or (B, Hq), in the checked dtype
    return_lse: bool  #: return (out, lse), lse (B, Hq, Sq), natural log
    xp: Any  #: the array namespace of the arrays
    dtype: str  #: "float32", "float16", ...
    device: str
    backend: str
    spec: ProblemSpec  #: rebuilds this problem with ``make_problem``


def make_problem(
    spec: ProblemSpec, *, backend: str = "numpy", dtype: str = "float32", device: str | None = None
) -> AttentionProblem:
    """The :class:`AttentionProblem` of ``spec`` on ``backend``/``device`` in ``dtype``."""
    return _on_backend(spec, _rounded(spec, dtype), backend, dtype, device)


def _rounded(spec: ProblemSpec, dtype: str) -> dict[str, Any]:
    """The spec's float64 arrays, rounded to ``dtype``: what the candidate and the oracle see."""
    _check_checkable(spec)
    return rounded_arrays(build_problem(spec), dtype)


def _on_backend(spec: ProblemSpec, arrays: dict[str, Any], backend: str, dtype: str,
                device: str | None) -> AttentionProblem:  # fmt: skip
    case = resolve_case(backend, device, dtype)
    on = {n: case.backend.asarray(x, dtype=dtype, device=case.device) for n, x in arrays.items()}
    D = spec.head_dim
    return AttentionProblem(
        q=on["q"],
        k=on["k"],
        v=on["v"],
        causal=spec.causal,
        q_pos=on["q_pos"],
        k_pos=on["k_pos"],
        scale=float(spec.scale) if spec.scale is not None else 1.0 / math.sqrt(D),
        window=spec.window,
        softcap=spec.softcap,
        alibi_slopes=on.get("alibi_slopes"),
        return_lse=spec.return_lse,
        xp=case.backend.namespace(),
        dtype=dtype,
        device=case.device,
        backend=backend,
        spec=spec,
    )


def check_problem(
    fn: Callable[[AttentionProblem], Any],
    spec: ProblemSpec,
    *,
    backend: str = "numpy",
    dtype: str = "float32",
    device: str | None = None,
) -> Outcome:
    """Run ``fn`` on one problem and judge it by the tolerance rule.

    >>> import refattn
    >>> from refattn.testing import ProblemSpec, check_problem
    >>> def mine(p):
    ...     return refattn.attention(p.q, p.k, p.v, causal=p.causal, q_pos=p.q_pos,
    ...                              k_pos=p.k_pos, scale=p.scale, window=p.window)
    >>> check_problem(mine, ProblemSpec(q_len=2, k_len=5, causal=True, window=3)).passed
    True
    """
    arrays = _rounded(spec, dtype)  # built once: the candidate's inputs and the oracle's
    problem = _on_backend(spec, arrays, backend, dtype, device)
    start = Outcome(spec=spec, dtype=dtype, backend=backend, device=problem.device)
    try:
        result = fn(problem)
    except Unsupported as exc:
        return start.but(unsupported=str(exc) or "unsupported")
    except Exception as exc:  # a crash is a failure, shrunk like any other
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return start.but(message=f"raised {exc!r} at {where.filename}:{where.lineno}")
    return _judge(start, result, arrays, spec, dtype)


def _judge(start: Outcome, result: Any, arrays: dict[str, Any], spec: ProblemSpec,
           dtype: str) -> Outcome:  # fmt: skip
    """Compare a candidate's result with the oracle under the tolerance rule."""
    if spec.return_lse:
        if not (isinstance(result, tuple | list) and len(result) == 2):
            return start.but(message="return_lse is set, so fn must return (out, lse)")
        out_raw, lse_raw = result
    else:
        if isinstance(result, tuple | list):
            return start.but(message="return_lse is not set, so fn must return out alone")
        out_raw, lse_raw = result, None
    ref_out, ref_lse, allowed = allowance(arrays, _scalars(spec), dtype)
    out, message = _as_numpy("out", out_raw, ref_out.shape)
    if message:
        return start.but(message=message)
    outcome = start.but(error=max_abs_error(out, ref_out), allowed=allowed.out)
    if lse_raw is not None:
        lse, message = _as_numpy("lse", lse_raw, ref_lse.shape)
        if message:
            return outcome.but(message=message)
        outcome = outcome.but(lse_error=max_abs_error(lse, ref_lse), lse_allowed=allowed.lse)
    return outcome


def allowance(
    arrays: dict[str, Any], scalars: dict[str, Any], dtype: str
) -> tuple[np.ndarray, np.ndarray, ErrorBound]:
    """The oracle's ``out`` and ``lse`` for a problem, and the errors a candidate may make.

    ``arrays`` are float64 NumPy, already rounded to ``dtype``. The allowance
    is DESIGN's rule, ``k * |spec_t - oracle| + atol``, where the spec's error
    is the largest over :data:`ROUNDING_ORDERS`, correct evaluations in
    ``dtype`` that round in different orders. One order alone can be luckily
    exact on a row whose best keys nearly tie under scores near 1e4, where a
    correct kernel rounding in yet another order is not: PyTorch's CPU SDPA,
    which scales after the dot product, erred by 3.1e-3 on such a row where
    the one-pass spec erred by 3.1e-4 and the online softmax by 1.1e-3. Most
    of that spread comes from how the scores round, hence the orders with the
    scale on the keys and with the dot products summed in another order.
    """
    ref_out, ref_lse = attention(**arrays, **scalars, return_lse=True)  # float64 NumPy
    numpy_case = Case(get("numpy"), "cpu", dtype)
    out_error = lse_error = 0.0
    for order in ROUNDING_ORDERS:
        ordered, form, changed = order(arrays, scalars, dtype)
        spec_out, spec_lse = run_spec(numpy_case, ordered, {**scalars, **changed}, form)
        out_error = max(out_error, max_abs_error(spec_out, ref_out))
        lse_error = max(lse_error, max_abs_error(spec_lse, ref_lse))
    rule = TOLERANCES[dtype]
    out_allowed = rule.allowed(out_error, finite_max_abs(arrays["v"]))
    lse_allowed = rule.allowed(lse_error, max(1.0, finite_max_abs(ref_lse)))
    return ref_out, ref_lse, ErrorBound(out=out_allowed, lse=lse_allowed)


Order = Callable[
    [dict[str, Any], dict[str, Any], str], tuple[dict[str, Any], Callable[..., Any], dict[str, Any]]
]


def _one_pass(arrays: dict[str, Any], scalars: dict[str, Any], dtype: str) -> Any:
    return arrays, attention, {}


def _keys_reversed(arrays: dict[str, Any], scalars: dict[str, Any], dtype: str) -> Any:
    """The same problem with the key slots in reverse order (positions travel with them)."""
    if "k_pos" not in arrays:
        return arrays, attention, {}
    flipped = {name: arrays[name][..., ::-1, :].copy() for name in ("k", "v")}
    return {**arrays, **flipped, "k_pos": arrays["k_pos"][:, ::-1].copy()}, attention, {}


def _scale_on_keys(arrays: dict[str, Any], scalars: dict[str, Any], dtype: str) -> Any:
    """The scale folded into the keys instead of the queries: the scores round differently.

    Only where the spec computes in the input dtype (float32, float64): for
    float16 and bfloat16 the scaled keys would be rounded to the input dtype,
    a coarser change than any rounding of the computation.
    """
    if dtype not in ("float32", "float64"):
        return arrays, attention, {}
    scale = scalars.get("scale")
    if scale is None:
        scale = 1.0 / math.sqrt(arrays["q"].shape[-1]) if arrays["q"].shape[-1] else 0.0
    k = (arrays["k"].astype(dtype) * np.asarray(scale, dtype=dtype)).astype(np.float64)
    return {**arrays, "k": k}, attention, {"scale": 1.0}


def _dims_reordered(arrays: dict[str, Any], scalars: dict[str, Any], dtype: str) -> Any:
    """The head dim of q and k in another order: each dot product sums in another order."""
    D = arrays["q"].shape[-1]
    order = np.roll(np.arange(D)[::-1], D // 2)
    return {**arrays, "q": arrays["q"][..., order], "k": arrays["k"][..., order]}, attention, {}


def _online(block_k: int) -> Order:
    def order(arrays: dict[str, Any], scalars: dict[str, Any], dtype: str) -> Any:
        return arrays, partial(attention_blockwise, block_q=16, block_k=block_k), {}

    return order


#: Correct evaluations of the spec that round in different orders: one pass, keys
#: reversed, the scale on the keys, the dot products summed in another order, and
#: the online softmax one and eight keys at a time.
ROUNDING_ORDERS: tuple[Order, ...] = (
    _one_pass,
    _keys_reversed,
    _scale_on_keys,
    _dims_reordered,
    _online(1),
    _online(8),
)


def _scalars(spec: ProblemSpec) -> dict[str, Any]:
    return {"causal": spec.causal, "window": spec.window, "softcap": spec.softcap,
            "scale": spec.scale}  # fmt: skip


def _as_numpy(name: str, x: Any, shape: tuple[int, ...]) -> tuple[np.ndarray, str]:
    """A candidate's array as float64 NumPy, or a message saying why it is not usable."""
    try:
        array = to_numpy(x)
    except Exception as exc:
        return np.empty(0), f"{name} could not be read as an array: {exc!r}"
    if array.shape != shape:
        return array, f"{name} has shape {array.shape}, expected {shape}"
    return array, ""


def to_numpy(x: Any) -> np.ndarray:
    """Any library's array as float64 NumPy (bfloat16 and other narrow types widened)."""
    module = type(x).__module__.split(".")[0]
    if module == "torch":
        x = x.detach().cpu()
        return x.double().numpy() if x.is_floating_point() else x.numpy()
    if module == "cupy":
        return np.asarray(x.get(), dtype=np.float64)
    if module == "array_api_strict":
        return np.asarray(x._array, dtype=np.float64)
    return np.asarray(x, dtype=np.float64)


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
) -> Report:
    """Search for a problem on which ``fn`` disagrees with the spec; shrink it.

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
        None draws everything but ``nan_slots``
    seed : makes the search repeatable; None draws a fresh one
    on_example : called with every :class:`Outcome` of the search (a progress bar)

    Returns
    -------
    Report
        ``passed``, per-feature counts, and for each failing dtype the shrunk
        problem with its error, its bound and a reproducer (``to_code()``).

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
    chosen = resolve_features(features)
    dtypes = tuple(dtypes)
    case = resolve_case(backend, device, dtypes[0] if dtypes else "float32")
    for dtype in dtypes:
        resolve_case(backend, case.device, dtype)
    report = Report(name=qualified_name(fn), backend=backend, device=case.device,
                    dtypes=dtypes, features=chosen)  # fmt: skip
    strategy = attention_specs(chosen)
    for dtype in dtypes:

        def one(spec: ProblemSpec, dtype: str = dtype) -> tuple[Outcome, frozenset[str]]:
            outcome = check_problem(fn, spec, backend=backend, dtype=dtype, device=report.device)
            return outcome, features_of(spec)

        search(report, one, strategy, dtype, max_examples, seed, on_example)
    return report


def _check_checkable(spec: ProblemSpec) -> None:
    used = [n for n in ("mask", "bias", "sinks", "nan_slots", "sink_tokens") if getattr(spec, n)]
    if used:
        raise ValueError(
            f"a checked problem has no mask, bias, sinks, NaN values or sink tokens; "
            f"spec sets {used}"
        )
