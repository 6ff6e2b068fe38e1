"""Attention kernels with one realistic bug each, and correct ones written differently.

Every wrong kernel here is :func:`textbook` with one line changed the way
kernel authors get it wrong (each has been reported against some real
library). ``check_attention`` must fail every one of them and pass the
correct ones. ``refattn verify --candidate
refattn.testing.known_bugs.attention:<name>`` points the verifier at one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

import refattn
from refattn.backends import to_numpy
from refattn.backends.base import numpy_dtype, round_to
from refattn.testing.candidate import AttentionProblem, Unsupported
from refattn.testing.drawing import DEFAULT_FEATURES
from refattn.testing.drawing import FEATURES as FEATURES_DRAWN
from refattn.testing.precision import Precision

Visible = Callable[[np.ndarray, np.ndarray, AttentionProblem], np.ndarray]


def positions_visible(q_pos: np.ndarray, k_pos: np.ndarray, p: AttentionProblem) -> np.ndarray:
    """(B, Sq, Sk): the spec's visibility, from positions."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    visible = np.broadcast_to(k >= 0, (q.shape[0], q.shape[1], k.shape[2]))
    if p.causal:
        visible = visible & (k <= q)
    if p.window is not None:
        visible = visible & ((q - k < p.window) | (k < p.sink_tokens))
    if p.window_right is not None:
        visible = visible & (k - q <= p.window_right)
    return visible


Masked = Callable[[np.ndarray], np.ndarray]


def _as_is(mask: np.ndarray) -> np.ndarray:
    return mask


def textbook(
    p: AttentionProblem,
    *,
    visible: Visible = positions_visible,
    kv_head_of: Callable[[int, int], np.ndarray] | None = None,
    scale: float | None = None,
    subtract_max: bool = True,
    softcap_after_mask: bool = False,
    guard_empty_rows: bool = True,
    alibi_distance: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    lse_log: Callable[[np.ndarray], np.ndarray] = np.log,
    accumulate: Any = None,
    product: Any = None,
    values: Callable[[np.ndarray], np.ndarray] | None = None,
    scores: str | None = None,
    sum_values_in: Any = None,
    mask: Masked = _as_is,
    sink_in_denominator: bool = True,
) -> Any:
    """Plain matmul-softmax-matmul in float32 (float64 for float64 problems), as users write it.

    Each keyword is a place where a kernel goes wrong; the defaults are right.
    ``product`` is the dtype q·kᵀ is multiplied in (before the scale),
    ``scores`` the dtype the scores are stored in after each step (the scale,
    softcap, ALiBi), ``values`` what is done to V before the weighted sum,
    ``sum_values_in`` the dtype that sum accumulates in, key by key, ``mask``
    what is made of the problem's boolean mask, (B, Hq, Sq, Sk), before it is
    applied, and ``sink_in_denominator`` whether the sink logits join the
    softmax's denominator.
    """

    def stored(s: np.ndarray) -> np.ndarray:
        return s if scores is None else round_to(s, scores).astype(acc)

    acc = accumulate or (np.float64 if p.dtype == "float64" else np.float32)
    q, k, v = (to_numpy(x).astype(acc) for x in (p.q, p.k, p.v))
    q_pos, k_pos = to_numpy(p.q_pos).astype(np.int64), to_numpy(p.k_pos).astype(np.int64)
    Hq, Hkv = q.shape[1], k.shape[1]
    heads = np.arange(Hq) // (Hq // Hkv) if kv_head_of is None else kv_head_of(Hq, Hkv)
    k, v = k[:, heads], v[:, heads]  # (B, Hq, Sk, D): each query head's KV head
    if values is not None:
        v = values(v)
    distance = np.abs(q_pos[:, :, None] - k_pos[:, None, :])  # (B, Sq, Sk)
    if alibi_distance is not None:
        distance = alibi_distance(q_pos, k_pos)
    seen = visible(q_pos, k_pos, p)[:, None]  # (B, 1, Sq, Sk)
    if p.mask is not None:
        full = (q.shape[0], Hq, q.shape[2], k.shape[2])
        seen = seen & mask(np.broadcast_to(to_numpy(p.mask), full).copy())  # (B, Hq, Sq, Sk)
    sink = None
    if p.sink_logits is not None and sink_in_denominator:
        sink = to_numpy(p.sink_logits).astype(acc).reshape(1, Hq, 1, 1)
    with np.errstate(all="ignore"):  # a float16 accumulator may overflow: that is its bug
        if product is None:
            s = q @ np.swapaxes(k, -1, -2)  # (B, Hq, Sq, Sk)
        else:
            s = (q.astype(product) @ np.swapaxes(k.astype(product), -1, -2)).astype(acc)
        s = stored(s * acc(p.scale if scale is None else scale))
        if p.softcap is not None and not softcap_after_mask:
            s = stored(p.softcap * np.tanh(s / p.softcap))
        if p.alibi_slopes is not None:
            slopes = to_numpy(p.alibi_slopes).astype(acc).reshape(-1, Hq, 1, 1)
            s = stored(s - slopes * distance[:, None].astype(acc))
        if p.bias is not None:
            s = stored(s + to_numpy(p.bias).astype(acc))
        s = np.where(seen, s, -np.inf)  # (B, Hq, Sq, Sk)
        if p.softcap is not None and softcap_after_mask:
            s = p.softcap * np.tanh(s / p.softcap)
        m = s.max(axis=-1, keepdims=True, initial=-np.inf)
        if sink is not None:
            m = np.maximum(m, sink)
        m = np.where(np.isfinite(m), m, 0) if subtract_max else np.zeros_like(m)
        e = np.exp(s - m)
        z = e.sum(axis=-1, keepdims=True, dtype=acc)
        if sink is not None:
            z = z + np.exp(sink - m)
        if sum_values_in is None:
            out = (e @ v) / z
        else:  # key by key, rounding the running sum
            out = np.zeros((*e.shape[:-1], v.shape[-1]), dtype=sum_values_in)
            for j in range(e.shape[-1]):
                term = (e[..., j, None] / z) * np.where(seen[..., j, None], v[:, :, None, j], 0)
                out = (out + term.astype(sum_values_in)).astype(sum_values_in)
            out = out.astype(acc)
        if guard_empty_rows:
            out = np.where(z > 0, out, 0)
        lse = (lse_log(z) + m)[..., 0]
    if p.return_lse:
        return out.astype(np.float64), lse.astype(np.float64)
    return out.astype(np.float64)


def blockwise(p: AttentionProblem) -> Any:
    """Correct: refattn's online-softmax form, in blocks of 5 keys and 3 queries."""
    return refattn.attention_blockwise(p.q, p.k, p.v, **p.options(), block_q=3, block_k=5)


def float16_scores(p: AttentionProblem) -> Any:
    """Correct under the contract it declares: stores its scores in the input dtype (float16
    for float16 inputs), formed with a float32 accumulator, scaled, then rounded; softmax and
    weighted sum in float32. ``precision = Precision(scores="input")``. Scores past the
    input dtype's range cannot be stored: it refuses those problems."""
    q, k = (to_numpy(x).astype(np.float64) for x in (p.q, p.k))
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    largest = float(np.abs(p.scale * (q @ np.swapaxes(k, -1, -2))).max(initial=0.0))
    if largest >= float(np.finfo(numpy_dtype(p.dtype)).max) / 2:
        raise Unsupported(f"scores past what {p.dtype} holds")
    return textbook(p, scores=p.dtype)


float16_scores.precision = Precision(scores="input")  # type: ignore[attr-defined]


def split_kv(p: AttentionProblem) -> Any:
    """Correct: refattn's split-KV decoding, 3 splits merged."""
    return refattn.attention_split_kv(p.q, p.k, p.v, **p.options(), num_splits=3)


# -- the wrong ones ------------------------------------------------------------


def top_left_causal(p: AttentionProblem) -> Any:
    """Causal mask ``tril(ones(Sq, Sk))``: query i sees keys 0..i, wrong on a cache (Sq < Sk)."""

    def visible(q_pos: np.ndarray, k_pos: np.ndarray, p: AttentionProblem) -> np.ndarray:
        keep = positions_visible(q_pos, k_pos, replace(p, causal=False))
        if p.causal:
            Sq, Sk = q_pos.shape[1], k_pos.shape[1]
            keep = keep & (np.arange(Sk)[None, :] <= np.arange(Sq)[:, None])[None]
        return keep

    return textbook(p, visible=visible)


def causal_excludes_diagonal(p: AttentionProblem) -> Any:
    """``k_pos < q_pos``: a token cannot see itself."""

    def visible(q_pos: np.ndarray, k_pos: np.ndarray, p: AttentionProblem) -> np.ndarray:
        keep = positions_visible(q_pos, k_pos, p)
        return keep & (k_pos[:, None, :] < q_pos[:, :, None]) if p.causal else keep

    return textbook(p, visible=visible)


def unscaled(p: AttentionProblem) -> Any:
    """Forgets ``1 / sqrt(D)`` (or the scale asked for)."""
    return textbook(p, scale=1.0)


def gqa_heads_interleaved(p: AttentionProblem) -> Any:
    """Query head h reads KV head ``h % Hkv`` instead of ``h // (Hq / Hkv)``."""
    return textbook(p, kv_head_of=lambda hq, hkv: np.arange(hq) % hkv)


def window_off_by_one(p: AttentionProblem) -> Any:
    """``q_pos - k_pos <= window``: one key too many."""

    def visible(q_pos: np.ndarray, k_pos: np.ndarray, p: AttentionProblem) -> np.ndarray:
        keep = positions_visible(q_pos, k_pos, replace(p, window=None))
        if p.window is not None:
            keep = keep & (q_pos[:, :, None] - k_pos[:, None, :] <= p.window)
        return keep

    return textbook(p, visible=visible)


def nan_on_fully_masked_row(p: AttentionProblem) -> Any:
    """0 / 0 = NaN where a query sees no key (and its lse is NaN too)."""
    return textbook(p, guard_empty_rows=False, subtract_max=True)


def ignores_k_pos(p: AttentionProblem) -> Any:
    """Assumes slot j holds position j: empty and reordered slots are treated as real."""

    def visible(q_pos: np.ndarray, k_pos: np.ndarray, p: AttentionProblem) -> np.ndarray:
        slots = np.broadcast_to(np.arange(k_pos.shape[1]), k_pos.shape)
        return positions_visible(q_pos, slots, p)

    return textbook(p, visible=visible)


def first_row_positions(p: AttentionProblem) -> Any:
    """Uses row 0's positions for the whole batch."""

    def visible(q_pos: np.ndarray, k_pos: np.ndarray, p: AttentionProblem) -> np.ndarray:
        shared = positions_visible(q_pos[:1], k_pos[:1], p)
        return np.broadcast_to(shared, (q_pos.shape[0], *shared.shape[1:]))

    return textbook(p, visible=visible)


def softmax_without_max(p: AttentionProblem) -> Any:
    """``exp(s) / sum(exp(s))`` without subtracting the row max: overflows for large scores."""
    return textbook(p, subtract_max=False)


def softcap_after_masking(p: AttentionProblem) -> Any:
    """Masks to -inf, then soft-caps: masked keys come back at -softcap with weight e^-c."""
    return textbook(p, softcap_after_mask=True)


def alibi_on_slot_index(p: AttentionProblem) -> Any:
    """ALiBi distance from slot indices instead of positions (wrong on a cache)."""

    def distance(q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray:
        Sq, Sk = q_pos.shape[1], k_pos.shape[1]
        rows = Sk - Sq + np.arange(Sq)
        return np.broadcast_to(np.abs(rows[:, None] - np.arange(Sk)[None, :]), (1, Sq, Sk))

    return textbook(p, alibi_distance=distance)


def lse_in_base_2(p: AttentionProblem) -> Any:
    """Returns the log-sum-exp in base 2, as kernels keep it internally."""
    return textbook(p, lse_log=np.log2)


def accumulates_in_float16(p: AttentionProblem) -> Any:
    """Keeps scores, sums and products in float16 (wrong for long rows)."""
    return textbook(p, accumulate=np.float16 if p.dtype == "float16" else None)


def drops_last_partial_tile(p: AttentionProblem) -> Any:
    """Walks the keys in tiles of 64 with ``range(Sk // 64)`` once there is a full tile: the
    keys past the last full tile are never read (a kernel tested only on multiples of 64)."""

    def read(q_pos: np.ndarray, k_pos: np.ndarray, p: AttentionProblem) -> np.ndarray:
        seen = positions_visible(q_pos, k_pos, p)
        Sk = seen.shape[-1]
        return seen & (np.arange(Sk) < (Sk if Sk < 64 else Sk - Sk % 64))

    return textbook(p, visible=read)


def float16_product_then_scale(p: AttentionProblem) -> Any:
    """Multiplies q·kᵀ in float16 and scales after: the product overflows past 65504 where
    the scaled score would not (``matmul(q, k.T) * scale`` in half precision)."""
    return textbook(p, product=np.float16 if p.dtype == "float16" else None)


def rounds_scores_to_float16(p: AttentionProblem) -> Any:
    """Stores its scores in float16 but declares nothing: judged by the spec's own precision
    (float32 scores for float16 inputs), its rounding of the scores is an error."""
    return textbook(p, scores="float16")


def float16_weighted_sum(p: AttentionProblem) -> Any:
    """Scores and softmax in float32, but the weighted sum of the values accumulated in
    float16, key by key: past a couple of thousand keys each term falls below half an ulp
    of the running sum and is lost."""
    return textbook(p, sum_values_in=np.float16 if p.dtype == "float16" else None)


def guards_nan_not_inf(p: AttentionProblem) -> Any:
    """Zeroes NaN in V before the weighted sum (``nan_to_num``-style, NaN only), but an
    infinity in a slot no query sees still meets a weight of 0: ``0 * inf = NaN``."""
    return textbook(p, values=lambda v: np.where(np.isnan(v), 0.0, v))


def sink_left_out_of_denominator(p: AttentionProblem) -> Any:
    """Takes the sink logits as given but leaves them out of the softmax's denominator (and
    so out of the lse): the row's weights sum to 1 where the sink should take its share."""
    return textbook(p, sink_in_denominator=False)


def _tree_block(mask: np.ndarray) -> tuple[int, int, int]:
    """The size n of a tree mask's node block (the last n queries and key slots) and Sq,
    Sk."""
    Sq, Sk = mask.shape[-2:]
    return min(Sq, Sk), Sq, Sk


def tree_mask_transposed(p: AttentionProblem) -> Any:
    """Reads the draft tree's ancestor matrix transposed: each node sees its descendants
    instead of its ancestors (an ``[i, j]`` / ``[j, i]`` slip building the tree mask)."""

    def transposed(mask: np.ndarray) -> np.ndarray:
        n, Sq, Sk = _tree_block(mask)
        block = mask[..., Sq - n :, Sk - n :]
        mask[..., Sq - n :, Sk - n :] = np.swapaxes(block, -1, -2)
        return mask

    return textbook(p, mask=transposed)


def document_mask_leaks(p: AttentionProblem) -> Any:
    """A document mask whose lower bound is lost: each query also sees every key before the
    first one its mask keeps (the earlier documents of a packed row), as a kernel that
    bounds a document's keys by ``cu_seqlens[doc + 1]`` alone does."""

    def leaky(mask: np.ndarray) -> np.ndarray:
        first = np.argmax(mask, axis=-1)[..., None]  # (B, Hq, Sq, 1): the first key kept
        before = np.arange(mask.shape[-1]) < first
        return mask | (before & mask.any(axis=-1, keepdims=True))

    return textbook(p, mask=leaky)


def right_reach_off_by_one(p: AttentionProblem) -> Any:
    """``k_pos - q_pos < window_right``: a two-sided window one key short on the right."""

    def visible(q_pos: np.ndarray, k_pos: np.ndarray, p: AttentionProblem) -> np.ndarray:
        keep = positions_visible(q_pos, k_pos, replace(p, window_right=None))
        if p.window_right is not None:
            keep = keep & (k_pos[:, None, :] - q_pos[:, :, None] < p.window_right)
        return keep

    return textbook(p, visible=visible)


#: Each wrong kernel, with the dtypes its bug shows in.
WRONG: dict[str, tuple[Callable[[AttentionProblem], Any], tuple[str, ...]]] = {
    f.__name__: (f, dtypes)
    for f, dtypes in (
        (top_left_causal, ("float32",)),
        (causal_excludes_diagonal, ("float32",)),
        (unscaled, ("float32",)),
        (gqa_heads_interleaved, ("float32",)),
        (window_off_by_one, ("float32",)),
        (nan_on_fully_masked_row, ("float32",)),
        (ignores_k_pos, ("float32",)),
        (first_row_positions, ("float32",)),
        (softmax_without_max, ("float32",)),
        (softcap_after_masking, ("float32",)),
        (alibi_on_slot_index, ("float32",)),
        (lse_in_base_2, ("float32",)),
        (accumulates_in_float16, ("float16",)),
        (drops_last_partial_tile, ("float32",)),
        (float16_product_then_scale, ("float16",)),
        (rounds_scores_to_float16, ("float16",)),
        (float16_weighted_sum, ("float16",)),
        (guards_nan_not_inf, ("float32",)),
        (sink_left_out_of_denominator, ("float32",)),
        (tree_mask_transposed, ("float32",)),
        (document_mask_leaks, ("float32",)),
        (right_reach_off_by_one, ("float32",)),
    )
}
#: What a wrong kernel's check draws when it is not the default features: its bug is in
#: handling something kernels need not promise by default.
FEATURES: dict[str, frozenset[str]] = {
    "guards_nan_not_inf": DEFAULT_FEATURES | {"unseen_nan"},
    "sink_left_out_of_denominator": DEFAULT_FEATURES | {"sink_logits"},
    "tree_mask_transposed": DEFAULT_FEATURES | {"tree_mask"},
    "document_mask_leaks": DEFAULT_FEATURES | {"document_mask"},
    "right_reach_off_by_one": DEFAULT_FEATURES | {"two_sided_window"},
}
#: Every feature this module's correct kernels take: all but NaN planted in unseen slots.
EVERY_OPTION = frozenset(FEATURES_DRAWN) - {"unseen_nan"}
#: Correct kernels written differently from the spec.
CORRECT: dict[str, Callable[[AttentionProblem], Any]] = {
    f.__name__: f for f in (textbook, blockwise, split_kv, float16_scores)
}
