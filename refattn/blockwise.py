r"""Blockwise attention: the online-softmax recurrence of FlashAttention, and split-KV decoding.

A kernel never holds a whole row of scores. It walks the keys in blocks and
keeps, per query, a running maximum :math:`m`, a running denominator
:math:`\ell` and an unnormalised accumulator :math:`a`. For each key block
with scores :math:`s_j`:

.. math::

    m' = \max(m, \max_j s_j), \qquad
    \ell' = e^{m - m'} \ell + \sum_j e^{s_j - m'}, \qquad
    a' = e^{m - m'} a + \sum_j e^{s_j - m'} v_j

and at the end :math:`o = a / \ell`, :math:`\text{lse} = m + \log \ell`. A
sink logit joins :math:`\ell` once, at the end. A key block that no query of
the query block can see is skipped without being read, as a kernel skips the
blocks above the causal diagonal. Every step reuses the pieces of
:func:`refattn.attention`, so the two can only differ by rounding.

Split-KV decoding (flash-decoding) cuts the keys into ``num_splits`` parts,
attends to each separately and merges the partial states with
:func:`refattn.merge_states_n`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from array_api_compat import device

from refattn.attention import Call, block_visibility, prepare, scores, weighted_sum
from refattn.merge import merge_states_n
from refattn.namespace import Array, Namespace, surely
from refattn.options import AttentionOptions, check_integer, takes_options
from refattn.softmax import row_shift


@takes_options
def attention_blockwise(
    q: Array, k: Array, v: Array, *, block_q: int = 64, block_k: int = 64, **options: Any
) -> Array | tuple[Array, Array]:
    """:func:`refattn.attention`, computed block by block with an online softmax.

    Parameters
    ----------
    q, k, v : as for :func:`refattn.attention`
    block_q, block_k : block sizes along the queries and the keys; they need not
        divide Sq or Sk (the last block is shorter)
    **options : every option of :func:`refattn.attention`
        (:class:`~refattn.options.AttentionOptions`)

    Examples
    --------
    >>> import numpy as np
    >>> from refattn import attention
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((1, 2, 5, 8))
    >>> k, v = rng.standard_normal((2, 1, 2, 7, 8))
    >>> out = attention_blockwise(q, k, v, block_q=2, block_k=3, causal=True)
    >>> bool(np.allclose(out, attention(q, k, v, causal=True)))
    True
    """
    check_integer("block_q", block_q, minimum=1)
    check_integer("block_k", block_k, minimum=1)
    call = prepare(q, k, v, AttentionOptions.of("attention_blockwise", options))
    xp = call.xp
    Sq, Sk = call.q.shape[2], call.k.shape[2]
    key_blocks = [slice(k0, min(k0 + block_k, Sk)) for k0 in range(0, Sk, block_k)]
    query_blocks = [slice(q0, min(q0 + block_q, Sq)) for q0 in range(0, Sq, block_q)]
    states = [
        online_softmax(call, queries, key_blocks) for queries in query_blocks or [slice(0, 0)]
    ]
    return call.finish(xp.concat([o for o, _ in states], axis=3),
                       xp.concat([s for _, s in states], axis=3))  # fmt: skip


def online_softmax(call: Call, queries: slice, key_blocks: list[slice]) -> tuple[Array, Array]:
    """One query block over every key block: (B, Hkv, G, bq, Dv) and (B, Hkv, G, bq)."""
    xp = call.xp
    B, Hkv, G = call.q.shape[0], call.k.shape[1], call.q.shape[1] // call.k.shape[1]
    bq = len(range(call.q.shape[2])[queries])
    on, dtype = device(call.q), call.q.dtype
    neg_inf = xp.asarray(-xp.inf, dtype=dtype, device=on)
    m = xp.full((B, Hkv, G, bq, 1), -xp.inf, dtype=dtype, device=on)  # running max
    denom = xp.zeros((B, Hkv, G, bq, 1), dtype=dtype, device=on)  # running denominator, l
    acc = xp.zeros((B, Hkv, G, bq, call.v.shape[-1]), dtype=dtype, device=on)  # running a
    for keys in key_blocks:
        if not range(call.k.shape[2])[keys] or surely(
            ~xp.any(block_visibility(call, queries, keys))
        ):
            continue  # an empty block, or one no query here can see: a kernel never loads it
        s, visible = scores(call, queries, keys)  # (B, Hkv, G, bq, bk)
        if not surely(xp.all(visible)):  # a block below the diagonal needs no masking
            s = xp.where(visible, s, neg_inf)
        m_new = xp.maximum(m, xp.max(s, axis=-1, keepdims=True))
        shift = row_shift(xp, m_new)  # rows still empty shift by 0
        rescale = xp.exp(m - shift)  # e^(m - m'), 0 while the row was empty
        p = xp.exp(s - shift)  # (B, Hkv, G, bq, bk)
        denom = rescale * denom + xp.sum(p, axis=-1, keepdims=True)
        v = call.values(keys)  # widened a block at a time
        acc = rescale * acc + weighted_sum(xp, p, v, visible)
        m = m_new
    if call.sink is not None:  # the sink joins the denominator once
        m_new = xp.maximum(m, call.sink)
        shift = row_shift(xp, m_new)
        rescale = xp.exp(m - shift)
        denom = rescale * denom + xp.exp(call.sink - shift)
        acc = rescale * acc
        m = m_new
    empty = denom == 0
    l_safe = xp.where(empty, xp.ones_like(denom), denom)
    lse = xp.where(empty, neg_inf, row_shift(xp, m) + xp.log(l_safe))
    return acc / l_safe, lse[..., 0]


@takes_options
def attention_split_kv(
    q: Array, k: Array, v: Array, *, num_splits: int, **options: Any
) -> Array | tuple[Array, Array]:
    """:func:`refattn.attention` over ``num_splits`` contiguous parts of the keys, merged.

    Flash-decoding's plan for one query and a long cache: every part is attended
    to on its own (in parallel, on a GPU) and the partial states are merged
    through their log-sum-exps. A sink logit is added once, after the merge.

    >>> import numpy as np
    >>> from refattn import attention
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((1, 4, 1, 8))
    >>> k, v = rng.standard_normal((2, 1, 2, 9, 8))
    >>> out = attention_split_kv(q, k, v, num_splits=3, causal=True)
    >>> bool(np.allclose(out, attention(q, k, v, causal=True)))
    True
    """
    check_integer("num_splits", num_splits, minimum=1)
    call = prepare(q, k, v, AttentionOptions.of("attention_split_kv", options))
    Sk = call.k.shape[2]
    size = -(-Sk // num_splits) if Sk else 1
    parts = [slice(k0, min(k0 + size, Sk)) for k0 in range(0, Sk, size)] or [slice(0, 0)]
    sinkless = replace(call, sink=None)  # each part without the sink; it joins once, after
    states = [online_softmax(sinkless, slice(None), [part]) for part in parts]
    out, lse = merge_states_n([o for o, _ in states], [s for _, s in states])
    if call.sink is not None:
        out, lse = _add_sink(call.xp, out, lse, call.sink[..., 0])
    return call.finish(out, lse)


def _add_sink(xp: Namespace, out: Array, lse: Array, sink: Array) -> tuple[Array, Array]:
    """Add a sink logit to a merged state: it enlarges the denominator, adds no value."""
    empty = xp.zeros_like(out)
    sink_lse = xp.broadcast_to(sink, lse.shape)
    return merge_states_n([out, empty], [lse, sink_lse])
