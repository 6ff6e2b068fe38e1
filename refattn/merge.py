r"""Merging partial attention states: the algebra behind split-KV, cascades and ring attention.

Attention of one query over a key set :math:`K` is fully described by its
state :math:`(o_K, \text{lse}_K)`. For disjoint :math:`K = A \cup B`:

.. math::

    \text{lse} = \log\left(e^{\text{lse}_A} + e^{\text{lse}_B}\right), \qquad
    o = e^{\text{lse}_A - \text{lse}}\, o_A + e^{\text{lse}_B - \text{lse}}\, o_B

A part with :math:`\text{lse} = -\infty` saw no key and contributes nothing;
if every part is empty the result is :math:`o = 0`, :math:`\text{lse} = -\infty`,
the same policy as :func:`refattn.attention` for a row with no visible key.
"""

from __future__ import annotations

from collections.abc import Sequence

from array_api_compat import device

from refattn.namespace import Array, namespace_of
from refattn.softmax import row_shift


def merge_states(out_a: Array, lse_a: Array, out_b: Array, lse_b: Array) -> tuple[Array, Array]:
    """Merge the states of attention over two disjoint key sets.

    Parameters
    ----------
    out_a, out_b : (..., Dv) partial outputs
    lse_a, lse_b : (...) their log-sum-exps (natural log)

    Returns
    -------
    out : (..., Dv) in out_a's dtype, computed in lse_a's dtype
    lse : (...) in lse_a's dtype

    Examples
    --------
    Two halves of four equally scored keys: each half's lse is log 2.

    >>> import numpy as np
    >>> out, lse = merge_states(np.array([[1.0]]), np.log([2.0]), np.array([[3.0]]), np.log([2.0]))
    >>> float(out[0, 0]), float(np.exp(lse[0]))
    (2.0, 4.0)
    """
    return merge_states_n([out_a, out_b], [lse_a, lse_b])


def merge_states_n(outs: Sequence[Array], lses: Sequence[Array]) -> tuple[Array, Array]:
    r"""Merge the states of attention over any number of disjoint key sets.

    :math:`\text{lse} = \log \sum_p e^{\text{lse}_p}` and
    :math:`o = \sum_p e^{\text{lse}_p - \text{lse}} o_p`, with the largest
    :math:`\text{lse}_p` subtracted first so that no exponential overflows.
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError(
            f"outs and lses must be two equally long, non-empty lists; got {len(outs)} and "
            f"{len(lses)}"
        )
    xp = namespace_of(**{f"outs[{i}]": o for i, o in enumerate(outs)},
                      **{f"lses[{i}]": s for i, s in enumerate(lses)})  # fmt: skip
    for i, (o, s) in enumerate(zip(outs, lses, strict=True)):
        if tuple(o.shape[:-1]) != tuple(s.shape) or tuple(o.shape) != tuple(outs[0].shape):
            raise ValueError(
                f"outs[{i}] has shape {tuple(o.shape)} and lses[{i}] {tuple(s.shape)}; every "
                f"out must have shape {tuple(outs[0].shape)} and its lse that shape less Dv"
            )
    dtype = lses[0].dtype
    neg_inf = xp.asarray(-xp.inf, dtype=dtype, device=device(lses[0]))
    zero = xp.zeros((), dtype=dtype, device=device(lses[0]))
    m = lses[0]
    for s in lses[1:]:
        m = xp.maximum(m, s)  # (...)
    m = row_shift(xp, m)  # every part empty: shift by 0
    total = xp.zeros_like(m)
    acc = xp.zeros(outs[0].shape, dtype=dtype, device=device(lses[0]))  # (..., Dv)
    for o, s in zip(outs, lses, strict=True):
        w = xp.exp(s - m)  # (...) 0 for an empty part
        total = total + w
        # An empty part (lse = -inf) is dropped by where, so even a NaN in its output
        # cannot leak; any other part keeps IEEE arithmetic (0 * NaN is NaN).
        held = (s != neg_inf)[..., None]
        acc = acc + xp.where(held, w[..., None] * xp.astype(o, dtype), zero)
    empty = total == 0
    total_safe = xp.where(empty, xp.ones_like(total), total)
    out = acc / total_safe[..., None]
    lse = xp.where(empty, neg_inf, m + xp.log(total_safe))
    return xp.astype(out, outs[0].dtype), lse
