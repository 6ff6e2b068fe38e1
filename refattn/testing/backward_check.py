r"""Check someone else's attention backward against the spec: ``check_attention_backward``.

``check_attention_backward(fn)`` draws the problems of ``check_attention``
(every option, the same strategies, shrinking and report), adds an output
gradient ``dout`` to each, and hands it to ``fn``, which returns the
gradients: a :class:`refattn.Gradients`, or a mapping with ``dq``, ``dk``,
``dv`` and, when the problem has them, ``dsink_logits`` and ``dbias``.

Each gradient :math:`g` is judged as flash-attn's tests judge theirs, by the
spec's own error in the dtype under test. With the inputs and ``dout``
rounded to the dtype :math:`t`, the oracle is :func:`refattn.attention_backward`
in float64 on NumPy, and

.. math::

    \max |g - g_{\text{oracle}}| \le k_t \max_{\text{orders}} |g_t - g_{\text{oracle}}|
        + \text{atol}_t \max(1, \max |g_{\text{oracle}}|)

where :math:`g_t` is the spec's backward in :math:`t` over a few correct
evaluations that round in different orders (:data:`BACKWARD_ORDERS`: one
pass; the forward's output and lse saved in :math:`t` first, as a kernel saves
them, by the forward in other orders; :math:`D` summed otherwise; the gradient
autograd sends through the forward's row maximum; FlashAttention-2's blockwise
loop; the keys reversed; the scale and the dims in other orders), and, for a candidate
with a precision contract, the spec's backward under that contract's
rounding (:func:`refattn.testing.precision.evaluate_backward`). :math:`k_t`
and :math:`\text{atol}_t` are the forward's (:data:`~refattn.testing.tolerance.TOLERANCES`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np

from refattn.attention import attention
from refattn.backends import Case, get
from refattn.backends.base import round_to
from refattn.backward import attention_backward, attention_backward_blockwise
from refattn.blockwise import attention_blockwise
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
from refattn.testing.drawing import (
    DEFAULT_FEATURES,
    FEATURES,
    corners_of,
    features_of,
    resolve_features,
)
from refattn.testing.precision import SPEC, Precision, evaluate_backward
from refattn.testing.problems import ProblemSpec, build_problem
from refattn.testing.report import Outcome, Report
from refattn.testing.search import search
from refattn.testing.strategies import attention_specs
from refattn.testing.tolerance import TOLERANCES, finite_max_abs, max_abs_error
from refattn.testing.verdict import MAX_BLOCKS, as_numpy, dims_order, scale_of

#: The gradients a backward returns, in the order they are judged.
GRADIENTS = ("dq", "dk", "dv", "dsink_logits", "dbias")
#: What a backward check can draw: the forward check's features but the lse (a backward
#: returns gradients) and the in-op cache (it returns no present).
BACKWARD_FEATURES = tuple(f for f in FEATURES if f not in ("lse", "in_op_cache"))
#: What it draws when ``features`` is None.
DEFAULT_BACKWARD_FEATURES = DEFAULT_FEATURES - {"lse"}


def output_gradient(spec: ProblemSpec) -> np.ndarray:
    """The problem's ``dout``, (B, Hq, Sq, Dv) float64 N(0, 1): from the spec's seed, drawn
    apart from the problem's own arrays, so the same spec always rebuilds it."""
    rng = np.random.default_rng([spec.seed, 1])
    return rng.standard_normal((spec.batch, spec.q_heads, spec.q_len, spec.value_dim))


def make_backward_problem(
    spec: ProblemSpec,
    *,
    backend: str = "numpy",
    dtype: str = "float32",
    device: str | None = None,
    precision: Precision | None = None,
) -> AttentionProblem:
    """The :class:`AttentionProblem` of ``spec`` with its ``dout``, on ``backend`` in ``dtype``.

    >>> p = make_backward_problem(ProblemSpec(q_len=2, k_len=3, value_dim=4))
    >>> p.dout.shape, p.dout.dtype
    ((1, 1, 2, 4), dtype('float32'))
    """
    case = resolve_case(backend, device, dtype)
    spec = _without_lse(spec)
    arrays = build_problem(spec).rounded(dtype)
    dout = _rounded(output_gradient(spec), dtype)
    return _handed(spec, arrays, dout, case, precision_of(None, precision))


def check_backward_problem(
    fn: Callable[[AttentionProblem], Any],
    spec: ProblemSpec,
    *,
    backend: str = "numpy",
    dtype: str = "float32",
    device: str | None = None,
    precision: Precision | None = None,
) -> Outcome:
    """Run the backward ``fn`` on one problem and judge its gradients by the tolerance rule.

    >>> import refattn
    >>> from refattn.testing import ProblemSpec
    >>> def mine(p):
    ...     opts = {n: x for n, x in p.options().items() if n != "return_lse"}
    ...     return refattn.attention_backward(p.q, p.k, p.v, p.dout, **opts)
    >>> check_backward_problem(mine, ProblemSpec(q_len=2, k_len=5, causal=True)).passed
    True
    """
    case = resolve_case(backend, device, dtype)
    contract = precision_of(fn, precision)
    spec = _without_lse(spec)
    built = build_problem(spec)
    arrays = built.rounded(dtype)
    dout = _rounded(output_gradient(spec), dtype)
    problem = _handed(spec, arrays, dout, case, contract)
    start = Outcome(spec=spec, dtype=dtype, backend=backend, device=case.device)
    result, failed = run_candidate(start, lambda: fn(problem))
    if failed is not None:
        return failed
    return judge_backward(start, result, arrays, built.scalars(), dout, contract)


def check_attention_backward(
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
    """Search for problems on which the backward ``fn`` disagrees with the spec's gradients.

    Parameters
    ----------
    fn : ``fn(problem: AttentionProblem)`` returns the gradients of the loss
        ``sum(out * problem.dout)`` (a :class:`refattn.Gradients`, or a mapping with
        ``dq``, ``dk``, ``dv``, and ``dsink_logits`` / ``dbias`` when the problem has
        sink logits / a bias); raises :class:`~refattn.testing.Unsupported` for a
        problem its kernel cannot express
    features : what may be drawn (:data:`BACKWARD_FEATURES`); None draws
        :data:`DEFAULT_BACKWARD_FEATURES`
    backend, device, dtypes, max_examples, seed, on_example, max_failures, precision,
    constraints : as for :func:`~refattn.testing.check_attention`

    Returns
    -------
    Report
        As ``check_attention``'s; each failure's symptom names the gradient
        (``wrong dk``), and its reproducer calls :func:`check_backward_problem`.

    Examples
    --------
    >>> import refattn
    >>> def mine(p):
    ...     opts = {n: x for n, x in p.options().items() if n != "return_lse"}
    ...     return refattn.attention_backward_blockwise(p.q, p.k, p.v, p.dout, block_k=4, **opts)
    >>> check_attention_backward(mine, max_examples=10, seed=0).passed
    True
    """
    max_examples = check_budget("max_examples", max_examples)
    max_failures = check_budget("max_failures", max_failures)
    if features is None:
        chosen = DEFAULT_BACKWARD_FEATURES
    else:
        chosen = resolve_features(features, allowed=BACKWARD_FEATURES)
    contract = precision_of(fn, precision)
    required = constraints_of(fn, constraints)
    if required.causal_only and "causal" not in chosen:
        raise ValueError("constraints say causal_only, so features must include 'causal'; "
                         f"got {sorted(chosen)}")  # fmt: skip
    report = new_report(fn, backend, device, dtypes, chosen)
    report.precision = contract
    report.check, report.search = "check_backward_problem", "check_attention_backward"
    strategy = attention_specs(chosen, constraints=required)
    for dtype in report.dtypes:

        def one(spec: ProblemSpec, dtype: str = dtype) -> tuple[Outcome, frozenset[str]]:
            outcome = check_backward_problem(fn, spec, backend=backend, dtype=dtype,
                                             device=report.device, precision=contract)  # fmt: skip
            return outcome, features_of(spec)

        search(report, one, strategy, dtype, max_examples=max_examples, seed=seed,
               on_example=on_example,
               allowed=lambda spec: features_of(spec) <= chosen and required.allows(spec),
               corners=corners_of, max_failures=max_failures)  # fmt: skip
        if report.unavailable:
            break
    return report


def judge_backward(
    start: Outcome,
    result: Any,
    arrays: dict[str, np.ndarray],
    scalars: dict[str, Any],
    dout: np.ndarray,
    precision: Precision = SPEC,
) -> Outcome:
    """A candidate's gradients against the oracle's, each by the rule with its own allowance."""
    wanted = [n for n in GRADIENTS if _expected(n, arrays)]
    given, message = _gradients_of(result, wanted)
    if message:
        return start.but(message=message)
    oracle, allowed = backward_allowance(arrays, scalars, dout, start.dtype, precision)
    verdicts = []
    for name in wanted:
        reference = oracle[name]
        assert reference is not None
        got, message = as_numpy(name, given[name], reference.shape)
        if message:
            return start.but(message=message)
        verdicts.append((name, max_abs_error(got, reference), allowed[name]))
    return start.but(gradients=tuple(verdicts))


def backward_allowance(
    arrays: dict[str, np.ndarray],
    scalars: dict[str, Any],
    dout: np.ndarray,
    dtype: str,
    precision: Precision = SPEC,
) -> tuple[dict[str, np.ndarray | None], dict[str, float]]:
    """The oracle's gradients for a problem, and the error each may carry.

    ``arrays`` and ``dout`` are float64 NumPy, already rounded to ``dtype``.
    Each gradient's spec error is the largest over :data:`BACKWARD_ORDERS` in
    ``dtype`` and, where the contract is not the spec's, the spec's backward
    under it; the allowance is the rule of ``TOLERANCES[dtype]`` scaled by the
    oracle gradient's size.
    """
    oracle = _on_numpy(arrays, scalars, dout, "float64", attention_backward)
    errors = dict.fromkeys(GRADIENTS, 0.0)
    for order in BACKWARD_ORDERS:
        for name, g in order(arrays, scalars, dout, dtype).items():
            if g is not None and oracle[name] is not None:
                errors[name] = max(errors[name], max_abs_error(g, oracle[name]))
    if not precision.is_default(dtype):
        for name, g in evaluate_backward(arrays, scalars, dout, dtype, precision).items():
            reference = oracle[name]
            if g is not None and reference is not None:
                error = max_abs_error(g, reference)
                errors[name] = max(errors[name], error) if math.isfinite(error) else errors[name]
    rule = TOLERANCES[dtype]
    allowed = {
        name: rule.allowed(errors[name], finite_max_abs(g))
        for name, g in oracle.items()
        if g is not None
    }
    return oracle, allowed


Gradient = dict[str, "np.ndarray | None"]


def _on_numpy(
    arrays: dict[str, np.ndarray],
    scalars: dict[str, Any],
    dout: np.ndarray,
    dtype: str,
    form: Callable[..., Any],
    *,
    saved: bool = False,
    kept_lse: Callable[[np.ndarray], np.ndarray] | None = None,
    forward: tuple[dict[str, np.ndarray], dict[str, Any]] | None = None,
    forward_form: Callable[..., Any] = attention,
) -> Gradient:
    """``form`` (a backward of the spec) on NumPy in ``dtype``; its gradients as float64.
    With ``saved``, the spec's forward (``forward_form``) in ``dtype`` first, on the
    ``forward`` arrays and scalars where given (the same problem, rounded otherwise), and
    its out and lse handed on (the lse as ``kept_lse`` keeps it, where given)."""
    backend = get("numpy")

    def on_numpy(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        return {n: backend.asarray(x, dtype=dtype, device="cpu") for n, x in arrays.items()}

    on = on_numpy(arrays)
    d_out = backend.asarray(dout, dtype=dtype, device="cpu")
    kept = {}
    if saved:
        forward_on, forward_scalars = (on, scalars) if forward is None else forward
        if forward is not None:
            forward_on = on_numpy(forward_on)
        out, lse = forward_form(**forward_on, **forward_scalars, return_lse=True)
        kept = {"out": out, "lse": lse if kept_lse is None else kept_lse(lse)}
    grads = form(on.pop("q"), on.pop("k"), on.pop("v"), d_out, **kept, **on, **scalars)
    return {
        name: None if getattr(grads, name) is None
        else np.asarray(backend.to_numpy(getattr(grads, name)), dtype=np.float64)
        for name in GRADIENTS
    }  # fmt: skip


def _one_pass(arrays: Any, scalars: Any, dout: Any, dtype: str) -> Gradient:
    return _on_numpy(arrays, scalars, dout, dtype, attention_backward)


def _saved_forward(arrays: Any, scalars: Any, dout: Any, dtype: str) -> Gradient:
    """The forward's out saved in ``dtype`` (and its lse), as a kernel keeps them."""
    return _on_numpy(arrays, scalars, dout, dtype, attention_backward, saved=True)


def _lse_in_base_2(arrays: Any, scalars: Any, dout: Any, dtype: str) -> Gradient:
    """The forward's lse saved in base 2 (:math:`\\log_2 Z = \\text{lse} / \\ln 2`, in the
    lse's float32 or float64), as FlexAttention and Triton's kernels keep it, and turned back
    in the backward: two more roundings of a number as large as the row's largest score,
    which :math:`P = e^{s - \\text{lse}}` feels in full where the scores are near 1e4 and the
    spec's own lse is exact (a row nearly one-hot, whose lse is its largest score)."""

    def round_trip(lse: np.ndarray) -> np.ndarray:
        ln2 = np.asarray(math.log(2.0), dtype=lse.dtype)
        with np.errstate(invalid="ignore"):  # -inf, a row that sees nothing, stays -inf
            return (lse / ln2) * ln2

    return _on_numpy(arrays, scalars, dout, dtype, attention_backward, saved=True,
                     kept_lse=round_trip)  # fmt: skip


def _forward_dims_reordered(arrays: Any, scalars: Any, dout: Any, dtype: str) -> Gradient:
    """The forward's out and lse from the head dim in another order, the backward's scores
    in the first: a kernel's backward recomputes :math:`P = e^{s - \\text{lse}}` with a
    product of its own, and where the scores are near 1e4 its rounding of a row's largest
    score and the forward's differ by an ulp of it, which P feels in full. (The spec's
    forward and backward round alike, so on a row nearly one-hot they are exact.)"""
    order = dims_order(arrays["q"].shape[-1])
    permuted = {name: arrays[name][..., order] for name in ("q", "k")}
    return _on_numpy(arrays, scalars, dout, dtype, attention_backward, saved=True,
                     forward=({**arrays, **permuted}, scalars))  # fmt: skip


def _forward_scale_on_keys(arrays: Any, scalars: Any, dout: Any, dtype: str) -> Gradient:
    """As :func:`_forward_dims_reordered`, with the forward's scale on the keys instead
    (float32 and float64 only, as :func:`_scale_on_keys`)."""
    if dtype not in ("float32", "float64"):
        return {}
    k = arrays["k"].astype(dtype) * np.asarray(scale_of(arrays, scalars), dtype=dtype)
    return _on_numpy(arrays, scalars, dout, dtype, attention_backward, saved=True,
                     forward=({**arrays, "k": k.astype(np.float64)},
                              {**scalars, "scale": 1.0}))  # fmt: skip


def _online_forward(arrays: Any, scalars: Any, dout: Any, dtype: str) -> Gradient:
    """The forward's out and lse from the online softmax, a key at a time (in at most
    :data:`MAX_BLOCKS` blocks), as FlashAttention's forward saves them; the backward in one
    pass. The rescaled running sums round the output otherwise, which :math:`D` and, with
    large keys, :math:`dQ = dS\\, K` carry."""
    Sk = arrays["k"].shape[-2]
    form = partial(attention_blockwise, block_q=16, block_k=max(1, -(-Sk // MAX_BLOCKS)))
    return _on_numpy(arrays, scalars, dout, dtype, attention_backward, saved=True,
                     forward_form=form)  # fmt: skip


def _delta_over_keys(arrays: Any, scalars: Any, dout: Any, dtype: str) -> Gradient:
    """:math:`D_i = \\sum_j P_{ij} dP_{ij}`, summed over the keys in working precision, as
    the softmax's own backward forms it (autograd through a plain softmax), in place of
    :math:`dO_i \\cdot o_i` (:func:`~refattn.testing.precision.evaluate_backward`)."""
    return evaluate_backward(arrays, scalars, dout, dtype, SPEC, delta_from="weights")


def _delta_in_sequence(arrays: Any, scalars: Any, dout: Any, dtype: str) -> Gradient:
    """:math:`D_i = dO_i \\cdot o_i` summed over the value dims one at a time, otherwise than
    the products :math:`dP_{ij} = dO_i \\cdot v_j`: on a row whose weight is all on one key,
    :math:`o_i = v_j` and :math:`dP_{ij} - D_i` is the difference of two roundings of one dot
    product, which every other order may round alike (exactly 0) and a kernel that tiles
    the keys otherwise does not; :math:`dQ = dS\\, K` multiplies it by the keys."""
    return evaluate_backward(arrays, scalars, dout, dtype, SPEC, delta_from="sequence")


def _through_the_max(arrays: Any, scalars: Any, dout: Any, dtype: str) -> Gradient:
    """The gradient that autograd through a forward which subtracts each row's largest score
    sends back through that maximum: :math:`-\\sum_j dS_{ij}`, 0 in exact arithmetic, the
    rounding of a sum of terms of both signs at the row's largest key, which dbias (and
    dQ, dK) carry."""
    return evaluate_backward(arrays, scalars, dout, dtype, SPEC, through_max=True)


def _blockwise(arrays: Any, scalars: Any, dout: Any, dtype: str) -> Gradient:
    """FlashAttention-2's loop, eight keys a tile (at most :data:`MAX_BLOCKS` tiles a row)."""
    Sk = arrays["k"].shape[-2]
    form = partial(attention_backward_blockwise, block_q=16, block_k=max(8, -(-Sk // MAX_BLOCKS)))
    return _on_numpy(arrays, scalars, dout, dtype, form, saved=True)


def _keys_reversed(arrays: Any, scalars: Any, dout: Any, dtype: str) -> Gradient:
    """The key slots in reverse order (positions and mask or bias columns with them); the
    key-indexed gradients turned back."""
    if "k_pos" not in arrays:
        return {}
    flipped = {name: arrays[name][..., ::-1, :].copy() for name in ("k", "v")}
    for name in ("mask", "bias"):
        if name in arrays and arrays[name].shape[-1] != 1:
            flipped[name] = arrays[name][..., ::-1].copy()
    flipped["k_pos"] = arrays["k_pos"][:, ::-1].copy()
    grads = _on_numpy({**arrays, **flipped}, scalars, dout, dtype, attention_backward)
    for name in ("dk", "dv"):
        g = grads[name]
        grads[name] = None if g is None else g[..., ::-1, :]
    dbias = grads["dbias"]
    if dbias is not None and dbias.shape[-1] != 1:
        grads["dbias"] = dbias[..., ::-1]
    return grads


def _scale_on_keys(arrays: Any, scalars: Any, dout: Any, dtype: str) -> Gradient:
    """The scale folded into the keys, rounded to the dtype (float32 and float64 only, as
    the forward's order): the scores round as in a kernel that scales after the product.
    The scaled keys' gradient times the scale is the keys'."""
    if dtype not in ("float32", "float64"):
        return {}
    scale = scale_of(arrays, scalars)
    k = (arrays["k"].astype(dtype) * np.asarray(scale, dtype=dtype)).astype(np.float64)
    grads = _on_numpy({**arrays, "k": k}, {**scalars, "scale": 1.0}, dout, dtype,
                      attention_backward)  # fmt: skip
    dk = grads["dk"]
    grads["dk"] = None if dk is None else dk * scale
    return grads


def _dims_reordered(arrays: Any, scalars: Any, dout: Any, dtype: str) -> Gradient:
    """The head dim of q and k in another order, so every dot product with them (the
    scores, dQ's and dK's) sums in another order; dq and dk put back."""
    order = dims_order(arrays["q"].shape[-1])
    permuted = {name: arrays[name][..., order] for name in ("q", "k")}
    grads = _on_numpy({**arrays, **permuted}, scalars, dout, dtype, attention_backward)
    back = np.argsort(order)
    for name in ("dq", "dk"):
        g = grads[name]
        grads[name] = None if g is None else g[..., back]
    return grads


def _value_dims_reordered(arrays: Any, scalars: Any, dout: Any, dtype: str) -> Gradient:
    """The value dim of v and dO in another order, so :math:`D_i = dO_i \\cdot o_i` and
    :math:`dP_{ij} = dO_i \\cdot v_j` sum in another order: on a row nearly one-hot,
    :math:`dP_{ij} - D_i` is a cancellation whose rounding :math:`dQ = dS\\, K` multiplies
    by the keys; dv put back."""
    order = dims_order(arrays["v"].shape[-1])
    grads = _on_numpy({**arrays, "v": arrays["v"][..., order]}, scalars, dout[..., order],
                      dtype, attention_backward)  # fmt: skip
    dv = grads["dv"]
    grads["dv"] = None if dv is None else dv[..., np.argsort(order)]
    return grads


Order = Callable[[dict[str, Any], dict[str, Any], np.ndarray, str], Gradient]
#: Correct evaluations of the backward that round in different orders: one pass; the
#: forward's output saved in the dtype first (its lse as it is, or in base 2, or the forward
#: rounded in another order than the backward's recomputed scores, or by the online
#: softmax); D summed over the keys, as autograd does, or over the value dims in sequence;
#: the gradient autograd sends through the forward's row max; FlashAttention-2's blockwise loop;
#: the keys reversed; the scale on the keys and the head dim reordered (the forward's); the
#: value dim reordered.
BACKWARD_ORDERS: tuple[Order, ...] = (
    _one_pass,
    _saved_forward,
    _lse_in_base_2,
    _forward_dims_reordered,
    _forward_scale_on_keys,
    _online_forward,
    _delta_over_keys,
    _delta_in_sequence,
    _through_the_max,
    _blockwise,
    _keys_reversed,
    _scale_on_keys,
    _dims_reordered,
    _value_dims_reordered,
)


def _expected(name: str, arrays: Mapping[str, Any]) -> bool:
    """Whether a problem's backward has gradient ``name``."""
    if name == "dsink_logits":
        return "sink_logits" in arrays
    if name == "dbias":
        return "bias" in arrays
    return True


def _gradients_of(result: Any, wanted: list[str]) -> tuple[dict[str, Any], str]:
    """The candidate's gradients by name, or a message saying why they cannot be read."""
    if isinstance(result, Mapping):
        given = {name: result.get(name) for name in GRADIENTS}
    elif all(hasattr(result, name) for name in ("dq", "dk", "dv")):
        given = {name: getattr(result, name, None) for name in GRADIENTS}
    else:
        return {}, (
            "fn must return the gradients: a refattn.Gradients, or a mapping with "
            f"{wanted}; got {type(result).__name__}"
        )
    missing = [name for name in wanted if given.get(name) is None]
    if missing:
        return given, (
            f"the problem's backward has gradients {wanted}, but fn returned none for "
            f"{missing} (raise Unsupported where a kernel does not compute one)"
        )
    return given, ""


def _without_lse(spec: ProblemSpec) -> ProblemSpec:
    """A backward returns gradients, not an lse: a spec asking for one is taken without."""
    return replace(spec, return_lse=False) if spec.return_lse else spec


def _rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    return round_to(x, dtype).astype(np.float64)


def _handed(
    spec: ProblemSpec,
    arrays: dict[str, np.ndarray],
    dout: np.ndarray,
    case: Case,
    precision: Precision,
) -> AttentionProblem:
    problem = on_backend(spec, arrays, case, precision)
    return replace(problem, dout=case.backend.asarray(dout, dtype=case.dtype, device=case.device))
