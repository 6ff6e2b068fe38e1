"""Scaled-dot-product attention, the definition every other path is checked against."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from array_api_compat import device

from refattn.checks import ARRAY_OPTIONS, check_call
from refattn.namespace import (
    Array,
    Namespace,
    compute_dtype,
    index_dtype,
    namespace_of,
    surely,
    unchecked_arithmetic,
)
from refattn.options import AttentionOptions, takes_options
from refattn.positions import as_rows, default_key_positions, default_query_positions, visibility
from refattn.scores import alibi_bias, group_heads, scaled_scores, seen_scores, softcap_scores
from refattn.softmax import masked_softmax


@takes_options
def attention(q: Array, k: Array, v: Array, **options: Any) -> Array | tuple[Array, Array]:
    r"""Attention of queries ``q`` over keys ``k`` and values ``v``.

    For query :math:`i` of head :math:`h` (reading KV head :math:`h // G`,
    :math:`G = H_q / H_{kv}`), over the keys :math:`V_i` it may see:

    .. math::

        s_{ij} &= \text{scale} \cdot q_i \cdot k_j
            \qquad \text{scale defaults to } 1/\sqrt{D} \\
        s_{ij} &\leftarrow c \tanh(s_{ij} / c)
            \qquad \text{softcap } c \\
        s_{ij} &\leftarrow s_{ij} - m_h \lvert q^{pos}_i - k^{pos}_j \rvert + \text{bias}_{ij}
            \qquad \text{ALiBi slope } m_h \\
        V_i &= \{ j : k^{pos}_j \ge 0,\ \text{mask}_{ij},\
            \text{causal} \Rightarrow k^{pos}_j \le q^{pos}_i,\
            q^{pos}_i - k^{pos}_j < W \vee k^{pos}_j < n_{sink},\
            k^{pos}_j - q^{pos}_i \le R \} \\
        Z_i &= \textstyle\sum_{j \in V_i} e^{s_{ij}} + e^{\sigma_h}
            \qquad \text{sink logit } \sigma_h \text{, if given} \\
        o_i &= \textstyle\sum_{j \in V_i} (e^{s_{ij}} / Z_i)\, v_j,
            \qquad \text{lse}_i = \log Z_i

    A row with no visible key returns :math:`o_i = 0` and
    :math:`\text{lse}_i = -\infty`, with no warning and no NaN. An inf or
    NaN in a key or value slot that a query does not see reaches neither its
    output nor, under autograd, its gradient, and raises no warning.

    Parameters
    ----------
    q : (B, Hq, Sq, D) array
    k : (B, Hkv, Sk, D) array, same dtype as q; ``Hq % Hkv == 0``
    v : (B, Hkv, Sk, Dv) array, same dtype as q
    causal : bool
        Hide keys at positions after the query's.
    q_pos : (B, Sq) integer array, optional
        Absolute query positions; default ``Sk - Sq + arange(Sq)`` (bottom-right,
        the KV-cache alignment). ``arange(Sq)`` gives PyTorch's top-left ``is_causal``.
    k_pos : (B, Sk) integer array, optional
        Absolute key positions, negative for an empty slot; default ``arange(Sk)``.
    mask : boolean array broadcastable to (B, Hq, Sq, Sk), optional
        True keeps a key.
    bias : floating array broadcastable to (B, Hq, Sq, Sk), optional
        Added to the scores.
    scale : float, optional
    window : int >= 1, optional
        Keep only keys with ``q_pos - k_pos < window``: the last ``window``
        positions, the query's own included (flash-attn's ``window_size=(window-1, 0)``).
    window_right : int >= 0, optional
        Keep only keys with ``k_pos - q_pos <= window_right``: the reach of the
        window forward, past the query (flash-attn's ``window_size=(..., window_right)``).
        With ``window`` it makes a two-sided window, ``q_pos - window < k_pos <=
        q_pos + window_right``; alone it bounds only the right. ``causal`` is a
        right reach of 0.
    sink_tokens : int >= 0
        With a window, keys at positions below ``sink_tokens`` stay visible
        however old (attention sinks, StreamingLLM; what a
        ``SlidingWindowCache(sink_tokens=...)`` keeps). Not to be confused with
        ``sink_logits``.
    softcap : float > 0, optional
    alibi_slopes : (Hq,) or (B, Hq) array, optional
    sink_logits : (Hq,) array, optional
        One logit per head that joins the softmax denominator and adds no value.
    return_lse : bool
        Also return the log of the softmax denominator.

    Returns
    -------
    out : (B, Hq, Sq, Dv) array in q's dtype
    lse : (B, Hq, Sq) array in the compute dtype, only if ``return_lse``

    Notes
    -----
    float16 and bfloat16 inputs are computed in float32 and the output is cast
    back; float32 and float64 are computed in their own dtype. Here k and v are
    widened whole; :func:`refattn.attention_blockwise` widens them a block at a
    time, which is how to decode from a float16 cache on NumPy without a
    float32 copy of it (``benchmarks/low_precision_decode.py``). Grouped-query
    attention is a reshape of q, never a copy of k or v.

    Examples
    --------
    Three cached keys and one new query: the query sits at position 2 and, with
    equal scores, averages the values it sees.

    >>> import numpy as np
    >>> q = np.zeros((1, 1, 1, 4)); k = np.zeros((1, 1, 3, 4))
    >>> v = np.arange(3.0).reshape(1, 1, 3, 1)
    >>> attention(q, k, v, causal=True)[..., 0]
    array([[[1.]]])
    >>> out, lse = attention(q, k, v, causal=True, window=2, return_lse=True)
    >>> float(out[0, 0, 0, 0]), float(np.exp(lse[0, 0, 0]))
    (1.5, 2.0)
    """
    call = prepare(q, k, v, AttentionOptions.of("attention", options))
    xp = call.xp
    s, visible = scores(call, slice(None), slice(None))  # (B, Hkv, G, Sq, Sk) each
    p, lse = masked_softmax(xp, s, visible, call.sink)  # (B, Hkv, G, Sq, Sk), (B, Hkv, G, Sq)
    out = weighted_sum(xp, p, call.values(slice(None)), visible)  # (B, Hkv, G, Sq, Dv)
    return call.finish(out, lse)


@dataclass
class Call:
    """One attention call's inputs, checked, positions concrete.

    q is held in the compute dtype; k and v stay in the caller's dtype and are
    widened a block at a time by :meth:`keys` and :meth:`values`, so a blockwise
    pass over a float16 cache never holds a float32 copy of all of it.
    """

    xp: Namespace
    q: Array  # (B, Hq, Sq, D), compute dtype
    k: Array  # (B, Hkv, Sk, D), caller's dtype
    v: Array  # (B, Hkv, Sk, Dv), caller's dtype
    q_pos: Array  # (B or 1, Sq) int64
    k_pos: Array  # (B or 1, Sk) int64
    mask: Array | None  # grouped: (b, Hkv or 1, G or 1, Sq or 1, Sk or 1)
    bias: Array | None  # grouped like mask, compute dtype
    slopes: Array | None  # (B or 1, Hkv, G)
    sink: Array | None  # (1, Hkv, G, 1, 1)
    scale: float
    causal: bool
    window: int | None
    window_right: int | None
    sink_tokens: int
    softcap: float | None
    return_lse: bool
    out_dtype: Any
    dtype: Any  # the compute dtype

    def keys(self, block: slice) -> Array:
        """Keys of a block in the compute dtype: (B, Hkv, bk, D)."""
        return _cast(self.xp, self.k[:, :, block, :], self.dtype)

    def values(self, block: slice) -> Array:
        """Values of a block in the compute dtype: (B, Hkv, bk, Dv)."""
        return _cast(self.xp, self.v[:, :, block, :], self.dtype)

    def finish(self, out: Array, lse: Array) -> Array | tuple[Array, Array]:
        """(B, Hkv, G, Sq, Dv) and (B, Hkv, G, Sq) back to the caller's layout and dtype."""
        xp = self.xp
        B, Hq, Sq, _ = self.q.shape
        out = _cast(xp, xp.reshape(out, (B, Hq, Sq, out.shape[-1])), self.out_dtype)
        if self.return_lse:
            return out, xp.reshape(lse, (B, Hq, Sq))
        return out


def prepare(q: Array, k: Array, v: Array, options: AttentionOptions) -> Call:
    """Check every array, fill in default positions and cast to the compute dtype."""
    arrays = {name: getattr(options, name) for name in ARRAY_OPTIONS}
    xp = namespace_of(q=q, k=k, v=v, **arrays)
    check_call(xp, q, k, v, options)
    _, Hq, Sq, D = q.shape
    _, Hkv, Sk, _ = v.shape
    G = Hq // Hkv
    on = device(q)
    dtype = compute_dtype(xp, q.dtype)
    o = options
    return Call(
        xp=xp,
        q=_cast(xp, q, dtype),
        k=k,
        v=v,
        q_pos=_positions(xp, o.q_pos, default_query_positions(xp, Sq, Sk, device=on)),
        k_pos=_positions(xp, o.k_pos, default_key_positions(xp, Sk, device=on)),
        mask=None if o.mask is None else group_heads(xp, o.mask, Hkv),
        bias=None if o.bias is None else group_heads(xp, _cast(xp, o.bias, dtype), Hkv),
        slopes=None
        if o.alibi_slopes is None
        else xp.reshape(_cast(xp, o.alibi_slopes, dtype), (-1, Hkv, G)),
        sink=None
        if o.sink_logits is None
        else xp.reshape(_cast(xp, o.sink_logits, dtype), (1, Hkv, G, 1, 1)),
        scale=1.0 / math.sqrt(D) if o.scale is None else float(o.scale),
        causal=o.causal,
        window=o.window,
        window_right=o.window_right,
        sink_tokens=o.sink_tokens,
        softcap=o.softcap,
        return_lse=o.return_lse,
        out_dtype=q.dtype,
        dtype=dtype,
    )


def scores(call: Call, queries: slice, keys: slice) -> tuple[Array, Array]:
    """The scores of a block of queries against a block of keys, and which are visible.

    Returns (B, Hkv, G, bq, bk) scores after every modifier, in the order of the
    formula, and a boolean array broadcastable to them.

    The scores are one product of the queries with every key of the block
    (:func:`guarded_scores`: where a key is not finite, each query multiplies
    only the keys it sees).
    """
    s, visible, _ = score_terms(call, queries, keys)
    return s, visible


def score_terms(call: Call, queries: slice, keys: slice) -> tuple[Array, Array, Array | None]:
    """:func:`scores`, and the softcapped scores before ALiBi and the bias, (B, Hkv, G, bq, bk),
    or None without a softcap: the backward's softcap factor, :math:`1 - (s_c / c)^2`, is
    read from them."""
    xp = call.xp
    q_pos, k_pos = call.q_pos[:, queries], call.k_pos[:, keys]  # (B or 1, bq), (B or 1, bk)
    q, k = call.q[:, :, queries, :], call.keys(keys)
    visible = block_visibility(call, queries, keys)  # (B, 1 or Hkv, 1 or G, bq, bk)

    s = guarded_scores(xp, q, k, call.scale, visible)  # (B, Hkv, G, bq, bk)
    capped = None
    if call.softcap is not None:
        s = capped = softcap_scores(xp, s, call.softcap)
    if call.slopes is not None:
        s = s + alibi_bias(xp, call.slopes, q_pos, k_pos)  # (B, Hkv, G, bq, bk)
    if call.bias is not None:
        s = s + _block(call.bias, queries, keys)  # (B, Hkv, G, bq, bk)
    return s, visible, capped


def guarded_scores(xp: Namespace, q: Array, k: Array, scale: float, visible: Array) -> Array:
    """:func:`~refattn.scores.scaled_scores` of q (B, Hq, bq, D) and k (B, Hkv, bk, D), with
    what a query does not see kept out of its scores and its gradient: (B, Hkv, G, bq, bk).

    One product of the queries with every key is taken first, and read rather
    than K: a key that is not finite (an inf or NaN left in a slot that may be
    hidden) makes its score with every finite query not finite. So the first
    query's row says, when that query is finite (the usual case: bk numbers
    per KV head); otherwise the rows of every finite query of each KV head
    are looked at. (A query that is not finite has a row of NaN of its own,
    which says nothing about the keys.)

    A KV head of a batch row that holds such a key is scored again with each
    query multiplying only the keys it sees (:func:`~refattn.scores.seen_scores`;
    the pairs not visible score 0, and the softmax drops them either way). The
    other KV heads keep the product (the same numbers), taken again with that
    head's keys zeroed, since under autograd the first product's backward
    multiplies a NaN key by a gradient of exactly 0 for every query.
    """
    with unchecked_arithmetic():
        s = scaled_scores(xp, q, k, scale)  # (B, Hkv, G, bq, bk)
    B, Hkv, G, bq, _ = s.shape
    q = xp.reshape(q, (B, Hkv, G, bq, q.shape[-1]))  # (B, Hkv, G, bq, D)
    if bq == 0 or surely(
        xp.all(xp.isfinite(q[:, :, :1, :1, :])) & xp.all(xp.isfinite(s[:, :, :1, :1, :]))
    ):
        return s
    finite_query = xp.all(xp.isfinite(q), axis=-1, keepdims=True)  # (B, Hkv, G, bq, 1)
    shows_a_key = finite_query & ~xp.isfinite(s)  # (B, Hkv, G, bq, bk)
    finite_keys = ~xp.any(shows_a_key, axis=(2, 3, 4), keepdims=True)  # (B, Hkv, 1, 1, 1)
    if surely(xp.all(finite_keys)):
        return s
    zero = xp.zeros((), dtype=k.dtype, device=device(k))
    q = xp.reshape(q, (B, Hkv * G, bq, q.shape[-1]))  # (B, Hq, bq, D)
    kept = scaled_scores(xp, q, xp.where(finite_keys[:, :, 0, :, :], k, zero), scale)
    return xp.where(finite_keys, kept, seen_scores(xp, q, k, scale, visible))


def block_visibility(call: Call, queries: slice, keys: slice) -> Array:
    """Which keys of a block each query of a block may see, (B, 1 or Hkv, 1 or G, bq, bk).

    From positions (and the mask) alone, so a blockwise pass can skip a block
    before computing its scores.
    """
    xp = call.xp
    q_pos, k_pos = call.q_pos[:, queries], call.k_pos[:, keys]  # (B or 1, bq), (B or 1, bk)
    visible = visibility(
        xp,
        q_pos,
        k_pos,
        causal=call.causal,
        window=call.window,
        sink_tokens=call.sink_tokens,
        window_right=call.window_right,
    )
    visible = visible[:, None, None, :, :]  # (B, 1, 1, bq, bk)
    if call.mask is not None:
        visible = visible & _block(call.mask, queries, keys)  # (B, Hkv, G, bq, bk)
    return visible


def _block(x: Array, queries: slice, keys: slice) -> Array:
    """Rows ``queries`` and columns ``keys`` of a grouped (..., Sq, Sk) array that may
    broadcast along either axis (size 1 there)."""
    rows = queries if x.shape[-2] != 1 else slice(None)
    cols = keys if x.shape[-1] != 1 else slice(None)
    return x[:, :, :, rows, cols]


def _positions(xp: Namespace, pos: Array | None, default: Array) -> Array:
    """Checked positions as (B or 1, S) int64, or the default."""
    if pos is None:
        return default
    # The index dtype (int64; int32 in JAX without x64), so that differences of unsigned
    # or narrow positions cannot wrap around.
    return xp.astype(as_rows(xp, pos), index_dtype(xp))


def _cast(xp: Namespace, x: Array, dtype: object) -> Array:
    return x if x.dtype == dtype else xp.astype(x, dtype)


def weighted_sum(xp: Namespace, p: Array, v: Array, visible: Array) -> Array:
    """:math:`o_i = \\sum_j p_{ij} v_j` over visible keys only, (B, Hkv, G, Sq, Dv).

    This is one (G * Sq, Sk) x (Sk, Dv) product per KV head, which reads V
    once. A NaN or inf value would leak through that product into queries
    that cannot see it (a weight of exactly 0 times NaN is NaN), so the rows
    whose product is not finite are summed again over only the values their
    query sees (:func:`seen_sum`): slower, and taken only then. Checking the
    (small) output rather than V keeps V to one read, and a row whose product
    is finite saw only finite values (every value of its KV head, seen or
    not, entered its product), so it keeps the product: the same numbers,
    taken again with the other rows' weights zeroed, since under autograd the
    first product's backward multiplies a NaN value by a gradient of 0.
    """
    B, Hkv, G, Sq, Sk = p.shape
    Dv = v.shape[-1]

    def product(weights: Array) -> Array:
        out = xp.matmul(xp.reshape(weights, (B, Hkv, G * Sq, Sk)), v)  # (B, Hkv, G*Sq, Dv)
        return xp.reshape(out, (B, Hkv, G, Sq, Dv))

    with unchecked_arithmetic():
        out = product(p)
    finite = xp.all(xp.isfinite(out), axis=-1, keepdims=True)  # (B, Hkv, G, Sq, 1)
    if surely(xp.all(finite)):
        return out
    zero = xp.zeros((), dtype=p.dtype, device=device(p))
    with unchecked_arithmetic():  # the rows zeroed may still meet an inf value: 0 * inf
        kept = product(xp.where(finite, p, zero))
    return xp.where(finite, kept, seen_sum(xp, p, v, visible))


def seen_sum(xp: Namespace, p: Array, v: Array, visible: Array) -> Array:
    """:math:`o_i = \\sum_{j \\in V_i} p_{ij} v_j` with each row multiplying only the
    values its query sees, (B, Hkv, G, Sq, Dv).

    A (Sk, Dv) value block per query, the unseen values replaced by 0, so an
    inf or NaN value meets neither the weight 0 of a query that does not see
    it nor, under autograd, that query's output gradient.
    """
    zero = xp.zeros((), dtype=v.dtype, device=device(v))
    # (B, Hkv, G or 1, Sq, Sk, Dv): the values each query sees, 0 for the others
    seen = xp.where(visible[..., None], v[:, :, None, None, :, :], zero)
    return xp.matmul(p[..., None, :], seen)[..., 0, :]  # (B, Hkv, G, Sq, Dv)
