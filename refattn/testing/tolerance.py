r"""How close is close enough: every tolerance refattn uses, in one place.

Two rules measured against an oracle computed in float64 on the inputs
rounded to the dtype under test (rounding the inputs is the caller's choice,
not an error of the implementation, so it is not charged to it), and, at the
end of this module, the ``np.allclose`` tolerances with which two outputs are
said to agree without an oracle (``refattn bench``'s check of every row
against SDPA, :data:`AGREEMENT`; the seed experiment's cached-against-uncached
comparison, :func:`rounding_tolerance`).

**The spec's own error bound.** A forward error analysis of the spec's
algorithm in compute precision :math:`u_c` (unit roundoff; float32 for
float16/bfloat16 inputs) with output precision :math:`u_t`:

.. math::

    E_s &= (D + 2)\, u_c \max_{ij} \text{scale} \textstyle\sum_d |q_{id}| |k_{jd}|
          + 4 u_c \max |s_{ij}| \qquad \text{(error of one score)} \\
    \rho &= e^{2 E_s} - 1 \qquad \text{(relative error of one weight from the scores)} \\
    |o - o^*| &\le C \left(\rho\, \sigma + (2 S_k + 5)\, u_c \max|v|\right) + u_t \max|v| \\
    |\text{lse} - \text{lse}^*| &\le
        C \left(E_s + (S_k + 3) u_c + u_c \max(1, |\text{lse}^*|)\right)

with a safety factor :math:`C = 2` for the second-order terms. :math:`\max|s|`
covers the modifiers (softcap, ALiBi, bias, sink) as well. :math:`\sigma` is
the spread of the values under the reference weights, :math:`\max_i \sum_j
p_{ij} \lVert v_j - o_i \rVert_\infty` (:math:`\lVert v_j \rVert_\infty` with a
sink, whose weight does not move with the scores): perturbing every weight by
a factor within :math:`e^{\pm 2E_s}` moves the output by at most
:math:`\rho\,\sigma`, which is nearly nothing for a one-hot row however large
its logits. Without the weights, :math:`\sigma = \max|v|`. Every backend runs
the same algorithm, so every backend must meet this bound.

**The cross-implementation rule** (refattn's design rule, as flash-attn's tests
use it): a candidate in dtype :math:`t` passes when

.. math::

    \max |\text{candidate} - \text{oracle}| \le k_t \max |\text{spec}_t - \text{oracle}|
        + \text{atol}_t \cdot \max(1, \max|v|)

where :math:`\text{spec}_t` is the spec on NumPy in dtype :math:`t`. In float16
and bfloat16 the error is mostly the output's own rounding, the same for any
correct implementation, so flash-attn's :math:`k = 2` holds. In float32 and
float64 it is rounding noise in the scores, which two correct implementations
draw differently: Hypothesis found torch at 2.5x NumPy's error with logits near
1e4, so these take PyTorch's SDPA-test fudge factor, :math:`k = 5`.

For third-party kernels (``check_attention``), :math:`\text{spec}_t`'s error
is the largest over a few correct evaluations of the spec that round in
different orders (one pass, keys reversed, online softmax): on an
ill-conditioned row (two keys nearly tied under scores near 1e4) one order
alone can be luckily exact.

==========  =====  ============  ====================================
dtype       k_t    atol_t        why atol_t
==========  =====  ============  ====================================
float64     5      1e-10         accumulation over short rows
float32     5      1e-5          a few ulps of float32 after a sum
float16     2      2^-9          two ulps of float16 output rounding
bfloat16    2      2^-6          two ulps of bfloat16 output rounding
==========  =====  ============  ====================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from refattn.namespace import compute_dtype_name

#: Unit roundoff (half the machine epsilon) of each dtype.
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
#: Safety factor on the first-order error bound.
SAFETY = 2.0


@dataclass(frozen=True)
class Tolerance:
    """The cross-implementation rule for one dtype: ``k * spec_error + atol * scale``."""

    k: float
    atol: float

    def allowed(self, spec_error: float, value_scale: float) -> float:
        return self.k * spec_error + self.atol * max(1.0, value_scale)


TOLERANCES = {
    "float64": Tolerance(k=5.0, atol=1e-10),
    "float32": Tolerance(k=5.0, atol=1e-5),
    "float16": Tolerance(k=2.0, atol=2.0**-9),
    "bfloat16": Tolerance(k=2.0, atol=2.0**-6),
}


@dataclass(frozen=True)
class ErrorBound:
    """The spec's forward error bound for one problem: on out, and on finite lse."""

    out: float
    lse: float


def spec_error_bound(
    arrays: dict[str, np.ndarray],
    *,
    dtype: str,
    scale: float | None = None,
    lse_scale: float = 1.0,
    out: np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> ErrorBound:
    """The error bound of the module docstring for inputs already rounded to ``dtype``.

    Parameters
    ----------
    arrays : dict
        The float64 arrays of the call: ``q, k, v`` and any of ``q_pos, k_pos,
        bias, alibi_slopes, sink_logits``
    dtype : the dtype the spec ran in
    scale : the score scale (default ``1/sqrt(D)``)
    lse_scale : the largest finite ``|lse|`` of the reference
    out, weights : the reference's output (B, Hq, Sq, Dv) and softmax weights
        (B, Hq, Sq, Sk), for the spread of the values; without them the
        spread is ``max|v|``
    """
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    u_c = UNIT_ROUNDOFF[compute_dtype_name(dtype)]  # the spec's precision policy
    u_t = UNIT_ROUNDOFF[dtype]
    D, Sk = q.shape[-1], k.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D else 0.0
    dot = abs(scale) * _max_abs_dot(q, k)
    e_s = (D + 2) * u_c * dot + 4 * u_c * _max_abs_score(arrays, dot)
    rho = math.expm1(min(2 * e_s, 50.0))
    v_max = finite_max_abs(v)
    spread = v_max
    if out is not None and weights is not None:
        spread = min(v_max, _spread(v, out, weights, centred="sink_logits" not in arrays))
    out_bound = SAFETY * (rho * spread + (2 * Sk + 5) * u_c * v_max) + u_t * v_max
    lse = SAFETY * (e_s + (Sk + 3) * u_c + u_c * max(1.0, lse_scale))
    return ErrorBound(out=out_bound + 1e-300, lse=lse)


def _spread(v: np.ndarray, out: np.ndarray, weights: np.ndarray, *, centred: bool) -> float:
    """``max_i sum_j p_ij |v_j - o_i|_inf`` (or ``|v_j|_inf`` when not centred)."""
    if weights.size == 0 or out.size == 0:
        return 0.0
    group = out.shape[1] // v.shape[1]
    v_rep = np.nan_to_num(np.repeat(v, group, axis=1))[:, :, None, :, :]  # (B, Hq, 1, Sk, Dv)
    centre = np.nan_to_num(out)[:, :, :, None, :] if centred else 0.0  # (B, Hq, Sq, 1, Dv)
    distance = np.abs(v_rep - centre).max(axis=-1, initial=0.0)  # (B, Hq, Sq, Sk)
    return float(np.nan_to_num(weights * distance).sum(axis=-1).max(initial=0.0))


def _max_abs_score(arrays: dict[str, np.ndarray], dot: float) -> float:
    """An upper bound on ``|s|`` after every modifier: dot, ALiBi, bias and sink."""
    total = dot
    if "alibi_slopes" in arrays and "q_pos" in arrays and "k_pos" in arrays:
        q_pos, k_pos = arrays["q_pos"], arrays["k_pos"]
        reach = 0
        if q_pos.size and k_pos.size:
            reach = int(np.abs(q_pos).max() + np.abs(k_pos).max())
        total += finite_max_abs(arrays["alibi_slopes"]) * reach
    for name in ("bias", "sink_logits"):
        if name in arrays:
            total += finite_max_abs(arrays[name])
    return total


def _max_abs_dot(q: np.ndarray, k: np.ndarray) -> float:
    """``max_ij sum_d |q_id| |k_jd|`` with query head h reading KV head h // G."""
    if q.size == 0 or k.size == 0:
        return 0.0
    group = q.shape[1] // k.shape[1]
    k_abs = np.repeat(np.abs(k), group, axis=1)
    return float(np.nan_to_num(np.abs(q) @ np.swapaxes(k_abs, -1, -2)).max())


def finite_max_abs(x: Any) -> float:
    """``max |x|`` over the finite entries, 0 when there are none."""
    x = np.abs(np.asarray(x, dtype=np.float64))
    x = x[np.isfinite(x)]
    return float(x.max()) if x.size else 0.0


def max_abs_error(candidate: Any, reference: Any) -> float:
    """``max |candidate - reference|``, where both being -inf (or both NaN) counts as equal.

    A NaN or an infinity in one but not the other is an infinite error.
    """
    a = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"candidate has shape {a.shape} but reference has {b.shape}")
    if a.size == 0:
        return 0.0
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore"):  # inf - inf where only one side is infinite
        diff = np.where(same, 0.0, np.abs(a - b))
    diff = np.where(np.isnan(diff), np.inf, diff)
    return float(diff.max())


def quantized_error_bound(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    bits: int,
    dtype: str,
    scale: float | None = None,
) -> float:
    r"""How far attention over keys and values stored by a ``QuantizedCache`` may move.

    Each stored element is off by at most half a quantization step,
    :math:`\max|x| / (2 q_{max})`, plus the rounding of the dequantized value to
    ``dtype``. A query's score then moves by at most
    :math:`e = \text{scale} \cdot \lVert q \rVert_1 \cdot \max|k| \cdot
    (1 / (2 q_{max}) + u_t)`, each softmax weight by a factor within
    :math:`e^{\pm 2e}`, and each value by :math:`\max|v| (1/(2 q_{max}) + u_t)`:

    .. math::

        |o - o^*| \le \left(e^{2e} - 1 + \frac{1}{2 q_{max}} + u_t\right) \max|v|

    on top of the spec's own rounding (:func:`spec_error_bound`).
    """
    q_max = 2 ** (bits - 1) - 1
    step = 1.0 / (2 * q_max) + UNIT_ROUNDOFF[dtype]
    D = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D else 0.0
    q_l1 = float(np.abs(q).sum(axis=-1).max(initial=0.0))
    e = abs(scale) * q_l1 * finite_max_abs(k) * step
    return (math.expm1(min(2 * e, 50.0)) + step) * finite_max_abs(v)


def storage_error(
    x: np.ndarray,
    *,
    format: str = "int8",
    scales: str = "token",
    bits: int = 8,
    dtype: str = "float32",
) -> np.ndarray:
    r"""How far a quantizing cache may move each stored element: a bound per element of x.

    ``x`` (B, H, S, D) float64 is everything a cache is given over a history;
    ``format`` and ``scales`` are :class:`~refattn.caches.QuantizedCache`'s.
    The bound follows from the format, at the element's own magnitude:

    - ``int8`` (``bits``-bit codes, a scale per token and head): half a step,
      :math:`\max_d |x_d| / (2 q_{max})` over the element's vector;
    - fp8 (:data:`~refattn.caches.quantized.FLOAT8`, :math:`m` mantissa bits,
      least normal exponent :math:`e_{min}`): half the spacing at the
      element's magnitude, :math:`2^{-(m+1)} |x|`, and below the least normal
      the least spacing :math:`2^{e_{min} - m}\, s`, where :math:`s = 2 \max
      |x| / F` over the values that share a scale (a scale up to twice the
      least that holds them, as one raised by powers of two ends; the least
      spacing rather than half of it, since a scale raised again rounds a
      subnormal code again).

    A value the format cannot hold under its scale (past :math:`F s`) is not
    excused: a cache that clips it errs by more than this. On top come the
    float32 arithmetic of the codes (two roundings) and the dequantized
    value's rounding to ``dtype``.

    >>> x = np.array([[[[1.0, -0.5, 0.25, 0.0]]]])
    >>> storage_error(x, format="e4m3", scales="tensor").round(4).tolist()  # 2^-4 |x|
    [[[[0.0625, 0.0313, 0.0156, 0.0]]]]
    """
    from refattn.caches.quantized import FLOAT8, FORMATS, SCALES

    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}; got {format!r}")
    if scales not in SCALES:
        raise ValueError(f"scales must be one of {SCALES}; got {scales!r}")
    size = np.nan_to_num(np.abs(np.asarray(x, dtype=np.float64)), nan=0.0, posinf=0.0)
    if format == "int8":
        if scales != "token":
            raise ValueError(f"scales must be 'token' for format='int8'; got {scales!r}")
        error = size.max(axis=-1, keepdims=True, initial=0.0) / (2 * (2 ** (bits - 1) - 1))
        error = np.broadcast_to(error, size.shape)
    else:
        f8 = FLOAT8[format]
        axes = {"token": (-1,), "head": (0, 2, 3), "tensor": (0, 1, 2, 3)}[scales]
        shared = 2 * size.max(axis=axes, keepdims=True, initial=0.0) / f8.largest
        least_spacing = 2.0 ** (f8.min_exponent - f8.mantissa)
        error = 2.0 ** -(f8.mantissa + 1) * size + least_spacing * shared
    error = error + 2 * UNIT_ROUNDOFF["float32"] * size
    return error + UNIT_ROUNDOFF[dtype] * (size + error)


def quantized_output_bound(
    q: np.ndarray,
    v: np.ndarray,
    key_error: np.ndarray,
    value_error: np.ndarray,
    weights: np.ndarray,
    out: np.ndarray,
    *,
    scale: float | None = None,
) -> np.ndarray:
    r"""How far attention may move when each stored key and value is off by at most its bound.

    ``key_error`` (B, Hkv, Sk, D) and ``value_error`` (B, Hkv, Sk, Dv) bound
    each element (:func:`storage_error`); ``weights`` (B, Hq, Sq, Sk) and
    ``out`` (B, Hq, Sq, Dv) are the reference's softmax weights (0 where a key
    is not seen) and output. Query i's score of key j moves by at most
    :math:`\Delta_{ij} = \text{scale} \sum_d |q_{id}|\, \epsilon^k_{jd}`, so its
    weight :math:`p'_{ij}` lies between :math:`p_{ij} e^{-\Delta_{ij}} / Z^+_i`
    and :math:`p_{ij} e^{\Delta_{ij}} / Z^-_i`, with :math:`Z^\pm_i = \sum_j
    p_{ij} e^{\pm\Delta_{ij}}`. Writing :math:`o' - o = \sum_j p'_j (v'_j - v_j)
    + \sum_j (p'_j - p_j)(v_j - o)` (the weights sum to one):

    .. math::
        |o'_{id} - o_{id}| \le \sum_j p_{ij} \left( \frac{e^{\Delta_{ij}}}{Z^-_i}
            \epsilon^v_{jd} + w_{ij} |v_{jd} - o_{id}| \right), \qquad
        w_{ij} = \max\left(\frac{e^{\Delta_{ij}}}{Z^-_i} - 1,\;
            1 - \frac{e^{-\Delta_{ij}}}{Z^+_i}\right)

    per output element, on top of the spec's own rounding. Unlike
    :func:`quantized_error_bound` it follows each key's and value's own
    bound, so a clipped outlier is not hidden by the bound of the others.
    """
    D = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D else 0.0
    group = q.shape[1] // max(v.shape[1], 1)
    key_error = np.repeat(np.nan_to_num(key_error), group, axis=1)  # (B, Hq, Sk, D)
    value_error = np.repeat(np.nan_to_num(value_error), group, axis=1)  # (B, Hq, Sk, Dv)
    v = np.repeat(np.nan_to_num(v), group, axis=1)
    p = np.nan_to_num(weights)  # (B, Hq, Sq, Sk)
    moved = np.minimum(abs(scale) * np.abs(np.nan_to_num(q)) @ np.swapaxes(key_error, -1, -2), 50.0)
    low = (p * np.exp(-moved)).sum(axis=-1, keepdims=True)  # (B, Hq, Sq, 1)
    high = (p * np.exp(moved)).sum(axis=-1, keepdims=True)
    low, high = np.where(low > 0, low, 1.0), np.where(high > 0, high, 1.0)  # rows seeing no key
    up, down = np.exp(moved) / low, np.exp(-moved) / high
    w = np.maximum(up - 1, 1 - down)  # (B, Hq, Sq, Sk)
    spread = np.abs(v[:, :, None, :, :] - np.nan_to_num(out)[:, :, :, None, :])  # (.., Sk, Dv)
    return (p * up) @ value_error + np.einsum("bhij,bhijd->bhid", p * w, spread)


def worst_element(candidate: Any, reference: Any, bound: np.ndarray) -> tuple[float, float]:
    """``|candidate - reference|`` and ``bound`` at the element where the error exceeds its
    bound the most (as :func:`max_abs_error` counts errors): the error to report, and what
    is allowed there on top of the tolerance rule.

    >>> worst_element(np.array([1.0, 2.0]), np.array([1.5, 2.5]), np.array([0.4, 0.6]))
    (0.5, 0.4)
    """
    a = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"candidate has shape {a.shape} but reference has {b.shape}")
    if a.size == 0:
        return 0.0, 0.0
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(a - b))
    diff = np.where(np.isnan(diff), np.inf, diff)
    with np.errstate(invalid="ignore"):  # inf - inf: an infinite error where it is allowed
        excess = np.nan_to_num(diff - bound, nan=np.inf)
    at = np.unravel_index(int(np.argmax(excess)), excess.shape)
    return float(diff[at]), float(np.broadcast_to(bound, diff.shape)[at])


#: ``np.allclose``'s rtol and atol for two runs of one computation in the same dtype,
#: in machine epsilons: outputs of order 1, which rounding moves by a few epsilons
#: (the seed experiment's cached and uncached passes).
ROUNDING_EPS = 100


def rounding_tolerance(dtype: Any) -> float:
    """The rtol and atol of ``np.allclose`` for two runs in ``dtype`` that differ only
    in the order they round (:data:`ROUNDING_EPS` machine epsilons).

    >>> rounding_tolerance(np.float32)
    1.1920928955078125e-05
    """
    return ROUNDING_EPS * float(np.finfo(dtype).eps)


#: ``(rtol, atol)`` for ``np.allclose`` of two implementations' outputs on the same data
#: (``refattn bench``'s check of every row against SDPA's): loose enough for the peers'
#: other summation orders and for a float16 or bfloat16 output that rounds the other way
#: (one unit in its last place), tight enough that a wrong mask, scale or head grouping
#: fails.
AGREEMENT = {
    "float64": (1e-9, 1e-12),
    "float32": (1e-4, 1e-5),
    "float16": (2e-2, 2e-3),
    "bfloat16": (5e-2, 1e-2),
}
