r"""The backward pass of attention: the gradients of q, k, v, the sink logits and the bias.

For one query :math:`i` (one query head, reading KV head :math:`h // G`) with
visible keys :math:`V_i`, the forward of :func:`refattn.attention` is

.. math::

    t_{ij} = \text{scale}\, q_i \cdot k_j, \qquad
    c_{ij} = c \tanh(t_{ij} / c), \qquad
    s_{ij} = c_{ij} - m_h \lvert q^{pos}_i - k^{pos}_j \rvert + \text{bias}_{ij}, \\
    P_{ij} = e^{s_{ij} - \text{lse}_i} \ (j \in V_i), \qquad
    o_i = \textstyle\sum_{j \in V_i} P_{ij} v_j,

with :math:`\text{lse}_i = \log(\sum_{j \in V_i} e^{s_{ij}} + e^{\sigma_h})`.
Given the gradient :math:`dO` of a loss with respect to the output, the
chain rule, step by step (each a named line of :func:`backward_tile`):

.. math::

    D_i &= \textstyle\sum_d dO_{id}\, o_{id}
        &&\text{(the row's } dO \cdot o\text{)} \\
    dV_j &= \textstyle\sum_i P_{ij}\, dO_i
        &&\text{(}dV = P^T dO\text{)} \\
    dP_{ij} &= dO_i \cdot v_j
        &&\text{(}dP = dO\, V^T\text{)} \\
    dS_{ij} &= P_{ij} (dP_{ij} - D_i)
        &&\text{(the softmax's Jacobian; 0 for } j \notin V_i\text{)} \\
    d\text{bias}_{ij} &= dS_{ij} \\
    dT_{ij} &= dS_{ij}\, \big(1 - (c_{ij} / c)^2\big)
        &&\text{(through the softcap: } \tanh' = 1 - \tanh^2\text{)} \\
    dQ_i &= \text{scale} \textstyle\sum_j dT_{ij}\, k_j, \qquad
    dK_j = \text{scale} \textstyle\sum_i dT_{ij}\, q_i \\
    d\sigma_h &= -\textstyle\sum_i e^{\sigma_h - \text{lse}_i}\, D_i
        &&\text{(the sink takes weight from every row)}

The softmax's Jacobian is where :math:`D` comes from: :math:`\partial o_i /
\partial s_{ij} = P_{ij}(v_j - o_i)`, so :math:`dO_i \cdot \partial o_i /
\partial s_{ij} = P_{ij}(dP_{ij} - dO_i \cdot o_i)`. A sink logit carries no
value, so it changes neither :math:`dP` nor this form; it enlarges
:math:`Z`, and :math:`\partial o_i / \partial \sigma_h = -e^{\sigma_h -
\text{lse}_i} o_i`.

Grouped-query attention: the G query heads of a group read one KV head, so
:math:`dK` and :math:`dV` of that head sum over the group's queries. The G
heads' rows are stacked into one matrix (as in the forward), and the sum is
the inner dimension of one product; K and V are never repeated.

A row with no visible key has :math:`P = 0`, so every gradient it
contributes is 0. A NaN or inf in a key or value slot that no query sees
reaches no gradient: products that meet one are taken again over the visible
pairs only, as in the forward. ALiBi slopes and the mask are constants here.
float16 and bfloat16 are computed in float32 and each gradient is cast back
to its input's dtype.

:func:`attention_backward_blockwise` is FlashAttention-2's backward: P is
recomputed per block from the saved lse (no :math:`S_q \times S_k` matrix is
kept), :math:`dK` and :math:`dV` of a key block accumulate over the query
blocks, :math:`dQ` of a query block over the key blocks, and a block no query
of it can see is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from array_api_compat import device

from refattn.attention import (
    Call,
    block_visibility,
    prepare,
    score_terms,
    scores,
    weighted_sum,
)
from refattn.blockwise import online_softmax
from refattn.checks import check_saved
from refattn.namespace import Array, Namespace, namespace_of, unchecked_arithmetic
from refattn.options import AttentionOptions, check_integer, takes_options
from refattn.softmax import masked_softmax


@dataclass(frozen=True)
class Gradients:
    """The gradients of one attention call, each in its input's dtype and shape.

    Attributes
    ----------
    dq : (B, Hq, Sq, D)
    dk : (B, Hkv, Sk, D)
    dv : (B, Hkv, Sk, Dv)
    dsink_logits : (Hq,), or None without sink logits
    dbias : the bias's own shape, or None without a bias
    """

    dq: Array
    dk: Array
    dv: Array
    dsink_logits: Array | None = None
    dbias: Array | None = None


@takes_options
def attention_backward(
    q: Array, k: Array, v: Array, dout: Array, *, out: Array | None = None,
    lse: Array | None = None, **options: Any,
) -> Gradients:  # fmt: skip
    """The gradients of :func:`refattn.attention` with respect to its inputs.

    Parameters
    ----------
    q, k, v : as for :func:`refattn.attention`
    dout : (B, Hq, Sq, Dv) floating array, the gradient of the loss with respect to the output
    out, lse : optional, the forward's ``(out, lse)`` (as ``return_lse=True`` gives them),
        given together or not at all. A kernel saves them; given, D is read from
        ``out`` and P recomputed from ``lse``. Without them the forward is run.
    **options : every option of :func:`refattn.attention`
        (:class:`~refattn.options.AttentionOptions`) but ``return_lse``

    Returns
    -------
    Gradients
        dq, dk, dv, and dsink_logits and dbias when those options are given.

    Examples
    --------
    One query over two keys with equal scores: :math:`o = (v_0 + v_1)/2`, so
    each value gets half of dout; the keys' scores move the output by
    :math:`P_j (v_j - o)`.

    >>> import numpy as np
    >>> q = np.zeros((1, 1, 1, 1)); k = np.zeros((1, 1, 2, 1))
    >>> v = np.array([0.0, 2.0]).reshape(1, 1, 2, 1); dout = np.ones((1, 1, 1, 1))
    >>> g = attention_backward(q, k, v, dout, scale=1.0)
    >>> g.dv[0, 0, :, 0], g.dq[0, 0, 0, 0]
    (array([0.5, 0.5]), np.float64(0.0))
    >>> g = attention_backward(q, np.array([0.0, 1.0]).reshape(1, 1, 2, 1), v, dout, scale=1.0)
    >>> float(g.dq[0, 0, 0, 0])  # 0.5 * (0 - 1) * 0 + 0.5 * (2 - 1) * 1
    0.5
    """
    call = _prepare("attention_backward", q, k, v, dout, out, lse, options)
    everything = slice(None)

    def forward() -> tuple[Array, Array]:
        s, visible = scores(call, everything, everything)  # (B, Hkv, G, Sq, Sk)
        p, lse = masked_softmax(call.xp, s, visible, call.sink)
        return weighted_sum(call.xp, p, call.values(everything), visible), lse

    dout_g, out_g, lse_g = _saved(call, dout, out, lse, forward)  # grouped, compute dtype
    delta = row_dot(call.xp, dout_g, out_g)  # D = rowsum(dO * O), (B, Hkv, G, Sq, 1)
    dq, dk, dv, ds = backward_tile(call, everything, everything, dout_g, delta, lse_g)
    return _gradients(call, options, dq, dk, dv, [[ds]], delta, lse_g)


@takes_options
def attention_backward_blockwise(
    q: Array, k: Array, v: Array, dout: Array, *, out: Array | None = None,
    lse: Array | None = None, block_q: int = 64, block_k: int = 64, **options: Any,
) -> Gradients:  # fmt: skip
    """:func:`attention_backward` block by block, as FlashAttention-2's backward runs.

    The outer loop walks the key blocks (a kernel gives each its own thread
    block, which keeps that block's dK and dV on chip); the inner loop walks
    the query blocks, recomputes P of the tile from the saved lse, adds the
    tile's share to dK and dV, and adds its share of dQ to that query block
    (a kernel's atomic add). A tile that no query of it can see is skipped.

    Parameters
    ----------
    q, k, v, dout, out, lse, **options : as for :func:`attention_backward`; without
        ``out`` and ``lse`` the forward is run blockwise first
    block_q, block_k : block sizes along the queries and the keys; they need not
        divide Sq or Sk

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> q, dout = rng.standard_normal((2, 1, 2, 5, 8))
    >>> k, v = rng.standard_normal((2, 1, 1, 7, 8))
    >>> plain = attention_backward(q, k, v, dout, causal=True)
    >>> tiled = attention_backward_blockwise(q, k, v, dout, causal=True, block_q=2, block_k=3)
    >>> all(bool(np.allclose(a, b)) for a, b in zip((plain.dq, plain.dk, plain.dv),
    ...                                             (tiled.dq, tiled.dk, tiled.dv)))
    True
    """
    check_integer("block_q", block_q, minimum=1)
    check_integer("block_k", block_k, minimum=1)
    call = _prepare("attention_backward_blockwise", q, k, v, dout, out, lse, options)
    xp = call.xp
    Sq, Sk = call.q.shape[2], call.k.shape[2]
    query_blocks = [slice(i, min(i + block_q, Sq)) for i in range(0, Sq, block_q)]
    key_blocks = [slice(j, min(j + block_k, Sk)) for j in range(0, Sk, block_k)]
    query_blocks, key_blocks = query_blocks or [slice(0, 0)], key_blocks or [slice(0, 0)]

    def forward() -> tuple[Array, Array]:
        states = [online_softmax(call, queries, key_blocks) for queries in query_blocks]
        return xp.concat([o for o, _ in states], axis=3), xp.concat([s for _, s in states], axis=3)

    dout_g, out_g, lse_g = _saved(call, dout, out, lse, forward)  # grouped, compute dtype
    delta = row_dot(xp, dout_g, out_g)  # D = rowsum(dO * O), (B, Hkv, G, Sq, 1)
    B, Hkv, G, _, Dv = dout_g.shape
    D = call.q.shape[-1]
    on, dtype = device(call.q), call.dtype
    dq = [xp.zeros((B, Hkv, G, _length(rows, Sq), D), dtype=dtype, device=on)
          for rows in query_blocks]  # fmt: skip
    dk, dv = [], []
    ds_tiles: list[list[Array]] = [[] for _ in query_blocks]  # dS, kept only for a bias
    for keys in key_blocks:  # one thread block per key block
        bk = _length(keys, Sk)
        dk_j = xp.zeros((B, Hkv, bk, D), dtype=dtype, device=on)  # on chip
        dv_j = xp.zeros((B, Hkv, bk, Dv), dtype=dtype, device=on)
        for i, queries in enumerate(query_blocks):
            bq = _length(queries, Sq)
            if not bool(xp.any(block_visibility(call, queries, keys))):
                if call.bias is not None:
                    ds_tiles[i].append(xp.zeros((B, Hkv, G, bq, bk), dtype=dtype, device=on))
                continue  # a tile no query here can see: never loaded
            rows = (slice(None), slice(None), slice(None), queries, slice(None))
            dq_t, dk_t, dv_t, ds = backward_tile(
                call, queries, keys, dout_g[rows], delta[rows], lse_g[rows]
            )
            dk_j, dv_j = dk_j + dk_t, dv_j + dv_t
            dq[i] = dq[i] + dq_t  # a kernel's atomic add into dQ
            if call.bias is not None:
                ds_tiles[i].append(ds)
        dk.append(dk_j)
        dv.append(dv_j)
    return _gradients(call, options, xp.concat(dq, axis=3), xp.concat(dk, axis=2),
                      xp.concat(dv, axis=2), ds_tiles, delta, lse_g)  # fmt: skip


def backward_tile(
    call: Call, queries: slice, keys: slice, dout: Array, delta: Array, lse: Array
) -> tuple[Array, Array, Array, Array]:
    """What one block of queries and one block of keys contribute to dQ, dK and dV.

    Parameters
    ----------
    call : the checked call
    queries, keys : the tile's rows and columns
    dout : (B, Hkv, G, bq, Dv) the queries' output gradients, compute dtype
    delta : (B, Hkv, G, bq, 1) their :math:`D_i = dO_i \\cdot o_i`
    lse : (B, Hkv, G, bq, 1) their saved log-sum-exps

    Returns
    -------
    dq : (B, Hkv, G, bq, D), the tile's share of dQ
    dk : (B, Hkv, bk, D) and dv : (B, Hkv, bk, Dv), its shares of dK and dV (summed
        over the group's G query heads)
    ds : (B, Hkv, G, bq, bk), :math:`dS`: the gradient of the final scores (the bias's)
    """
    xp = call.xp
    B, Hkv, G, bq, Dv = dout.shape
    s, visible, capped = score_terms(call, queries, keys)  # (B, Hkv, G, bq, bk)
    bk = s.shape[-1]
    p = recomputed_weights(xp, s, visible, lse)  # P = exp(s - lse), (B, Hkv, G, bq, bk)
    v = call.values(keys)  # (B, Hkv, bk, Dv)
    dv = key_sum(xp, p, dout, visible)  # dV = P^T dO, (B, Hkv, bk, Dv)
    zero = xp.zeros((), dtype=s.dtype, device=device(s))
    with unchecked_arithmetic():  # an inf value in an unseen slot: its dP is dropped below
        dp = xp.matmul(xp.reshape(dout, (B, Hkv, G * bq, Dv)), xp.matrix_transpose(v))
        dp = xp.reshape(dp, (B, Hkv, G, bq, bk))  # dP = dO V^T
        ds = xp.where(visible, p * (dp - delta), zero)  # dS = P * (dP - D), (B, Hkv, G, bq, bk)
    dt = ds  # dT: the gradient of scale * q.k
    if capped is not None:  # through c tanh(t / c): tanh' = 1 - tanh^2
        softcap = call.softcap
        assert softcap is not None
        dt = xp.where(visible, ds * (1 - (capped / softcap) ** 2), zero)
    q = call.q[:, :, queries, :]  # (B, Hq, bq, D)
    q = xp.reshape(q, (B, Hkv, G, bq, q.shape[-1]))  # (B, Hkv, G, bq, D)
    dq = call.scale * weighted_sum(xp, dt, call.keys(keys), visible)  # dQ = scale dT K
    dk = call.scale * key_sum(xp, dt, q, visible)  # dK = scale dT^T Q, (B, Hkv, bk, D)
    return dq, dk, dv, ds


def recomputed_weights(xp: Namespace, s: Array, visible: Array, lse: Array) -> Array:
    """:math:`P_{ij} = e^{s_{ij} - \\text{lse}_i}` over the visible keys, 0 elsewhere.

    The saved lse makes the weights of any block of keys in one step, with no
    running maximum: a kernel's backward keeps lse, not P. A row with no
    visible key (lse :math:`= -\\infty`) gets weights 0.

    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> s = np.array([[0.0, np.log(3.0)], [1.0, 1.0]])
    >>> visible = np.array([[True, True], [False, False]])
    >>> recomputed_weights(xp, s, visible, np.array([[np.log(4.0)], [-np.inf]]))
    array([[0.25, 0.75],
           [0.  , 0.  ]])
    """
    neg_inf = xp.asarray(-xp.inf, dtype=s.dtype, device=device(s))
    s = xp.where(visible, s, neg_inf)
    shift = xp.where(lse == -xp.inf, xp.zeros_like(lse), lse)
    return xp.exp(s - shift)


def key_sum(xp: Namespace, w: Array, x: Array, visible: Array) -> Array:
    """:math:`\\sum_{g, i} w_{gij}\\, x_{gi}` for each key :math:`j`: the transpose of
    :func:`~refattn.attention.weighted_sum`, (B, Hkv, Sk, Dx).

    Parameters
    ----------
    w : (B, Hkv, G, Sq, Sk) per-pair weights, 0 where not visible
    x : (B, Hkv, G, Sq, Dx) per-query rows (dO or Q)
    visible : boolean, broadcastable to w

    The G query heads of a KV head are stacked as rows, so a key's sum over
    its group is the inner dimension of one (Sk, G * Sq) x (G * Sq, Dx)
    product per KV head. As in the forward, a key whose product is not finite
    (a query that is not finite, which the key may not even see) is summed
    again over only the queries that see it.
    """
    B, Hkv, G, Sq, Sk = w.shape
    Dx = x.shape[-1]
    w_rows = xp.reshape(w, (B, Hkv, G * Sq, Sk))  # (B, Hkv, G*Sq, Sk)
    x_rows = xp.reshape(x, (B, Hkv, G * Sq, Dx))  # (B, Hkv, G*Sq, Dx)
    with unchecked_arithmetic():
        out = xp.matmul(xp.matrix_transpose(w_rows), x_rows)  # (B, Hkv, Sk, Dx)
    if bool(xp.all(xp.isfinite(out))):
        return out
    # The guarded path: each key is a "query" of weighted_sum over the G * Sq rows.
    seen = xp.broadcast_to(visible, (visible.shape[0], visible.shape[1], G, Sq, Sk))
    seen = xp.reshape(
        xp.permute_dims(seen, (0, 1, 4, 2, 3)), (seen.shape[0], seen.shape[1], 1, Sk, G * Sq)
    )
    w_keys = xp.reshape(xp.permute_dims(w, (0, 1, 4, 2, 3)), (B, Hkv, 1, Sk, G * Sq))
    return weighted_sum(xp, w_keys, x_rows, seen)[:, :, 0]  # (B, Hkv, Sk, Dx)


def row_dot(xp: Namespace, dout: Array, out: Array) -> Array:
    """:math:`D_i = \\sum_d dO_{id}\\, o_{id}`, one number per query row: (..., 1)."""
    return xp.sum(dout * out, axis=-1, keepdims=True)


def _prepare(
    function: str, q: Array, k: Array, v: Array, dout: Array, out: Array | None,
    lse: Array | None, options: dict[str, Any],
) -> Call:  # fmt: skip
    record = AttentionOptions.of(function, options)
    if record.return_lse:
        raise ValueError(f"{function} returns gradients: return_lse must be False; got True")
    xp = namespace_of(q=q, dout=dout, out=out, lse=lse)  # one library for every array
    check_saved(xp, q, v, dout, out, lse)
    return prepare(q, k, v, record)


def _saved(
    call: Call, dout: Array, out: Array | None, lse: Array | None, forward: Any
) -> tuple[Array, Array, Array]:
    """dO, O and lse grouped by KV head in the compute dtype: (B, Hkv, G, Sq, Dv) twice
    and (B, Hkv, G, Sq, 1); ``forward()`` gives O and lse (grouped) when they are not given."""
    xp = call.xp
    B, Hq, Sq, _ = call.q.shape
    Hkv, Dv = call.k.shape[1], call.v.shape[-1]

    def grouped(x: Array, last: int) -> Array:  # named, not -1: a size-0 array has no -1
        x = x if x.dtype == call.dtype else xp.astype(x, call.dtype)
        return xp.reshape(x, (B, Hkv, Hq // Hkv, Sq, last))

    if out is None or lse is None:
        out_g, lse_g = forward()  # (B, Hkv, G, Sq, Dv), (B, Hkv, G, Sq)
        return grouped(dout, Dv), out_g, lse_g[..., None]
    return grouped(dout, Dv), grouped(out, Dv), grouped(lse, 1)


def _gradients(
    call: Call, options: dict[str, Any], dq: Array, dk: Array, dv: Array,
    ds_tiles: list[list[Array]], delta: Array, lse: Array,
) -> Gradients:  # fmt: skip
    """The grouped gradients in the caller's shapes and dtypes, with the sink's and the
    bias's when the call has them."""
    xp = call.xp
    B, Hq, Sq, D = call.q.shape
    dsink = dbias = None
    if call.sink is not None:
        sink_weight = xp.exp(
            call.sink - lse
        )  # e^(sigma - lse): the sink's weight, (B, Hkv, G, Sq, 1)
        dsink = -xp.sum(sink_weight * delta, axis=(0, 3, 4))  # (Hkv, G)
        dsink = _cast(xp, xp.reshape(dsink, (Hq,)), options["sink_logits"].dtype)
    if call.bias is not None:
        bias = options["bias"]
        ds = xp.concat([xp.concat(row, axis=4) for row in ds_tiles], axis=3)  # (B, Hkv, G, Sq, Sk)
        ds = xp.reshape(ds, (B, Hq, Sq, ds.shape[-1]))  # (B, Hq, Sq, Sk)
        dbias = _cast(xp, summed_to(xp, ds, tuple(bias.shape)), bias.dtype)
    return Gradients(
        dq=_cast(xp, xp.reshape(dq, (B, Hq, Sq, D)), call.out_dtype),
        dk=_cast(xp, dk, call.k.dtype),
        dv=_cast(xp, dv, call.v.dtype),
        dsink_logits=dsink,
        dbias=dbias,
    )


def summed_to(xp: Namespace, g: Array, shape: tuple[int, ...]) -> Array:
    """The gradient ``g`` (B, Hq, Sq, Sk) of an array of ``shape`` that was broadcast to it:
    summed over every axis the array had as 1 (or did not have).

    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> summed_to(xp, np.ones((2, 3, 4, 5)), (4, 1)).ravel()
    array([30., 30., 30., 30.])
    """
    full = (1,) * (g.ndim - len(shape)) + shape
    axes = tuple(a for a in range(g.ndim) if full[a] == 1 and g.shape[a] != 1)
    if axes:
        g = xp.sum(g, axis=axes, keepdims=True)
    return xp.reshape(g, shape)


def _length(block: slice, n: int) -> int:
    return len(range(n)[block])


def _cast(xp: Namespace, x: Array, dtype: Any) -> Array:
    return x if x.dtype == dtype else xp.astype(x, dtype)
