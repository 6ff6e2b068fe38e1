r"""The layouts kernels take their inputs in, made from a problem and read back.

An :class:`~refattn.testing.AttentionProblem` is heads-first (BHSD) with a
position for every query and key slot. Kernels take the same attention in
other shapes: sequence-first (B, S, H, D); packed rows with ``cu_seqlens``
(flash-attn's ``*_varlen_*`` functions, ONNX Runtime); a paged cache with a
block table (flash-attn's ``block_table``, FlashInfer, vLLM); left-padded
rows with an attention mask and ``position_ids`` (Hugging Face
transformers); an in-op cache that appends the new tokens' keys and values
itself (``flash_attn_with_kvcache(k=, v=)``). Each function here makes one
of those from a problem, and each has its way back, so that an adapter is
the peer's call between two tested conversions.

=============================  =========================================  ======================
layout                         made by                                    read back by
=============================  =========================================  ======================
sequence-first (B, S, H, D)    :func:`sequence_first`                     :func:`heads_first`
packed rows (``cu_seqlens``)   :func:`pack_varlen`, :class:`Varlen`       :func:`unpack_varlen`,
                                                                          :func:`unpack_keys`
a paged cache (block table)    :func:`page_kv`, :class:`Paged`            :func:`read_pages`,
                                                                          :func:`unpage`
left padding, attention mask   :func:`left_pad`, :class:`LeftPadded`      :func:`from_left_padded`
an in-op cache's past and new  :func:`in_op_cache`, :class:`InOpCache`    :func:`append_new`
=============================  =========================================  ======================

What is packed, paged or padded is a row's held key slots (``k_pos >= 0``),
in slot order, each with its position; the empty slots have no place. The
queries of a problem are rectangular already; :func:`pack_varlen` may leave
some out, and :func:`left_pad` has no place for a query that sits on a pad:
each layout's ``dont_care`` (B, Sq) says which, for a candidate to return
as :attr:`refattn.testing.Result.dont_care`.

A layout function given a problem its layout cannot represent raises
ValueError saying why; an adapter turns that into
:class:`~refattn.testing.Unsupported`. :func:`bottom_right_lengths` is the
check flash-attn's layouts need: every row numbers its keys 0 .. L_b - 1
and its queries sit at the end, :math:`q^{pos}_i = L_b - S_q + i`.

The arrays are moved through their own namespace (``array_api_compat``), so
the layouts work on NumPy, PyTorch and any array API library: the data is
only gathered (``take``), never written in place. The index arrays behind
the gathers come from the positions, which are small, on the host.

>>> from refattn.testing import ProblemSpec, make_problem
>>> p = make_problem(ProblemSpec(batch=2, q_len=2, k_len=5, layout="ragged", seed=3))
>>> packed = pack_varlen(p)
>>> packed.cu_seqlens_k.tolist(), packed.total_q, packed.k.shape
([0, 3, 6], 4, (6, 1, 8))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace
from array_api_compat import device as device_of

from refattn.backends import to_numpy

__all__ = [
    "InOpCache",
    "LeftPadded",
    "Paged",
    "Varlen",
    "append_new",
    "bottom_right_lengths",
    "from_left_padded",
    "heads_first",
    "in_op_cache",
    "left_pad",
    "left_padded_mask",
    "pack_varlen",
    "page_kv",
    "read_pages",
    "sequence_first",
    "unpack_keys",
    "unpack_varlen",
    "unpage",
]

#: Page sizes :func:`page_kv` draws from when none is given.
PAGE_SIZES = (1, 2, 3, 4, 8, 16)


# -- sequence-first -----------------------------------------------------------


def sequence_first(x: Any) -> Any:
    """(B, H, S, D) -> (B, S, H, D): the layout flash-attn and transformers' inputs use.

    >>> sequence_first(np.zeros((2, 3, 5, 4))).shape
    (2, 5, 3, 4)
    """
    return _swap_heads_and_sequence("x", x)


def heads_first(x: Any) -> Any:
    """(B, S, H, D) -> (B, H, S, D): refattn's layout, the inverse of :func:`sequence_first`.

    >>> heads_first(np.zeros((2, 5, 3, 4))).shape
    (2, 3, 5, 4)
    """
    return _swap_heads_and_sequence("x", x)


def _swap_heads_and_sequence(name: str, x: Any) -> Any:
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"{name} must have 4 dims, (B, H, S, D) or (B, S, H, D); got shape "
                         f"{getattr(x, 'shape', None)}")  # fmt: skip
    return array_namespace(x).permute_dims(x, (0, 2, 1, 3))


# -- alignment ------------------------------------------------------------------


def bottom_right_lengths(problem: Any, *, leading: bool = True) -> np.ndarray:
    """(B,) int64 lengths :math:`L_b` where every row is as flash-attn's layouts number it.

    Row b's held key slots hold positions 0 .. L_b - 1 in slot order, in its
    first L_b slots (``leading``, the ``cache_seqlens`` layout: the slots
    after them are empty) or anywhere (packed rows and pages, which drop the
    empty slots), and its queries sit at the end, :math:`q^{pos}_i = L_b - S_q + i`.

    Raises
    ------
    ValueError
        Naming the first row that is not so, and how.

    >>> from refattn.testing import ProblemSpec, make_problem
    >>> p = make_problem(ProblemSpec(batch=2, q_len=1, k_len=4, layout="left_padded", seed=1))
    >>> bottom_right_lengths(p, leading=False).tolist()
    [3, 1]
    >>> bottom_right_lengths(p)
    Traceback (most recent call last):
    ...
    ValueError: row 0's keys must fill its first 3 slots (the slots after them empty); got k_pos [-1, 0, 1, 2]
    """  # noqa: E501
    q_pos, k_pos = _positions(problem)
    Sq = q_pos.shape[1]
    lengths = (k_pos >= 0).sum(axis=1)  # (B,)
    for b, L in enumerate(lengths.tolist()):
        held = k_pos[b][k_pos[b] >= 0]
        if leading and not bool((k_pos[b, :L] >= 0).all()):
            raise ValueError(f"row {b}'s keys must fill its first {L} slots (the slots after "
                             f"them empty); got k_pos {_shown(k_pos[b])}")  # fmt: skip
        if not np.array_equal(held, np.arange(L)):
            raise ValueError(f"row {b}'s keys must be positions 0..{L - 1} in slot order; "
                             f"got {_shown(held)}")  # fmt: skip
        if not np.array_equal(q_pos[b], L - Sq + np.arange(Sq)):
            raise ValueError(f"row {b}'s queries must sit at the end of its {L} keys, at "
                             f"{_shown(np.arange(L - Sq, L))}; got {_shown(q_pos[b])}")  # fmt: skip
    return lengths.astype(np.int64)


# -- packed rows ------------------------------------------------------------------


@dataclass(frozen=True)
class Varlen:
    """A batch packed into one sequence of tokens: what ``flash_attn_varlen_func`` takes.

    Sequence b's queries are ``q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]]``, its
    keys and values ``k[cu_seqlens_k[b]:cu_seqlens_k[b + 1]]``, each with its
    position.
    """

    q: Any  #: (total_q, Hq, D)
    k: Any  #: (total_k, Hkv, D)
    v: Any  #: (total_k, Hkv, Dv)
    q_pos: Any  #: (total_q,) int64
    k_pos: Any  #: (total_k,) int64
    cu_seqlens_q: Any  #: (B + 1,) int32, a prefix sum of the rows' query counts from 0
    cu_seqlens_k: Any  #: (B + 1,) int32, a prefix sum of the rows' held key slots from 0
    max_seqlen_q: int
    max_seqlen_k: int
    q_index: np.ndarray  #: (total_q,) int64: ``b * Sq + i``, the query each packed one was
    k_index: np.ndarray  #: (total_k,) int64: ``b * Sk + j``, the key slot each packed one was
    dont_care: Any  #: (B, Sq) bool: the queries left out, whose output has no place
    batch: int
    q_len: int  #: Sq of the problem
    k_len: int  #: Sk of the problem

    @property
    def total_q(self) -> int:
        return int(self.q_index.shape[0])

    @property
    def total_k(self) -> int:
        return int(self.k_index.shape[0])


def pack_varlen(problem: Any, queries: Any = None) -> Varlen:
    """The problem's rows packed one after another, as ``cu_seqlens`` describe them.

    Every held key slot (``k_pos >= 0``) is packed, in slot order, with its
    position; the empty ones are dropped. Every query is packed, or those
    ``queries`` (B, Sq) booleans select; the others are the layout's
    ``dont_care``.

    Parameters
    ----------
    problem : anything with ``q`` (B, Hq, Sq, D), ``k`` (B, Hkv, Sk, D),
        ``v`` (B, Hkv, Sk, Dv), ``q_pos`` (B, Sq), ``k_pos`` (B, Sk): an
        :class:`~refattn.testing.AttentionProblem`
    queries : (B, Sq) booleans, optional; True packs a query

    >>> from refattn.testing import ProblemSpec, make_problem
    >>> p = make_problem(ProblemSpec(batch=2, q_len=3, k_len=4, layout="holes", seed=0))
    >>> chosen = np.array([[True, False, True], [True, True, True]])
    >>> packed = pack_varlen(p, queries=chosen)
    >>> packed.cu_seqlens_q.tolist(), packed.dont_care.tolist()
    ([0, 2, 5], [[False, True, False], [False, False, False]])
    """
    q, k, v = _checked_arrays(problem)
    xp = array_namespace(q, k, v)
    q_pos, k_pos = _positions(problem)
    B, _, Sq, _ = q.shape
    Sk = k.shape[2]
    if queries is None:
        chosen = np.ones((B, Sq), dtype=bool)
    else:
        chosen = np.asarray(to_numpy(queries))
        if chosen.dtype != np.bool_ or chosen.shape != (B, Sq):
            raise ValueError(f"queries must be booleans of shape ({B}, {Sq}) (B, Sq); got "
                             f"{chosen.dtype} {chosen.shape}")  # fmt: skip
    held = k_pos >= 0  # (B, Sk)
    q_index = np.flatnonzero(chosen).astype(np.int64)  # row-major: row by row, in slot order
    k_index = np.flatnonzero(held).astype(np.int64)
    q_counts, k_counts = chosen.sum(axis=1), held.sum(axis=1)  # (B,)
    dev = device_of(q)
    return Varlen(
        q=_take_rows(xp, _rows_of(xp, q), q_index),
        k=_take_rows(xp, _rows_of(xp, k), k_index),
        v=_take_rows(xp, _rows_of(xp, v), k_index),
        q_pos=_on(xp, q_pos.reshape(-1)[q_index], dev),
        k_pos=_on(xp, k_pos.reshape(-1)[k_index], dev),
        cu_seqlens_q=_on(xp, _prefix_sum(q_counts), dev),
        cu_seqlens_k=_on(xp, _prefix_sum(k_counts), dev),
        max_seqlen_q=int(q_counts.max(initial=0)),
        max_seqlen_k=int(k_counts.max(initial=0)),
        q_index=q_index,
        k_index=k_index,
        dont_care=_on(xp, ~chosen, dev),
        batch=B,
        q_len=Sq,
        k_len=Sk,
    )


def unpack_varlen(packed: Varlen, out: Any, lse: Any = None) -> Any:
    r"""A packed output (total_q, Hq, Dv) back to (B, Hq, Sq, Dv); with ``lse``, the pair.

    ``lse`` is (Hq, total_q), the layout flash-attn 2's varlen functions return
    it in (``lse.T`` of a (total_q, Hq) one). Queries left out of the packing
    come back as 0 and :math:`-\infty`: they are ``packed.dont_care``.

    >>> from refattn.testing import ProblemSpec, make_problem
    >>> p = make_problem(ProblemSpec(batch=2, q_len=3, k_len=4, layout="ragged"))
    >>> packed = pack_varlen(p)
    >>> bool((unpack_varlen(packed, packed.q) == p.q).all())
    True
    """
    xp = array_namespace(out)
    total = packed.total_q
    if out.ndim != 3 or out.shape[0] != total:
        raise ValueError(f"out must be (total_q={total}, H, Dv); got shape {out.shape}")
    B, Sq = packed.batch, packed.q_len
    source = np.full(B * Sq, -1, dtype=np.int64)
    source[packed.q_index] = np.arange(total)
    rows = _take_rows(xp, out, source, fill=0.0)  # (B * Sq, Hq, Dv)
    unpacked = xp.permute_dims(xp.reshape(rows, (B, Sq, *out.shape[1:])), (0, 2, 1, 3))
    if lse is None:
        return unpacked
    if lse.ndim != 2 or lse.shape != (out.shape[1], total):
        raise ValueError(f"lse must be (Hq={out.shape[1]}, total_q={total}), flash-attn's varlen "
                         f"layout; got shape {lse.shape}")  # fmt: skip
    lse_rows = _take_rows(xp, xp.permute_dims(lse, (1, 0)), source, fill=-math.inf)  # (B*Sq, Hq)
    return unpacked, xp.permute_dims(xp.reshape(lse_rows, (B, Sq, lse.shape[0])), (0, 2, 1))


def unpack_keys(packed: Varlen) -> tuple[Any, Any, Any]:
    """The packed keys back in the problem's slots: ``(k, v, k_pos)``, (B, Hkv, Sk, D),
    (B, Hkv, Sk, Dv) and (B, Sk); the slots nothing was packed from are 0 with ``k_pos = -1``.

    >>> from refattn.testing import ProblemSpec, make_problem
    >>> p = make_problem(ProblemSpec(batch=2, q_len=3, k_len=4, layout="holes"))
    >>> k, v, k_pos = unpack_keys(pack_varlen(p))
    >>> bool((k_pos == p.k_pos).all())
    True
    """
    xp = array_namespace(packed.k)
    B, Sk = packed.batch, packed.k_len
    source = np.full(B * Sk, -1, dtype=np.int64)
    source[packed.k_index] = np.arange(packed.total_k)
    k, v = (xp.permute_dims(xp.reshape(_take_rows(xp, x, source, fill=0.0),
                                       (B, Sk, *x.shape[1:])), (0, 2, 1, 3))
            for x in (packed.k, packed.v))  # fmt: skip
    k_pos = _gather_positions(_host(packed.k_pos)[None], source[None])
    return k, v, _on(xp, k_pos.reshape(B, Sk), device_of(packed.k))


# -- a paged cache ------------------------------------------------------------------


@dataclass(frozen=True)
class Paged:
    """Each row's held keys and values in pages of a shared pool, found through a block table.

    Logical token t of row b (its t-th held slot, in slot order) lives in block
    ``block_table[b, t // page_size]`` at offset ``t % page_size``; a row holds
    ``cache_seqlens[b]`` tokens. The blocks are in a random order, the table
    of every row has ``blocks_per_row`` entries (the ones past its tokens point
    at blocks it never fills), and the pool has spare blocks no row uses; every
    slot no token fills holds ``fill`` (NaN: a kernel that reads one shows it).
    """

    k_cache: Any  #: (num_blocks, page_size, Hkv, D), flash-attn's paged ``k_cache``
    v_cache: Any  #: (num_blocks, page_size, Hkv, Dv)
    block_table: Any  #: (B, blocks_per_row) int32
    cache_seqlens: Any  #: (B,) int32
    k_pos: Any  #: (B, blocks_per_row * page_size) int64: logical token t's position, -1 past
    k_index: np.ndarray  #: (B, blocks_per_row * page_size) int64: its slot in the row, -1 past
    page_size: int
    k_len: int  #: Sk of the problem

    @property
    def blocks_per_row(self) -> int:
        return int(self.block_table.shape[1])

    @property
    def num_blocks(self) -> int:
        return int(self.k_cache.shape[0])


def page_kv(
    problem: Any, *, page_size: int | None = None, seed: int | None = None,
    spare_blocks: int | None = None, fill: float = math.nan,
) -> Paged:  # fmt: skip
    """The problem's keys and values in a paged cache with a random block order.

    Parameters
    ----------
    problem : anything with ``k``, ``v`` (B, Hkv, Sk, D|Dv) and ``k_pos`` (B, Sk)
    page_size : tokens per block; drawn from :data:`PAGE_SIZES` when None
    seed : the block order (and the page size and spare blocks when drawn);
        by default the problem's ``spec.seed``, else 0
    spare_blocks : blocks in the pool that no row's table names; 0 to 2 when None
    fill : what every slot no token fills holds

    >>> from refattn.testing import ProblemSpec, make_problem
    >>> p = make_problem(ProblemSpec(batch=2, q_len=1, k_len=5, layout="ragged", seed=0))
    >>> paged = page_kv(p, page_size=2, seed=0, spare_blocks=1)
    >>> paged.cache_seqlens.tolist(), paged.block_table.shape, paged.num_blocks
    ([5, 4], (2, 3), 7)
    >>> k, v = read_pages(paged)
    >>> bool((k[0, :, :5] == p.k[0]).all())
    True
    """
    k, v = problem.k, problem.v
    _check_kv(k, v)
    xp = array_namespace(k, v)
    k_pos = _host(problem.k_pos)
    B, _, Sk, _ = k.shape
    _check_shape("k_pos", k_pos, (B, Sk))
    if seed is None:
        spec = getattr(problem, "spec", None)
        seed = int(getattr(spec, "seed", 0))
    rng = np.random.default_rng(seed)
    if page_size is None:
        page_size = int(rng.choice(PAGE_SIZES))
    if isinstance(page_size, bool) or not isinstance(page_size, int | np.integer) or page_size < 1:
        raise ValueError(f"page_size must be a positive integer; got {page_size!r}")
    if spare_blocks is None:
        spare_blocks = int(rng.integers(0, 3))
    if spare_blocks < 0:
        raise ValueError(f"spare_blocks must be at least 0; got {spare_blocks}")
    held = k_pos >= 0
    lengths = held.sum(axis=1)  # (B,)
    P = int(page_size)
    per_row = max(1, -(-int(lengths.max(initial=0)) // P))
    num_blocks = B * per_row + spare_blocks
    order = rng.permutation(num_blocks)
    block_table = order[: B * per_row].reshape(B, per_row)  # (B, per_row)
    logical = per_row * P
    k_index = np.full((B, logical), -1, dtype=np.int64)  # slot of logical token t in row b
    for b in range(B):
        slots = np.flatnonzero(held[b])
        k_index[b, : slots.size] = slots
    # Where each pool slot's token comes from: b * Sk + slot, or -1 (fill).
    source = np.full(num_blocks * P, -1, dtype=np.int64)
    t = np.arange(logical)
    for b in range(B):
        pool_slot = block_table[b, t // P] * P + t % P  # (logical,)
        source[pool_slot] = np.where(k_index[b] >= 0, b * Sk + k_index[b], -1)
    k_pages, v_pages = (
        xp.reshape(_take_rows(xp, _rows_of(xp, x), source, fill=fill),
                   (num_blocks, P, *x.shape[1:2], x.shape[3]))
        for x in (k, v)
    )  # fmt: skip
    positions = _gather_positions(k_pos, k_index)  # (B, logical)
    dev = device_of(k)
    return Paged(
        k_cache=k_pages, v_cache=v_pages,
        block_table=_on(xp, block_table.astype(np.int32), dev),
        cache_seqlens=_on(xp, lengths.astype(np.int32), dev),
        k_pos=_on(xp, positions, dev), k_index=k_index, page_size=P, k_len=Sk,
    )  # fmt: skip


def read_pages(paged: Paged) -> tuple[Any, Any]:
    """Every row's pages read in block-table order: ``(k, v)``, (B, Hkv, blocks_per_row *
    page_size, D|Dv), logical token t of row b at ``[b, :, t]`` (the slots past
    ``cache_seqlens[b]`` hold what the pool holds there)."""
    xp = array_namespace(paged.k_cache)
    table = _host(paged.block_table)  # (B, per_row)
    B, per_row = table.shape
    P = paged.page_size
    t = np.arange(per_row * P)
    source = (table[:, t // P] * P + t % P).reshape(-1)  # (B * logical,)
    return tuple(
        xp.permute_dims(xp.reshape(_take_rows(xp, _pool_rows(xp, pages), source),
                                   (B, per_row * P, *pages.shape[2:])), (0, 2, 1, 3))
        for pages in (paged.k_cache, paged.v_cache)
    )  # fmt: skip


def unpage(paged: Paged) -> tuple[Any, Any, Any]:
    """The paged keys back in the problem's slots: ``(k, v, k_pos)`` as :func:`unpack_keys`
    gives them (slots no token came from are 0, ``k_pos = -1``)."""
    xp = array_namespace(paged.k_cache)
    table = _host(paged.block_table)
    B = table.shape[0]
    P, Sk = paged.page_size, paged.k_len
    source = np.full((B, Sk), -1, dtype=np.int64)  # pool slot of each problem slot
    positions = np.full((B, Sk), -1, dtype=np.int64)
    logical_pos = _host(paged.k_pos)
    for b in range(B):
        t = np.flatnonzero(paged.k_index[b] >= 0)
        source[b, paged.k_index[b, t]] = table[b, t // P] * P + t % P
        positions[b, paged.k_index[b, t]] = logical_pos[b, t]
    k, v = (xp.permute_dims(xp.reshape(_take_rows(xp, _pool_rows(xp, pages), source.reshape(-1),
                                                  fill=0.0), (B, Sk, *pages.shape[2:])),
                            (0, 2, 1, 3))
            for pages in (paged.k_cache, paged.v_cache))  # fmt: skip
    return k, v, _on(xp, positions, device_of(paged.k_cache))


# -- left padding -------------------------------------------------------------------


@dataclass(frozen=True)
class LeftPadded:
    """Rows padded on the left to one length S, as transformers batches prompts.

    Row b's L_b keys sit in its last L_b slots; ``attention_mask`` is 1 on
    them and 0 on the pads before; ``position_ids`` is
    ``cumsum(attention_mask) - 1`` with the pads set to 1 (what ``generate``
    computes). Query i sits on slot ``cache_position[i] = S - Sq + i`` in
    every row; a query on a pad of its row (one with ``q_pos < 0``) has no
    place, and is ``dont_care``.
    """

    k: Any  #: (B, Hkv, S, D)
    v: Any  #: (B, Hkv, S, Dv)
    attention_mask: Any  #: (B, S) int64, 1 on a token, 0 on a pad
    position_ids: Any  #: (B, S) int64
    cache_position: Any  #: (Sq,) int64: the slot each query sits on
    q_position_ids: Any  #: (B, Sq) int64: ``position_ids`` at the queries' slots
    dont_care: Any  #: (B, Sq) bool: queries on a pad
    k_index: np.ndarray  #: (B, S) int64: the problem's slot each slot came from, -1 for a pad


def left_pad(problem: Any, *, fill: float = 0.0) -> LeftPadded:
    """The problem's rows left-padded, with the attention mask and positions transformers
    builds; the pads hold ``fill``.

    The rows must be numbered as :func:`bottom_right_lengths` says (keys 0 ..
    L_b - 1 in their held slots, queries at the end); S is the longest row,
    or Sq if that is longer.

    Raises
    ------
    ValueError
        For rows numbered otherwise (from :func:`bottom_right_lengths`).

    >>> from refattn.testing import ProblemSpec, make_problem
    >>> p = make_problem(ProblemSpec(batch=2, q_len=2, k_len=4, layout="ragged", seed=2))
    >>> p.k_pos.tolist(), p.q_pos.tolist()
    ([[0, -1, -1, -1], [0, 1, -1, -1]], [[-1, 0], [0, 1]])
    >>> padded = left_pad(p)
    >>> padded.attention_mask.tolist(), padded.position_ids.tolist()
    ([[0, 1], [1, 1]], [[1, 0], [0, 1]])
    >>> padded.cache_position.tolist(), padded.dont_care.tolist()
    ([0, 1], [[True, False], [False, False]])
    """
    lengths = bottom_right_lengths(problem, leading=False)
    k, v = problem.k, problem.v
    _check_kv(k, v)
    xp = array_namespace(k, v)
    k_pos = _host(problem.k_pos)
    B, _, Sk, _ = k.shape
    Sq = int(problem.q.shape[2])
    S = max(int(lengths.max(initial=0)), Sq)
    k_index = np.full((B, S), -1, dtype=np.int64)
    for b in range(B):
        slots = np.flatnonzero(k_pos[b] >= 0)
        k_index[b, S - slots.size :] = slots
    attention_mask = (k_index >= 0).astype(np.int64)
    position_ids = np.where(attention_mask == 1, np.cumsum(attention_mask, axis=1) - 1, 1)
    cache_position = S - Sq + np.arange(Sq, dtype=np.int64)
    source = np.where(k_index >= 0, np.arange(B)[:, None] * Sk + k_index, -1).reshape(-1)
    k_out, v_out = (xp.permute_dims(xp.reshape(_take_rows(xp, _rows_of(xp, x), source, fill=fill),
                                               (B, S, x.shape[1], x.shape[3])), (0, 2, 1, 3))
                    for x in (k, v))  # fmt: skip
    dev = device_of(k)
    return LeftPadded(
        k=k_out, v=v_out,
        attention_mask=_on(xp, attention_mask, dev),
        position_ids=_on(xp, position_ids, dev),
        cache_position=_on(xp, cache_position, dev),
        q_position_ids=_on(xp, position_ids[:, S - Sq :], dev),
        dont_care=_on(xp, attention_mask[:, S - Sq :] == 0, dev),
        k_index=k_index,
    )  # fmt: skip


def left_padded_mask(padded: LeftPadded, *, causal: bool) -> Any:
    """(B, 1, Sq, S) booleans, True keeps: the padding mask, and with ``causal`` the causal
    one in slots (key slot j seen by query i iff ``j <= cache_position[i]``), as
    transformers combines them."""
    xp = array_namespace(padded.attention_mask)
    keep = padded.attention_mask[:, None, None, :] == 1  # (B, 1, 1, S)
    S = padded.attention_mask.shape[1]
    if causal:
        slots = xp.arange(S, device=device_of(padded.attention_mask))
        keep = keep & (slots[None, None, None, :] <= padded.cache_position[None, None, :, None])
    Sq = padded.cache_position.shape[0]
    return xp.broadcast_to(keep, (keep.shape[0], 1, Sq, S))


def from_left_padded(padded: LeftPadded) -> tuple[Any, Any, Any, Any]:
    """The padded rows as refattn takes them: ``(k, v, k_pos, q_pos)``, (B, Hkv, S, D),
    (B, Hkv, S, Dv), (B, S) with ``-1`` on the pads, and (B, Sq), query i of row b at
    ``cache_position[i] - (S - L_b)``. Attention over these is the problem's, but for
    the ``dont_care`` queries."""
    xp = array_namespace(padded.attention_mask)
    mask = padded.attention_mask
    k_pos = xp.where(mask == 1, padded.position_ids, xp.full_like(padded.position_ids, -1))
    pads = mask.shape[1] - xp.sum(mask, axis=1)  # (B,)
    q_pos = padded.cache_position[None, :] - pads[:, None]  # (B, Sq)
    return padded.k, padded.v, k_pos, q_pos


# -- an in-op cache -------------------------------------------------------------------


@dataclass(frozen=True)
class InOpCache:
    """A problem split as an in-op cache kernel takes it: the cache before the call, and the
    new tokens' keys and values it must write into it and attend over.

    The new tokens are the last ``n`` held slots of each row
    (``problem.new_keys``); the past cache is the problem's keys and values
    with those slots emptied (holding ``fill``, with ``past_pos = -1``; the
    problem's empty slots keep what they hold). Writing the new
    keys at ``new_slots`` (:func:`append_new`) makes the present: the
    problem's ``k`` and ``v`` in every held slot, which the verifier checks.
    """

    k_past: Any  #: (B, Hkv, Sk, D): the cache before the call
    v_past: Any  #: (B, Hkv, Sk, Dv)
    past_pos: Any  #: (B, Sk) int64, -1 for the empty slots and the new tokens' slots
    past_lengths: Any  #: (B,) int64: held slots before the call (``cache_seqlens``)
    k_new: Any  #: (B, Hkv, n, D)
    v_new: Any  #: (B, Hkv, n, Dv)
    new_pos: Any  #: (B, n) int64
    new_slots: np.ndarray  #: (B, n) int64: the slot each new token is written to


def in_op_cache(problem: Any, n: int | None = None, *, fill: float = math.nan) -> InOpCache:
    """The problem as an in-op cache's past and new tokens: the last ``n`` held slots of each
    row are new (``problem.new_keys`` by default).

    Raises
    ------
    ValueError
        When a row holds fewer than ``n`` keys.

    >>> from refattn.testing import ProblemSpec, make_problem
    >>> p = make_problem(ProblemSpec(batch=2, q_len=2, k_len=4, layout="ragged", seed=0))
    >>> p.k_pos.tolist()
    [[0, 1, -1, -1], [0, 1, 2, 3]]
    >>> split = in_op_cache(p)
    >>> split.past_lengths.tolist(), split.new_slots.tolist(), split.new_pos.tolist()
    ([0, 2], [[0, 1], [2, 3]], [[0, 1], [2, 3]])
    >>> k, v, k_pos = append_new(split)
    >>> bool((k[:, :, :2] == p.k[:, :, :2]).all()), bool((k_pos == p.k_pos).all())
    (True, True)
    """
    k, v = problem.k, problem.v
    _check_kv(k, v)
    xp = array_namespace(k, v)
    k_pos = _host(problem.k_pos)
    B, _, Sk, _ = k.shape
    _check_shape("k_pos", k_pos, (B, Sk))
    n = int(getattr(problem, "new_keys", 0)) if n is None else n
    held = k_pos >= 0
    if isinstance(n, bool) or n < 0 or (B and n > int(held.sum(axis=1).min())):
        raise ValueError(f"n (the new tokens per row) must be from 0 to the fewest keys a row "
                         f"holds, {int(held.sum(axis=1).min()) if B else 0}; got {n}")  # fmt: skip
    new_slots = np.stack([np.flatnonzero(held[b])[held[b].sum() - n :] for b in range(B)])
    new_slots = new_slots.reshape(B, n).astype(np.int64)
    past_pos = k_pos.copy()
    np.put_along_axis(past_pos, new_slots, -1, axis=1)
    past_source = np.arange(B)[:, None] * Sk + np.arange(Sk)  # the problem's own slots...
    np.put_along_axis(past_source, new_slots, -1, axis=1)  # ...but the new tokens' hold fill
    new_source = (np.arange(B)[:, None] * Sk + new_slots).reshape(-1)
    dev = device_of(k)

    def gathered(x: Any, source: np.ndarray, length: int, value: float) -> Any:
        rows = _take_rows(xp, _rows_of(xp, x), source.reshape(-1), fill=value)
        return xp.permute_dims(xp.reshape(rows, (B, length, x.shape[1], x.shape[3])), (0, 2, 1, 3))

    return InOpCache(
        k_past=gathered(k, past_source, Sk, fill), v_past=gathered(v, past_source, Sk, fill),
        past_pos=_on(xp, past_pos, dev),
        past_lengths=_on(xp, (past_pos >= 0).sum(axis=1).astype(np.int64), dev),
        k_new=gathered(k, new_source, n, fill), v_new=gathered(v, new_source, n, fill),
        new_pos=_on(xp, np.take_along_axis(k_pos, new_slots, axis=1), dev),
        new_slots=new_slots,
    )  # fmt: skip


def trailing_new_tokens(problem: Any) -> int:
    """The new tokens per row of the problem's in-op split (``problem.new_keys``), where every
    row's are its last slots: the split an operator that appends the new tokens after the
    whole past (one past length for every row) can take.

    Raises
    ------
    ValueError
        Naming the first row whose new tokens are not its last slots.

    >>> from refattn.testing import ProblemSpec, make_problem
    >>> trailing_new_tokens(make_problem(ProblemSpec(q_len=2, k_len=5, new_keys=2)))
    2
    >>> p = make_problem(ProblemSpec(batch=2, q_len=1, k_len=4, layout="ragged", seed=0,
    ...                              new_keys=1))
    >>> p.k_pos.tolist()
    [[0, 1, -1, -1], [0, 1, 2, 3]]
    >>> trailing_new_tokens(p)
    Traceback (most recent call last):
    ...
    ValueError: row 0's 1 new tokens must be its last slots [3]; they are in slots [1]
    """
    split = in_op_cache(problem)
    n = split.new_slots.shape[1]
    Sk = problem.k.shape[2]
    last = np.arange(Sk - n, Sk)
    for b, slots in enumerate(split.new_slots):
        if not np.array_equal(slots, last):
            raise ValueError(f"row {b}'s {n} new tokens must be its last slots "
                             f"{last.tolist()}; they are in slots {slots.tolist()}")  # fmt: skip
    return n


def append_new(split: InOpCache) -> tuple[Any, Any, Any]:
    """The present an in-op cache must make: ``(k, v, k_pos)``, the past with the new tokens
    written at ``new_slots``, (B, Hkv, Sk, D), (B, Hkv, Sk, Dv) and (B, Sk)."""
    xp = array_namespace(split.k_past)
    B, _, Sk, _ = split.k_past.shape
    n = split.new_slots.shape[1]
    # Slot j of row b comes from the past (b * Sk + j) or from new token t (B * Sk + b * n + t).
    source = np.arange(B)[:, None] * Sk + np.arange(Sk)[None, :]  # (B, Sk)
    rows_b = np.repeat(np.arange(B), n)
    source[rows_b, split.new_slots.reshape(-1)] = B * Sk + np.arange(B * n)
    present = []
    for past, new in ((split.k_past, split.k_new), (split.v_past, split.v_new)):
        rows = xp.concat([_rows_of(xp, past), _rows_of(xp, new)], axis=0)
        taken = _take_rows(xp, rows, source.reshape(-1))  # (B * Sk, H, D)
        present.append(xp.permute_dims(xp.reshape(taken, (B, Sk, *rows.shape[1:])), (0, 2, 1, 3)))
    k_pos = _host(split.past_pos).copy()
    np.put_along_axis(k_pos, split.new_slots, _host(split.new_pos), axis=1)
    return present[0], present[1], _on(xp, k_pos, device_of(split.k_past))


# -- the gathers ------------------------------------------------------------------


def _rows_of(xp: Any, x: Any) -> Any:
    """(B, H, S, D) -> (B * S, H, D): one row per (batch row, slot)."""
    B, H, S, D = x.shape
    return xp.reshape(xp.permute_dims(x, (0, 2, 1, 3)), (B * S, H, D))


def _pool_rows(xp: Any, pages: Any) -> Any:
    """(num_blocks, P, H, D) -> (num_blocks * P, H, D)."""
    return xp.reshape(pages, (pages.shape[0] * pages.shape[1], *pages.shape[2:]))


def _take_rows(xp: Any, rows: Any, source: np.ndarray, fill: float = 0.0) -> Any:
    """``rows[source]`` along axis 0, with ``fill`` where ``source`` is -1 (one row of fill is
    appended to take from, so even an empty ``rows`` can be filled)."""
    dev = device_of(rows)
    filler = xp.full((1, *rows.shape[1:]), fill, dtype=rows.dtype, device=dev)
    padded = xp.concat([rows, filler], axis=0)
    index = np.where(source < 0, rows.shape[0], source).astype(np.int64)
    return xp.take(padded, _on(xp, index, dev), axis=0)


def _on(xp: Any, x: np.ndarray, device: Any) -> Any:
    """A host index or mask array in the namespace and on the device of the layout."""
    return xp.asarray(np.ascontiguousarray(x), device=device)


def _host(x: Any) -> np.ndarray:
    return np.asarray(to_numpy(x)).astype(np.int64)


def _gather_positions(k_pos: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``k_pos[b, index[b, t]]``, or -1 where the index is -1 (``k_pos`` may have no slots)."""
    padded = np.concatenate([k_pos, np.full((k_pos.shape[0], 1), -1, dtype=np.int64)], axis=1)
    return np.take_along_axis(padded, np.where(index < 0, k_pos.shape[1], index), axis=1)


def _shown(x: np.ndarray, most: int = 8) -> str:
    """A row of positions for a message: all of a short one, the ends of a long one."""
    values = x.tolist()
    if len(values) <= most:
        return str(values)
    half = most // 2
    return f"[{', '.join(map(str, values[:half]))}, ..., {', '.join(map(str, values[-half:]))}]"


def _prefix_sum(counts: np.ndarray) -> np.ndarray:
    """(B + 1,) int32: 0, then the running sum of ``counts``."""
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)


def _positions(problem: Any) -> tuple[np.ndarray, np.ndarray]:
    """The problem's ``q_pos`` (B, Sq) and ``k_pos`` (B, Sk) on the host, checked."""
    q_pos, k_pos = _host(problem.q_pos), _host(problem.k_pos)
    if q_pos.ndim != 2 or k_pos.ndim != 2 or q_pos.shape[0] != k_pos.shape[0]:
        raise ValueError(f"q_pos and k_pos must be (B, Sq) and (B, Sk); got {q_pos.shape} and "
                         f"{k_pos.shape}")  # fmt: skip
    return q_pos, k_pos


def _checked_arrays(problem: Any) -> tuple[Any, Any, Any]:
    q, k, v = problem.q, problem.k, problem.v
    if getattr(q, "ndim", None) != 4:
        raise ValueError(f"q must be (B, Hq, Sq, D); got shape {getattr(q, 'shape', None)}")
    _check_kv(k, v)
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k must be (B={q.shape[0]}, Hkv, Sk, D={q.shape[3]}); got {k.shape}")
    B, _, Sq, _ = q.shape
    _check_shape("q_pos", _host(problem.q_pos), (B, Sq))
    _check_shape("k_pos", _host(problem.k_pos), (B, k.shape[2]))
    return q, k, v


def _check_kv(k: Any, v: Any) -> None:
    if getattr(k, "ndim", None) != 4 or getattr(v, "ndim", None) != 4:
        shapes = (getattr(k, "shape", None), getattr(v, "shape", None))
        raise ValueError(f"k and v must be (B, Hkv, Sk, D) and (B, Hkv, Sk, Dv); got shapes "
                         f"{shapes[0]} and {shapes[1]}")  # fmt: skip
    if tuple(k.shape[:3]) != tuple(v.shape[:3]):
        raise ValueError(f"v must be (B, Hkv, Sk) = {tuple(k.shape[:3])} in its first dims, as k; "
                         f"got {tuple(v.shape)}")  # fmt: skip


def _check_shape(name: str, x: np.ndarray, shape: tuple[int, ...]) -> None:
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {shape}; got {x.shape}")
