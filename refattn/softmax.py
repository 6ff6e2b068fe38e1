"""The softmax policy: visible keys only, an optional sink, and empty rows give zero.

For one query with scores :math:`s_j` over its visible keys :math:`V` and an
optional sink logit :math:`\\sigma` that joins the denominator but carries no
value,

.. math::

    Z = \\sum_{j \\in V} e^{s_j} + e^{\\sigma}, \\qquad
    p_j = e^{s_j} / Z, \\qquad
    \\text{lse} = \\log Z.

A row with no visible key and no sink has :math:`Z = 0`: its weights are all
zero (so its output is 0) and its lse is :math:`-\\infty`, with no NaN and no
warning. The maximum is subtracted before exponentiating, so scores of any
size are safe. Invisible scores are replaced by :math:`-\\infty` with
``where`` rather than added to, so a NaN in an invisible slot is dropped,
never propagated.
"""

from __future__ import annotations

from array_api_compat import device

from refattn.namespace import Array, Namespace


def masked_softmax(
    xp: Namespace, s: Array, visible: Array, sink: Array | None = None
) -> tuple[Array, Array]:
    """Softmax of ``s`` over the last axis, restricted to ``visible`` keys.

    Parameters
    ----------
    s : (..., Sk) scores, floating
    visible : boolean array broadcastable to ``s``
    sink : optional logits broadcastable to ``s.shape[:-1] + (1,)``

    Returns
    -------
    p : (..., Sk) weights; rows sum to 1, or to less than 1 with a sink,
        or to 0 when nothing is visible
    lse : (...,) the log of the softmax denominator

    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> s = np.array([[0.0, 0.0, 5.0], [1.0, 2.0, 3.0]])
    >>> visible = np.array([[True, True, False], [False, False, False]])
    >>> p, lse = masked_softmax(xp, s, visible)
    >>> p
    array([[0.5, 0.5, 0. ],
           [0. , 0. , 0. ]])
    >>> lse
    array([0.69314718,       -inf])
    """
    neg_inf = xp.asarray(-xp.inf, dtype=s.dtype, device=device(s))
    s = xp.where(visible, s, neg_inf)  # (..., Sk)
    m = _row_max(xp, s)  # (..., 1)
    if sink is not None:
        m = xp.maximum(m, sink)
    m = row_shift(xp, m)  # (..., 1)
    e = xp.exp(s - m)  # (..., Sk)
    z = xp.sum(e, axis=-1, keepdims=True)  # (..., 1)
    if sink is not None:
        z = z + xp.exp(sink - m)
    empty = z == 0  # (..., 1)
    z_safe = xp.where(empty, xp.ones_like(z), z)
    p = e / z_safe  # (..., Sk)
    lse = xp.where(empty, neg_inf, m + xp.log(z_safe))  # (..., 1)
    return p, lse[..., 0]


def row_shift(xp: Namespace, m: Array) -> Array:
    """What a row's exponents are shifted by: its maximum, or 0 for an empty row.

    A row that sees no key has maximum :math:`-\\infty`; shifting by it would
    give :math:`e^{-\\infty - (-\\infty)} = e^{\\text{NaN}}`. Shifting by 0 keeps
    every :math:`e^{-\\infty} = 0`, so the row's denominator is 0 and it is
    recognised as empty. The softmax, the merge of states and the blockwise
    recurrence all shift this way.

    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> row_shift(xp, np.array([2.0, -np.inf]))
    array([2., 0.])
    """
    return xp.where(m == -xp.inf, xp.zeros_like(m), m)


def _row_max(xp: Namespace, s: Array) -> Array:
    if s.shape[-1] == 0:
        return xp.full((*s.shape[:-1], 1), -xp.inf, dtype=s.dtype, device=device(s))
    return xp.max(s, axis=-1, keepdims=True)
