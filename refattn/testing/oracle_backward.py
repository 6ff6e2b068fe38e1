r"""The loop oracle's backward: the gradients of attention as plain loops in float64.

This is to :func:`refattn.attention_backward` what :mod:`refattn.testing.oracle`
is to :func:`refattn.attention`: the same contract, restated as per-pair loops
in float64 NumPy, sharing no code with refattn. It reads its inputs and
scores each row with the forward oracle's own helpers (so the two oracles
agree on what is visible and what a score is), and imports nothing else but
:mod:`math` and :mod:`numpy`.

For query :math:`i` of head :math:`h` in batch row :math:`b` (KV head
:math:`h // G`), over its visible keys :math:`V_i`, with
:math:`t_{ij} = \text{scale}\, q_i \cdot k_j`, the final scores :math:`s_{ij}`
(after the softcap :math:`c`, ALiBi and the bias), the sink logit
:math:`\sigma_h` and :math:`\text{lse}_i = \log(\sum_{j \in V_i} e^{s_{ij}} +
e^{\sigma_h})`, the gradients of a loss whose gradient with respect to the
output is :math:`dO` are

.. math::

    P_{ij} &= e^{s_{ij} - \text{lse}_i}, \qquad
    o_i = \textstyle\sum_{j \in V_i} P_{ij} v_j, \qquad
    D_i = dO_i \cdot o_i \\
    dP_{ij} &= dO_i \cdot v_j, \qquad
    dS_{ij} = P_{ij} (dP_{ij} - D_i), \qquad
    d\text{bias}_{ij} = dS_{ij} \\
    dT_{ij} &= dS_{ij} \big(1 - \tanh^2(t_{ij} / c)\big)
        \qquad (dT = dS \text{ without a softcap}) \\
    dq_i &\mathrel{+}= \text{scale}\, dT_{ij}\, k_j, \qquad
    dk_j \mathrel{+}= \text{scale}\, dT_{ij}\, q_i, \qquad
    dv_j \mathrel{+}= P_{ij}\, dO_i \\
    d\sigma_h &= -\textstyle\sum_{b, i} e^{\sigma_h - \text{lse}_i} D_i

where the sums into :math:`dk_j` and :math:`dv_j` of KV head :math:`h // G`
run over every query of its :math:`G` query heads. A row with no visible key
contributes 0 to every gradient; a key or value slot no query sees is never
read, so whatever it holds (NaN, inf) its gradient is 0 and reaches nothing
else. ALiBi slopes and the mask are constants. The bias's gradient is summed
over the axes along which the bias was broadcast, so it has the bias's shape.

:func:`central_difference_gradients` checks these formulas against the
forward oracle itself: the same gradients by central differences of the loss
:math:`\sum dO \odot o` (tiny problems only: two forward passes per input
element).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from refattn.testing.oracle import (
    _read_call,
    _softmax_row,
    _to_float64,
    _visible_scores,
    oracle_attention,
)

__all__ = ["OracleGradients", "central_difference_gradients", "oracle_attention_backward"]

#: The inputs a gradient is taken with respect to, in the order of :class:`OracleGradients`.
DIFFERENTIABLE = ("q", "k", "v", "sink_logits", "bias")
#: The relative step of :func:`central_difference_gradients`: :math:`h = 10^{-6} \max(1, |x|)`.
STEP = 1e-6


@dataclass(frozen=True)
class OracleGradients:
    """The gradients of one attention call, float64 NumPy, each in its input's shape.

    Attributes
    ----------
    dq : (B, Hq, Sq, D)
    dk : (B, Hkv, Sk, D)
    dv : (B, Hkv, Sk, Dv)
    dsink_logits : (Hq,), or None without sink logits
    dbias : the bias's own shape, or None without a bias
    """

    dq: npt.NDArray[np.float64]
    dk: npt.NDArray[np.float64]
    dv: npt.NDArray[np.float64]
    dsink_logits: npt.NDArray[np.float64] | None = None
    dbias: npt.NDArray[np.float64] | None = None


def oracle_attention_backward(
    q: Any,
    k: Any,
    v: Any,
    dout: Any,
    *,
    causal: bool = False,
    q_pos: Any = None,
    k_pos: Any = None,
    mask: Any = None,
    bias: Any = None,
    scale: float | None = None,
    window: int | None = None,
    sink_tokens: int = 0,
    softcap: float | None = None,
    alibi_slopes: Any = None,
    sink_logits: Any = None,
    window_right: int | None = None,
) -> OracleGradients:
    """The gradients of :func:`~refattn.testing.oracle.oracle_attention`, one visible pair
    at a time, in float64.

    Parameters
    ----------
    q, k, v : array_like
        As for :func:`~refattn.testing.oracle.oracle_attention`: (B, Hq, Sq, D),
        (B, Hkv, Sk, D), (B, Hkv, Sk, Dv), any float dtype.
    dout : array_like
        (B, Hq, Sq, Dv), the gradient of the loss with respect to the output.
    causal, q_pos, k_pos, mask, bias, scale, window, sink_tokens, softcap, alibi_slopes,
    sink_logits, window_right
        The options of :func:`~refattn.testing.oracle.oracle_attention`.

    Returns
    -------
    OracleGradients
        dq, dk, dv, and the gradients of ``sink_logits`` and ``bias`` when given
        (None otherwise), by the formulas of the module docstring.

    Examples
    --------
    One query over two keys with equal scores: :math:`P = (1/2, 1/2)`, so each
    value gets half of dout. With :math:`v = (0, 2)`, :math:`o = 1` and
    :math:`dS = P (dP - D) = (-1/2, 1/2)`, so :math:`dq = \\text{scale}\\,
    \\sum_j dS_j k_j = 1/2` for keys :math:`(0, 1)`, and the bias gets
    :math:`dS` itself.

    >>> import numpy as np
    >>> q = np.zeros((1, 1, 1, 1)); k = np.array([0.0, 1.0]).reshape(1, 1, 2, 1)
    >>> v = np.array([0.0, 2.0]).reshape(1, 1, 2, 1); dout = np.ones((1, 1, 1, 1))
    >>> g = oracle_attention_backward(q, k, v, dout, scale=1.0, bias=np.zeros((1, 2)))
    >>> g.dv.ravel().tolist(), g.dq.ravel().tolist(), g.dbias.tolist()
    ([0.5, 0.5], [0.5], [[-0.5, 0.5]])
    """
    call = _read_call(
        q, k, v, causal=causal, q_pos=q_pos, k_pos=k_pos, mask=mask, bias=bias, scale=scale,
        window=window, sink_tokens=sink_tokens, softcap=softcap, alibi_slopes=alibi_slopes,
        sink_logits=sink_logits, window_right=window_right,
    )  # fmt: skip
    n_batch, n_qheads, n_queries, _ = call.q.shape
    n_keys, d_v = call.v.shape[2], call.v.shape[3]
    dof = _to_float64(dout, "dout")
    if dof.shape != (n_batch, n_qheads, n_queries, d_v):
        raise ValueError(
            f"dout must have shape (B, Hq, Sq, Dv) = {(n_batch, n_qheads, n_queries, d_v)}; "
            f"got {dof.shape}"
        )
    dq = np.zeros(call.q.shape)
    dk = np.zeros(call.k.shape)
    dv = np.zeros(call.v.shape)
    dbias_full = np.zeros((n_batch, n_qheads, n_queries, n_keys))
    dsink = np.zeros(n_qheads)
    # inf/NaN in *visible* inputs are allowed to propagate, as in the forward.
    with np.errstate(all="ignore"):
        for b in range(n_batch):
            for h in range(n_qheads):
                hk = h // call.group
                for i in range(n_queries):
                    visible, scores = _visible_scores(call, b, h, i)
                    out, lse, _ = _softmax_row(call, b, h, visible, scores)
                    if lse == -math.inf:
                        continue  # nothing in the denominator: every weight is 0
                    d_out = dof[b, h, i]
                    delta = float(np.sum(d_out * out))  # D = dO . o (0 for an empty row)
                    if call.sinks is not None:
                        dsink[h] -= math.exp(float(call.sinks[h]) - lse) * delta
                    for j, s in zip(visible, scores, strict=True):
                        p = math.exp(s - lse)  # P_ij
                        dp = float(np.sum(d_out * call.v[b, hk, j]))  # dP_ij = dO . v_j
                        ds = p * (dp - delta)  # dS_ij
                        dbias_full[b, h, i, j] = ds
                        dt = ds
                        if call.softcap is not None:
                            t = call.scale * float(np.sum(call.q[b, h, i] * call.k[b, hk, j]))
                            dt = ds * (1.0 - math.tanh(t / call.softcap) ** 2)
                        dq[b, h, i] += call.scale * dt * call.k[b, hk, j]
                        dk[b, hk, j] += call.scale * dt * call.q[b, h, i]
                        dv[b, hk, j] += p * d_out
    return OracleGradients(
        dq=dq,
        dk=dk,
        dv=dv,
        dsink_logits=None if sink_logits is None else dsink.reshape(np.shape(sink_logits)),
        dbias=None if bias is None else _summed_to(dbias_full, np.shape(bias)),
    )


def _summed_to(full: npt.NDArray[np.float64], shape: tuple[int, ...]) -> npt.NDArray[np.float64]:
    """The (B, Hq, Sq, Sk) gradient of an array of ``shape`` broadcast to it: summed over
    every axis the array lacks or has as 1."""
    padded = (1,) * (full.ndim - len(shape)) + tuple(shape)
    axes = tuple(a for a, n in enumerate(padded) if n == 1)
    return np.sum(full, axis=axes, keepdims=True).reshape(shape)


def central_difference_gradients(
    q: Any, k: Any, v: Any, dout: Any, *, step: float = STEP, **options: Any
) -> OracleGradients:
    r"""The gradients of :math:`L = \sum dO \odot o` by central differences of the forward
    oracle, one input element at a time, in float64.

    .. math::

        \frac{\partial L}{\partial x} \approx \frac{L(x + h) - L(x - h)}{(x + h) - (x - h)},
        \qquad h = \text{step} \cdot \max(1, |x|)

    (the denominator is the step as rounded, not :math:`2h`). The error is the
    truncation :math:`h^2 |L'''| / 6` plus the rounding of :math:`L`, about
    :math:`\epsilon |L| / h`: with ``step = 1e-6``, about :math:`10^{-12} |L'''|
    + 10^{-10} |L|`, well inside the :math:`10^{-7} \max(1, |g|)` the tests allow on
    problems of a few keys with scores of order 1 to 30 (where the largest error
    measured was :math:`3 \cdot 10^{-9}`). An element that is not finite
    (NaN or inf in a slot no query sees) stays as it is, and its gradient is 0
    exactly when the forward never reads it. Two forward passes per element:
    tiny problems only.

    Parameters
    ----------
    q, k, v, dout : array_like
        As for :func:`oracle_attention_backward`.
    step : float
        The relative step :math:`h / \max(1, |x|)`.
    **options
        The options of :func:`~refattn.testing.oracle.oracle_attention`.

    Returns
    -------
    OracleGradients
        Like :func:`oracle_attention_backward`'s, with respect to q, k, v and, when
        given, ``sink_logits`` and ``bias`` (ALiBi slopes and the mask are constants).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> q, k, v, dout = (rng.standard_normal((1, 1, 2, 2)) for _ in range(4))
    >>> fd = central_difference_gradients(q, k, v, dout, causal=True)
    >>> exact = oracle_attention_backward(q, k, v, dout, causal=True)
    >>> bool(np.max(np.abs(fd.dq - exact.dq)) < 1e-8)
    True
    """
    inputs = {"q": q, "k": k, "v": v, **options}
    arrays = {
        name: _to_float64(inputs[name], name)
        for name in DIFFERENTIABLE
        if inputs.get(name) is not None
    }
    dof = _to_float64(dout, "dout")

    def loss(name: str, x: npt.NDArray[np.float64]) -> float:
        out, _ = oracle_attention(**{**inputs, **arrays, name: x})
        return math.fsum((dof * out).ravel().tolist())

    grads: dict[str, npt.NDArray[np.float64]] = {}
    for name, x in arrays.items():
        g = np.zeros(x.shape)
        for index in np.ndindex(*x.shape):
            if not math.isfinite(x[index]):
                continue
            h = step * max(1.0, abs(float(x[index])))
            up, down = x.copy(), x.copy()
            up[index] += h
            down[index] -= h
            g[index] = (loss(name, up) - loss(name, down)) / (up[index] - down[index])
        grads[name] = g
    return OracleGradients(
        dq=grads["q"], dk=grads["k"], dv=grads["v"], dsink_logits=grads.get("sink_logits"),
        dbias=grads.get("bias"),
    )  # fmt: skip
