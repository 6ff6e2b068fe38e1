r"""The verdict on one problem: what the oracle says, and how far a candidate may be from it.

The tolerance rule of :mod:`refattn.testing.tolerance`: with the inputs
rounded to the dtype :math:`t` under test, the oracle is the spec in float64
on NumPy and :math:`\text{spec}_t` the spec on NumPy in :math:`t`;

.. math::

    \max |\text{out} - \text{oracle}| \le k_t \max |\text{spec}_t - \text{oracle}|
        + \text{atol}_t \max(1, \max|v|)

and the same for the log-sum-exp, scaled by :math:`\max(1, \max|\text{lse}|)`.
The spec's error is the largest over a few correct evaluations that round in
different orders (:data:`ROUNDING_ORDERS`: one pass, keys reversed, the scale
on the keys, the dot products summed in another order, online softmax): on a
row whose best keys nearly tie under scores near 1e4, one order alone can be
luckily exact, and k times a lucky error would flag a correct kernel (see
:func:`allowance`).

A NaN, or an infinity where the oracle has none, is an infinite error; a
fully masked row must give 0 and an lse of :math:`-\infty`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from refattn.attention import attention
from refattn.backends import Case, get, to_numpy
from refattn.blockwise import attention_blockwise
from refattn.testing.candidate import Result, present_arrays
from refattn.testing.precision import SPEC, Precision, evaluate
from refattn.testing.report import Outcome
from refattn.testing.tolerance import TOLERANCES, ErrorBound, finite_max_abs, max_abs_error


def run_spec(
    case: Case,
    arrays: dict[str, np.ndarray],
    scalars: dict[str, Any],
    fn: Callable[..., Any] = attention,
) -> tuple[np.ndarray, np.ndarray]:
    """``fn`` (``attention`` or a form of it) on the case's backend, as the backend runs a
    whole function best (:meth:`~refattn.backends.base.Backend.compiled`: jitted on JAX);
    (out, lse) as NumPy."""
    backend = case.backend
    on = {n: backend.asarray(x, dtype=case.dtype, device=case.device) for n, x in arrays.items()}
    out, lse = backend.compiled(fn, **scalars, return_lse=True)(**on)
    return backend.to_numpy(out), backend.to_numpy(lse)


def allowance(
    arrays: dict[str, Any], scalars: dict[str, Any], dtype: str, precision: Precision = SPEC
) -> tuple[np.ndarray, np.ndarray, ErrorBound]:
    """The oracle's ``out`` and ``lse`` for a problem, and the errors a candidate may make.

    ``arrays`` are float64 NumPy, already rounded to ``dtype``. The allowance
    is the cross-implementation rule, ``k * |spec_t - oracle| + atol``, where the spec's error
    is the largest over :data:`ROUNDING_ORDERS`, correct evaluations in
    ``dtype`` that round in different orders. One order alone can be luckily
    exact on a row whose best keys nearly tie under scores near 1e4, where a
    correct kernel rounding in yet another order is not: PyTorch's CPU SDPA,
    which scales after the dot product, erred by 3.1e-3 on such a row where
    the one-pass spec erred by 3.1e-4 and the online softmax by 1.1e-3. Most
    of that spread comes from how the scores round, hence the orders with the
    scale on the keys and with the dot products summed in another order.

    A candidate that declares a ``precision`` contract other than the spec's
    (:mod:`refattn.testing.precision`) is allowed, on top, ``k`` times the
    error of the spec evaluated under that contract's rounding: every score
    operation rounded (an eager layer) and each score step rounded once (a
    fused kernel), keys in order and reversed. Where an evaluation is not
    finite (a float16 product that overflows before the scale) it is left
    out, and with no finite one the spec's own allowance stands: an overflow
    is never excused.
    """
    ref_out, ref_lse = attention(**arrays, **scalars, return_lse=True)  # float64 NumPy
    numpy_case = Case(get("numpy"), "cpu", dtype)
    out_error = lse_error = 0.0
    for order in ROUNDING_ORDERS:
        ordered, form, changed = order(arrays, scalars, dtype)
        spec_out, spec_lse = run_spec(numpy_case, ordered, {**scalars, **changed}, form)
        out_error = max(out_error, max_abs_error(spec_out, ref_out))
        lse_error = max(lse_error, max_abs_error(spec_lse, ref_lse))
    # The dot products summed one dim at a time, as a plain loop or a non-BLAS matmul
    # does: on scores that cancel (terms near 1e4 summing to near 0) its error is many
    # times a blocked GEMM's.
    loop_out, loop_lse = evaluate(arrays, scalars, dtype, SPEC, sequential=True)
    out_error = _finite_max(out_error, max_abs_error(loop_out, ref_out))
    lse_error = _finite_max(lse_error, max_abs_error(loop_lse, ref_lse))
    if not precision.is_default(dtype):
        for order, fused in ((_one_pass, False), (_one_pass, True), (_keys_reversed, True)):
            ordered, _, _ = order(arrays, scalars, dtype)
            contract_out, contract_lse = evaluate(ordered, scalars, dtype, precision,
                                                  fused=fused)  # fmt: skip
            out_error = _finite_max(out_error, max_abs_error(contract_out, ref_out))
            lse_error = _finite_max(lse_error, max_abs_error(contract_lse, ref_lse))
    rule = TOLERANCES[dtype]
    out_allowed = rule.allowed(out_error, finite_max_abs(arrays["v"]))
    lse_allowed = rule.allowed(lse_error, max(1.0, finite_max_abs(ref_lse)))
    return ref_out, ref_lse, ErrorBound(out=out_allowed, lse=lse_allowed)


def _finite_max(error: float, contract_error: float) -> float:
    return max(error, contract_error) if math.isfinite(contract_error) else error


def judge(start: Outcome, result: Any, arrays: dict[str, Any], scalars: dict[str, Any],
          return_lse: bool, precision: Precision = SPEC) -> Outcome:  # fmt: skip
    """A candidate's result (``out``, ``(out, lse)`` or a
    :class:`~refattn.testing.candidate.Result`) against the oracle by the rule, with the
    allowance of the candidate's ``precision`` contract; a Result's present K/V must equal
    the problem's exactly, and its "don't care" rows are left out of the comparison."""
    present = dont_care = None
    if isinstance(result, Result):
        out_raw, lse_raw, present, dont_care = (
            result.out,
            result.lse,
            result.present,
            result.dont_care,
        )
        if return_lse and lse_raw is None:
            return start.but(message="return_lse is set, so the Result must carry lse")
        if not return_lse and lse_raw is not None:
            return start.but(message="return_lse is not set, so the Result must carry no lse")
    elif return_lse:
        if not (isinstance(result, tuple | list) and len(result) == 2):
            return start.but(message="return_lse is set, so fn must return (out, lse)")
        out_raw, lse_raw = result
    else:
        if isinstance(result, tuple | list):
            return start.but(message="return_lse is not set, so fn must return out alone")
        out_raw, lse_raw = result, None
    ref_out, ref_lse, allowed = allowance(arrays, scalars, start.dtype, precision)
    out, message = as_numpy("out", out_raw, ref_out.shape)
    if message:
        return start.but(message=message)
    ignored = np.zeros(ref_out.shape[:1] + ref_out.shape[2:3], dtype=bool)  # (B, Sq)
    if dont_care is not None:
        ignored, message = _rows(dont_care, ignored.shape)
        if message:
            return start.but(message=message)
        out = np.where(ignored[:, None, :, None], ref_out, out)
    outcome = start.but(error=max_abs_error(out, ref_out), allowed=allowed.out,
                        ignored_rows=int(ignored.sum()))  # fmt: skip
    if lse_raw is not None:
        lse, message = as_numpy("lse", lse_raw, ref_lse.shape)
        if message:
            return outcome.but(message=message)
        lse = np.where(ignored[:, None, :], ref_lse, lse)
        outcome = outcome.but(lse_error=max_abs_error(lse, ref_lse), lse_allowed=allowed.lse)
    if present is not None:
        outcome = _judge_present(outcome, present, arrays)
    return outcome


def _rows(dont_care: Any, shape: tuple[int, ...]) -> tuple[np.ndarray, str]:
    """A candidate's "don't care" rows as (B, Sq) booleans, or a message saying why not."""
    try:
        rows = np.asarray(to_numpy(dont_care))
    except Exception as exc:
        return np.zeros(shape, dtype=bool), f"dont_care could not be read as an array: {exc!r}"
    if rows.dtype != np.bool_ or rows.shape != shape:
        return (
            rows,
            f"dont_care must be booleans of shape {shape} (B, Sq); got {rows.dtype} {rows.shape}",
        )
    return rows, ""


def _judge_present(outcome: Outcome, present: Any, arrays: dict[str, Any]) -> Outcome:
    """An in-op cache's present K/V against the problem's keys and values: equal, exactly,
    in every held slot (``k_pos >= 0``) of the first Sk; slots past Sk are the cache's own."""
    try:
        pair = present_arrays(present)
    except TypeError as exc:
        return outcome.but(message=str(exc))
    held = arrays["k_pos"] >= 0  # (B, Sk)
    for name, raw in zip(("k", "v"), pair, strict=True):
        want = arrays[name]  # (B, Hkv, Sk, D)
        B, H, Sk, D = want.shape
        try:
            got = np.asarray(to_numpy(raw), dtype=np.float64)
        except Exception as exc:
            return outcome.but(message=f"present {name} could not be read as an array: {exc!r}")
        if got.ndim != 4 or got.shape[:2] != (B, H) or got.shape[3] != D or got.shape[2] < Sk:
            return outcome.but(
                message=f"present {name} has shape {got.shape}, expected ({B}, {H}, S >= {Sk}, {D})"
            )
        got = got[:, :, :Sk]
        same = (got == want) | (np.isnan(got) & np.isnan(want))  # (B, Hkv, Sk, D)
        wrong = held[:, None, :] & ~same.all(axis=-1)  # (B, Hkv, Sk)
        if wrong.any():
            b, h, j = (int(i[0]) for i in np.nonzero(wrong))
            return outcome.but(
                finding="wrong present K/V",
                message=f"present {name} differs from the problem's {name} in "
                f"{int(wrong.sum())} held slots, the first row {b}, KV head {h}, slot {j} "
                f"(k_pos {int(arrays['k_pos'][b, j])}): got {got[b, h, j, :4].tolist()}, "
                f"expected {want[b, h, j, :4].tolist()}",
            )
    return outcome


def as_numpy(name: str, x: Any, shape: tuple[int, ...]) -> tuple[np.ndarray, str]:
    """A candidate's array as float64 NumPy, or a message saying why it is not usable."""
    try:
        array = np.asarray(to_numpy(x), dtype=np.float64)
    except Exception as exc:
        return np.empty(0), f"{name} could not be read as an array: {exc!r}"
    if array.shape != shape:
        return array, f"{name} has shape {array.shape}, expected {shape}"
    return array, ""


Order = Callable[
    [dict[str, Any], dict[str, Any], str], tuple[dict[str, Any], Callable[..., Any], dict[str, Any]]
]


def _one_pass(arrays: dict[str, Any], scalars: dict[str, Any], dtype: str) -> Any:
    return arrays, attention, {}


def _keys_reversed(arrays: dict[str, Any], scalars: dict[str, Any], dtype: str) -> Any:
    """The same problem with the key slots in reverse order (positions, and the columns of a
    mask or bias, travel with them)."""
    if "k_pos" not in arrays:
        return arrays, attention, {}
    flipped = {name: arrays[name][..., ::-1, :].copy() for name in ("k", "v")}
    for name in ("mask", "bias"):  # (..., Sq, Sk), or 1 along the keys when shared by them
        if name in arrays and arrays[name].shape[-1] != 1:
            flipped[name] = arrays[name][..., ::-1].copy()
    return {**arrays, **flipped, "k_pos": arrays["k_pos"][:, ::-1].copy()}, attention, {}


def _scale_on_keys(arrays: dict[str, Any], scalars: dict[str, Any], dtype: str) -> Any:
    """The scale folded into the keys instead of the queries: the scores round differently.

    Only where the spec computes in the input dtype (float32, float64): for
    float16 and bfloat16 the scaled keys would be rounded to the input dtype,
    a coarser change than any rounding of the computation.
    """
    if dtype not in ("float32", "float64"):
        return arrays, attention, {}
    scale = scale_of(arrays, scalars)
    k = (arrays["k"].astype(dtype) * np.asarray(scale, dtype=dtype)).astype(np.float64)
    return {**arrays, "k": k}, attention, {"scale": 1.0}


def scale_of(arrays: dict[str, Any], scalars: dict[str, Any]) -> float:
    """The problem's scale: the one given, or :math:`1/\\sqrt{D}` (0 for D = 0)."""
    scale = scalars.get("scale")
    if scale is None:
        D = arrays["q"].shape[-1]
        scale = 1.0 / math.sqrt(D) if D else 0.0
    return float(scale)


def dims_order(D: int) -> np.ndarray:
    """The head dim's order that :func:`_dims_reordered` sums in: reversed, then rolled."""
    return np.roll(np.arange(D)[::-1], D // 2)


def _dims_reordered(arrays: dict[str, Any], scalars: dict[str, Any], dtype: str) -> Any:
    """The head dim of q and k in another order: each dot product sums in another order."""
    order = dims_order(arrays["q"].shape[-1])
    return {**arrays, "q": arrays["q"][..., order], "k": arrays["k"][..., order]}, attention, {}


#: The online orders take at most this many key blocks: a row of 4096 keys one key at a
#: time would cost seconds a problem, and past a few hundred blocks the rescaling's
#: rounding is what it is.
MAX_BLOCKS = 128


def _online(block_k: int) -> Order:
    def order(arrays: dict[str, Any], scalars: dict[str, Any], dtype: str) -> Any:
        Sk = arrays["k"].shape[-2]
        block = max(block_k, -(-Sk // MAX_BLOCKS))
        return arrays, partial(attention_blockwise, block_q=16, block_k=block), {}

    return order


#: Correct evaluations of the spec that round in different orders: one pass, keys
#: reversed, the scale on the keys, the dot products summed in another order, and
#: the online softmax one and eight keys at a time (in at most :data:`MAX_BLOCKS` blocks).
ROUNDING_ORDERS: tuple[Order, ...] = (
    _one_pass,
    _keys_reversed,
    _scale_on_keys,
    _dims_reordered,
    _online(1),
    _online(8),
)
