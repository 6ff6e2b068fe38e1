"""The score pipeline, one term per function: scaled dot product, softcap, ALiBi.

Scores are held grouped by KV head, shape (B, Hkv, G, Sq, Sk) with
G = Hq // Hkv query heads per KV head: query head ``h`` is ``(h // G, h % G)``,
which is how grouped-query attention reads one KV head from G query heads
without repeating K or V.
"""

from __future__ import annotations

from array_api_compat import device

from refattn.namespace import Array, Namespace


def scaled_scores(xp: Namespace, q: Array, k: Array, scale: float) -> Array:
    """:math:`s_{ij} = \\text{scale} \\cdot q_i \\cdot k_j`, grouped by KV head.

    Parameters
    ----------
    q : (B, Hq, Sq, D)
    k : (B, Hkv, Sk, D)

    Returns
    -------
    (B, Hkv, G, Sq, Sk)

    The G query heads of a group are stacked into the rows of one matrix, so a
    single (G * Sq, D) x (D, Sk) product per KV head serves the whole group.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    q_rows = xp.reshape(q * scale, (B, Hkv, G * Sq, D))  # (B, Hkv, G*Sq, D)
    s = xp.matmul(q_rows, xp.matrix_transpose(k))  # (B, Hkv, G*Sq, Sk)
    return xp.reshape(s, (B, Hkv, G, Sq, Sk))  # (B, Hkv, G, Sq, Sk)


def seen_scores(xp: Namespace, q: Array, k: Array, scale: float, visible: Array) -> Array:
    """:func:`scaled_scores` for the pairs in ``visible``, 0 for the rest, without ever
    multiplying a query by a key it does not see.

    Parameters
    ----------
    q : (B, Hq, Sq, D)
    k : (B, Hkv, Sk, D)
    visible : boolean, broadcastable to (B, Hkv, G, Sq, Sk)

    Returns
    -------
    (B, Hkv, G, Sq, Sk)

    The slow path, for keys that are not all finite: a (Sk, D) key block per
    query, each holding only the keys that query sees, so an inf or NaN key
    reaches neither the scores nor, under autograd, the gradient of a query
    that does not see it (the plain product's backward multiplies the key by
    a gradient of exactly 0, and 0 * NaN is NaN).

    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> q, k = np.ones((1, 1, 2, 1)), np.array([1.0, np.nan]).reshape(1, 1, 2, 1)
    >>> seen_scores(xp, q, k, 1.0, np.array([[True, False], [True, True]]))[0, 0, 0]
    array([[ 1.,  0.],
           [ 1., nan]])
    """
    B, Hq, Sq, D = q.shape
    Hkv = k.shape[1]
    q_rows = xp.reshape(q * scale, (B, Hkv, Hq // Hkv, Sq, 1, D))  # (B, Hkv, G, Sq, 1, D)
    zero = xp.zeros((), dtype=k.dtype, device=device(k))
    # (B, Hkv, G or 1, Sq, Sk, D): the keys each query sees, 0 for the others
    seen = xp.where(visible[..., None], k[:, :, None, None, :, :], zero)
    return xp.matmul(q_rows, xp.matrix_transpose(seen))[..., 0, :]  # (B, Hkv, G, Sq, Sk)


def softcap_scores(xp: Namespace, s: Array, softcap: float) -> Array:
    """:math:`s \\leftarrow c \\tanh(s / c)`: squashes scores into (-c, c) (Gemma 2, Grok)."""
    return softcap * xp.tanh(s / softcap)


def alibi_bias(xp: Namespace, slopes: Array, q_pos: Array, k_pos: Array) -> Array:
    """:math:`-m_h \\lvert q_i - k_j \\rvert`, the ALiBi term (Press et al., 2022).

    Parameters
    ----------
    slopes : (B or 1, Hkv, G) slopes in the compute dtype
    q_pos : (B, Sq) integer positions
    k_pos : (B, Sk) integer positions

    Returns
    -------
    (B, Hkv, G, Sq, Sk)

    The distance is measured in absolute positions, so a decode step at the
    end of a cache gets the same bias as the same query inside a full pass.
    """
    distance = xp.abs(q_pos[:, :, None] - k_pos[:, None, :])  # (B, Sq, Sk)
    distance = xp.astype(distance, slopes.dtype)[:, None, None, :, :]  # (B, 1, 1, Sq, Sk)
    return -slopes[:, :, :, None, None] * distance  # (B, Hkv, G, Sq, Sk)


def group_heads(xp: Namespace, x: Array, kv_heads: int) -> Array:
    """An array broadcastable to (B, Hq, Sq, Sk) seen as (B, Hkv, G, Sq, Sk).

    A head dimension of 1 stays 1 in both head axes; a full head dimension
    Hq is split into (Hkv, G) the same way the queries are.
    """
    while x.ndim < 4:
        x = x[None, ...]
    b, h, sq, sk = x.shape
    if h == 1:
        return x[:, :, None, :, :]  # (b, 1, 1, sq, sk)
    return xp.reshape(x, (b, kv_heads, h // kv_heads, sq, sk))  # (b, Hkv, G, sq, sk)
