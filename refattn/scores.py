"""The score pipeline, one term per function: scaled dot product, softcap, ALiBi.

Scores are held grouped by KV head, shape (B, Hkv, G, Sq, Sk) with
G = Hq // Hkv query heads per KV head: query head ``h`` is ``(h // G, h % G)``,
which is how grouped-query attention reads one KV head from G query heads
without repeating K or V.
"""

from __future__ import annotations

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
