"""Kernels on the layouts kernels take, correct ones and one realistic slip each.

Each kernel here turns the problem into a layout of
:mod:`refattn.testing.layouts` (packed rows with ``cu_seqlens``, a paged
cache behind a block table, left-padded rows with an attention mask, an
in-op cache's past and new tokens), reads only what that layout gives it,
and does the textbook math (:func:`~refattn.testing.known_bugs.attention.textbook`)
on each sequence it finds there: what is tested is the layout and how the
kernel reads it. The wrong ones are the correct ones with one line changed:

``cu_seqlens_off_by_one``
    ends sequence b's keys at ``cu_seqlens_k[b + 1] - 1``, as if the end were
    inclusive: the last key of every sequence is lost.
``block_table_in_slot_order``
    reads row b's pages at blocks ``b * blocks_per_row + i``, the order they
    would have in a contiguous cache, instead of through the block table (a
    kernel only ever tested with an identity block table).
``present_without_new_tokens``
    attends over the past and the new tokens, but writes the new keys and
    values into a copy it drops: the present cache it returns is the one it
    was given.
``present_missing_last_new_token``
    writes every new token into the present but the last.

``refattn verify --candidate refattn.testing.known_bugs.layouts:<name>``
points the verifier at one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from refattn.backends import to_numpy
from refattn.testing.candidate import AttentionProblem, Result, Unsupported
from refattn.testing.drawing import DEFAULT_FEATURES
from refattn.testing.known_bugs.attention import textbook
from refattn.testing.layouts import (
    Paged,
    in_op_cache,
    left_pad,
    pack_varlen,
    page_kv,
    unpack_varlen,
)

KeyEnd = Callable[[int, int], int]
PagesOf = Callable[[np.ndarray, int, int, Paged], np.ndarray]


def _host(x: Any) -> np.ndarray:
    return np.asarray(to_numpy(x))


def _one_sequence(
    p: AttentionProblem, b: int, q: np.ndarray, k: np.ndarray, v: np.ndarray,
    q_pos: np.ndarray, k_pos: np.ndarray, q_rows: np.ndarray, k_slots: np.ndarray,
) -> AttentionProblem:  # fmt: skip
    """Row b's sequence as a problem of one row: ``q`` (Sq_b, Hq, D), ``k`` (L, Hkv, D), ``v``
    (L, Hkv, Dv) sequence-first as a layout holds them, with their positions; ``q_rows`` and
    ``k_slots`` say which of the problem's queries and key slots they are (for the mask and
    bias, which are the problem's own)."""
    B, Hq, Sq, Sk = p.q.shape[0], p.q.shape[1], p.q.shape[2], p.k.shape[2]

    def columns(x: Any) -> Any:
        if x is None:
            return None
        full = np.broadcast_to(_host(x), (B, Hq, Sq, Sk))
        return full[b : b + 1][:, :, q_rows][:, :, :, k_slots]  # (1, Hq, Sq_b, L)

    slopes = None
    if p.alibi_slopes is not None:
        slopes = _host(p.alibi_slopes).reshape(-1, Hq)
        slopes = slopes[b : b + 1] if slopes.shape[0] > 1 else slopes
    return replace(
        p, q=np.swapaxes(q, 0, 1)[None], k=np.swapaxes(k, 0, 1)[None],
        v=np.swapaxes(v, 0, 1)[None], q_pos=q_pos[None], k_pos=k_pos[None],
        mask=columns(p.mask), bias=columns(p.bias), alibi_slopes=slopes,
    )  # fmt: skip


def _answer(p: AttentionProblem, result: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """textbook's result as (out, lse or None)."""
    return (result[0], result[1]) if p.return_lse else (result, None)


# -- packed rows ------------------------------------------------------------------


def varlen_textbook(p: AttentionProblem, *, key_end: KeyEnd | None = None) -> Any:
    """Correct: the problem packed into sequences (:func:`~refattn.testing.layouts.pack_varlen`),
    each read through ``cu_seqlens_q`` / ``cu_seqlens_k`` and attended on its own; the
    output and the lse (Hq, total_q) unpacked."""
    packed = pack_varlen(p)
    cu_q, cu_k = _host(packed.cu_seqlens_q), _host(packed.cu_seqlens_k)
    q, k, v = (_host(x) for x in (packed.q, packed.k, packed.v))
    q_pos, k_pos = _host(packed.q_pos), _host(packed.k_pos)
    Hq, Dv = q.shape[1], v.shape[2]
    out = np.zeros((packed.total_q, Hq, Dv))
    lse = np.full((Hq, packed.total_q), -np.inf)
    for b in range(packed.batch):
        start, end = int(cu_k[b]), int(cu_k[b + 1])
        keys = slice(start, end if key_end is None else key_end(start, end))
        queries = slice(int(cu_q[b]), int(cu_q[b + 1]))
        one = _one_sequence(p, b, q[queries], k[keys], v[keys], q_pos[queries], k_pos[keys],
                            packed.q_index[queries] - b * packed.q_len,
                            packed.k_index[keys] - b * packed.k_len)  # fmt: skip
        out_b, lse_b = _answer(p, textbook(one))
        out[queries] = np.swapaxes(out_b[0], 0, 1)  # (Sq_b, Hq, Dv)
        if lse_b is not None:
            lse[:, queries] = lse_b[0]
    if not p.return_lse:
        return Result(unpack_varlen(packed, out), dont_care=packed.dont_care)
    full, full_lse = unpack_varlen(packed, out, lse)
    return Result(full, lse=full_lse, dont_care=packed.dont_care)


def cu_seqlens_off_by_one(p: AttentionProblem) -> Any:
    """Ends sequence b's keys at ``cu_seqlens_k[b + 1] - 1``: its last key is never read."""
    return varlen_textbook(p, key_end=lambda start, end: max(start, end - 1))


# -- a paged cache ------------------------------------------------------------------


def _table_pages(table: np.ndarray, b: int, n: int, paged: Paged) -> np.ndarray:
    return table[b, :n]


def paged_textbook(p: AttentionProblem, *, pages_of: PagesOf = _table_pages) -> Any:
    """Correct: the keys and values in a paged cache (:func:`~refattn.testing.layouts.page_kv`,
    random block order and page size, NaN in every slot no token fills), each row's first
    ``cache_seqlens[b]`` tokens read page by page through its block table."""
    paged = page_kv(p)
    k_cache, v_cache = _host(paged.k_cache), _host(paged.v_cache)  # (N, P, Hkv, D|Dv)
    table, lengths = _host(paged.block_table), _host(paged.cache_seqlens)
    logical_pos = _host(paged.k_pos)
    q, q_pos = _host(p.q), _host(p.q_pos)
    P, Sq = paged.page_size, q.shape[2]
    outs: list[np.ndarray] = []
    lses: list[np.ndarray] = []
    for b in range(q.shape[0]):
        L = int(lengths[b])
        blocks = pages_of(table, b, -(-L // P), paged)
        k = k_cache[blocks].reshape(-1, *k_cache.shape[2:])[:L]  # (L, Hkv, D)
        v = v_cache[blocks].reshape(-1, *v_cache.shape[2:])[:L]
        one = _one_sequence(p, b, np.swapaxes(q[b], 0, 1), k, v, q_pos[b], logical_pos[b, :L],
                            np.arange(Sq), paged.k_index[b, :L])  # fmt: skip
        out_b, lse_b = _answer(p, textbook(one))
        outs.append(out_b)
        if lse_b is not None:
            lses.append(lse_b)
    out = np.concatenate(outs, axis=0) if outs else np.zeros((0, *p.q.shape[1:3], p.v.shape[3]))
    if not p.return_lse:
        return out
    lse = np.concatenate(lses, axis=0) if lses else np.zeros((0, *p.q.shape[1:3]))
    return out, lse


def block_table_in_slot_order(p: AttentionProblem) -> Any:
    """Reads row b's pages at blocks ``b * blocks_per_row + i``, as if the cache were
    contiguous, not through the block table."""

    def contiguous(table: np.ndarray, b: int, n: int, paged: Paged) -> np.ndarray:
        return b * paged.blocks_per_row + np.arange(n)

    return paged_textbook(p, pages_of=contiguous)


# -- an in-op cache -------------------------------------------------------------------


def in_op_textbook(p: AttentionProblem, *, keeps_new: bool = True,
                   writes_last_new: bool = True) -> Any:  # fmt: skip
    """Correct: an in-op cache kernel. Given the past cache and the new tokens
    (:func:`~refattn.testing.layouts.in_op_cache`, the new tokens' slots holding NaN), it
    writes the new keys and values at their slots, attends over the cache it made, and
    returns it as the present."""
    split = in_op_cache(p)
    k, v = (_host(x).copy() for x in (split.k_past, split.v_past))  # (B, Hkv, Sk, D|Dv)
    k_pos = _host(split.past_pos).copy()
    k_new, v_new, new_pos = (_host(x) for x in (split.k_new, split.v_new, split.new_pos))
    for b, slots in enumerate(split.new_slots):
        k[b][:, slots] = k_new[b]
        v[b][:, slots] = v_new[b]
        k_pos[b, slots] = new_pos[b]
    answer = textbook(replace(p, k=k, v=v, k_pos=k_pos))
    out, lse = _answer(p, answer)
    present = (k, v) if keeps_new else (_host(split.k_past), _host(split.v_past))
    if not writes_last_new:
        k_written, v_written = k.copy(), v.copy()
        for b, slots in enumerate(split.new_slots):
            if slots.size:  # the last new token's slot keeps what the past held there
                k_written[b][:, slots[-1]] = _host(split.k_past)[b][:, slots[-1]]
                v_written[b][:, slots[-1]] = _host(split.v_past)[b][:, slots[-1]]
        present = (k_written, v_written)
    return Result(out, lse=lse, present=present)


def present_without_new_tokens(p: AttentionProblem) -> Any:
    """Attends over the past and the new tokens, but the new keys and values went into a copy
    it drops: the present it returns is the past it was given."""
    return in_op_textbook(p, keeps_new=False)


def present_missing_last_new_token(p: AttentionProblem) -> Any:
    """Attends over every new token but writes all of them save the last into the present
    (a write loop over ``range(n - 1)``): only a split with new tokens shows it, and a
    decode step's one new token is exactly the one lost."""
    return in_op_textbook(p, writes_last_new=False)


# -- left padding ------------------------------------------------------------------


def left_padded_textbook(p: AttentionProblem) -> Any:
    """Correct, for rows numbered from 0 with the queries at the end: the rows left-padded
    (:func:`~refattn.testing.layouts.left_pad`), keys at the ``position_ids`` the attention
    mask gives, queries at ``q_position_ids``; a query on a pad is returned as don't care.

    Raises
    ------
    Unsupported
        For rows numbered otherwise, which left padding cannot say.
    """
    try:
        padded = left_pad(p)
    except ValueError as exc:
        raise Unsupported(f"left padding: {exc}") from None
    mask = _host(padded.attention_mask)
    k_pos = np.where(mask == 1, _host(padded.position_ids), -1)  # (B, S)
    B, Hq, Sq, Sk = p.q.shape[0], p.q.shape[1], p.q.shape[2], p.k.shape[2]
    slots = np.maximum(padded.k_index, 0)[:, None, None, :]  # (B, 1, 1, S); pads read slot 0

    def columns(x: Any) -> Any:  # a pad's column is never seen: the attention mask drops it
        if x is None:
            return None
        full = np.broadcast_to(_host(x), (B, Hq, Sq, Sk))
        if Sk == 0:  # every slot a pad
            return np.zeros((B, Hq, Sq, slots.shape[-1]), dtype=full.dtype)
        return np.take_along_axis(full, np.broadcast_to(slots, (B, Hq, Sq, slots.shape[-1])), -1)

    answer = textbook(replace(
        p, k=_host(padded.k), v=_host(padded.v), k_pos=k_pos, q_pos=_host(padded.q_position_ids),
        mask=columns(p.mask), bias=columns(p.bias),
    ))  # fmt: skip
    out, lse = _answer(p, answer)
    return Result(out, lse=lse, dont_care=_host(padded.dont_care))


#: Each wrong kernel, with the dtypes its bug shows in.
WRONG: dict[str, tuple[Callable[[AttentionProblem], Any], tuple[str, ...]]] = {
    f.__name__: (f, ("float32",))
    for f in (
        cu_seqlens_off_by_one,
        block_table_in_slot_order,
        present_without_new_tokens,
        present_missing_last_new_token,
    )
}
#: What each wrong kernel's check draws: an in-op split anywhere in the row for the present.
FEATURES: dict[str, frozenset[str]] = {
    "cu_seqlens_off_by_one": DEFAULT_FEATURES,
    "block_table_in_slot_order": DEFAULT_FEATURES,
    "present_without_new_tokens": DEFAULT_FEATURES | {"in_op_cache"},
    "present_missing_last_new_token": DEFAULT_FEATURES | {"in_op_cache"},
}
#: Correct kernels on the layouts.
CORRECT: dict[str, Callable[[AttentionProblem], Any]] = {
    f.__name__: f for f in (varlen_textbook, paged_textbook, in_op_textbook, left_padded_textbook)
}
