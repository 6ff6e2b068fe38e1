r"""FlashInfer's attention kernels as candidates (CUDA, float16 and bfloat16).

FlashInfer (``flashinfer-python``, imported as ``flashinfer``) serves attention
over KV caches: a single request's decode and prefill
(``single_decode_with_kv_cache``, ``single_prefill_with_kv_cache``) and a
batch of requests over a paged cache, planned once and run
(``BatchDecodeWithPagedKVCacheWrapper``, ``BatchPrefillWithPagedKVCacheWrapper``).
Each adapter here says a refattn problem in those terms:

==========================  ===================================================================
refattn                     FlashInfer
==========================  ===================================================================
row b of the batch          one request (``single_*``: one call per row; ``Batch*``: one
                            entry of ``indptr``); a decode request per query
q (B, Hq, Sq, D)            ``q`` (qo_len, num_qo_heads, head_dim), the ``NHD`` layout
                            (:func:`~refattn.testing.layouts.sequence_first`); decode: (Hq, D)
                            per request
k, v: row b's held slots    ``k``, ``v`` (kv_len, num_kv_heads, head_dim) in slot order
                            (:func:`~refattn.testing.layouts.pack_varlen`), or pages of a
                            ``(k_pages, v_pages)`` pool, ``(num_pages, page_size, Hkv, D)``
                            (:func:`~refattn.testing.layouts.page_kv`, page size 1, 4 or 16
                            by the problem's seed, :func:`page_size_of`), read through
                            ``indptr``, ``indices`` and ``last_page_len``
                            (:func:`paged_kv_indices`)
positions                   none: request b's keys are 0 .. L_b - 1, its queries end at
                            L_b - 1, :math:`q^{pos}_i = L_b - S_q + i`
                            (:func:`~refattn.testing.layouts.bottom_right_lengths`)
``causal``                  ``causal=True``, bottom-right aligned (key j is masked when
                            ``j + qo_len > kv_len + i``); a decode query sits after every
                            key it is given, so decode has no flag: query i's request holds
                            the keys up to its own position (:func:`decode_lengths`)
``window`` W                ``window_left = W - 1``, "the left (inclusive) window size"
                            (key j seen when ``j + qo_len + window_left >= kv_len + i``)
``window_right``            none (refused where it would hide a key)
``softcap``                 ``logits_soft_cap``: ``cap * tanh(x / cap)``, as refattn's
``scale``                   ``sm_scale``
GQA                         ``num_qo_heads`` a multiple of ``num_kv_heads``
``return_lse``              ``return_lse=True``: the lse in **base 2**, mapped here to the
                            natural log (:func:`_flashinfer_result`)
==========================  ===================================================================

The lse is base 2 because FlashInfer's kernels run the softmax in base 2:
``QueryTransform`` multiplies by ``sm_scale * log2e``
(``include/flashinfer/attention/variants.cuh``) and ``state_t::get_lse()``
returns ``m + log2(d)`` (``include/flashinfer/attention/state.cuh``);
FlashInfer's own ``tests/attention/test_lse_base.py`` says the default is
``"log2"`` and that ``"ln"`` (an option only newer wrappers have) is it
times ln 2, which is what is applied here. The probe (:func:`_flashinfer_probe`)
measures it.

No problem an adapter takes leaves a query without a key (every request
holds at least one key, and a causal one at least as many keys as
queries), so FlashInfer's convention for an empty row never reaches the
verdict; the probe still measures it, with a custom mask.

**Precision.** The decode kernels run on CUDA cores in float32: each key is cast to
float32, :math:`q \cdot k`, the softmax (``ptx_exp2``) and the weighted sum
of the float32-cast values all in float32, the output rounded once
(``compute_qk`` and ``update_local_state`` in
``include/flashinfer/attention/decode.cuh``): the spec's own policy,
:data:`FLASHINFER_DECODE`.

The prefill kernels (FlashAttention-2 style, on tensor cores) accumulate
:math:`q k^T` in float32 and cast the softmax weights to the input dtype
before the :math:`P V` product, as flash-attn does
(:data:`~refattn.testing.precision.FLASH_ATTN`). One rounding comes before:
``q_smem_inplace_transform`` multiplies ``q`` by ``sm_scale * log2e`` (or
``sm_scale / logits_soft_cap``) and stores it back in the input dtype, one
rounding of every element of ``q``, whose error grows with the scores; on a
model of these kernels (``tests/test_adapters_flashinfer.py``) flash-attn's
contract alone fails on float16 problems with scores near 30.
:data:`FLASHINFER_PREFILL` names it: flash-attn's contract with
``prescale="query"`` (q times the scale rounded; the :math:`\log_2 e` factor
rounds alike). On Hopper GPUs the default backend
(``backend="auto"``) runs FlashAttention-3 kernels instead where no custom
mask is given (``determine_attention_backend``); their rounding was not read
for this module.

What the adapters refuse (:class:`~refattn.testing.Unsupported`, one reason
per kind so that a report counts them together): dtypes other than float16
and bfloat16, head dims other than 64, 128 and 256, ``Dv != D``, a mask,
bias, sink logits or sink tokens, ALiBi (``pos_encoding_mode="ALIBI"``
takes no slopes: it uses its own, ``get_alibi_slopes(num_qo_heads)``), rows
numbered otherwise, a request without keys, causal rows with more queries
than keys, a right reach that hides keys, and (decode) GQA group sizes
other than 1, 2, 3, 4 and 8 and windows over keys after a query.

>>> from refattn.testing import ProblemSpec, make_problem
>>> p = make_problem(ProblemSpec(batch=2, q_len=1, k_len=6, layout="ragged", seed=6))
>>> lengths = bottom_right_lengths(p, leading=False)
>>> lengths.tolist()
[6, 3]
>>> table = np.array([[2, 0], [1, 3]])  # each row's blocks, in order
>>> [a.tolist() for a in paged_kv_indices(table, lengths, page_size=4)]
[[0, 2, 3], [2, 0, 1], [2, 3]]
"""

from __future__ import annotations

import inspect
import math
from dataclasses import replace
from typing import Any

import numpy as np

from refattn.testing.adapters.libraries import require
from refattn.testing.adapters.torch_masks import as_torch
from refattn.testing.adapters.torch_masks import cuda_device as _cuda_device
from refattn.testing.candidate import AttentionProblem, Unavailable, Unsupported
from refattn.testing.conformance import probes
from refattn.testing.conformance.implementations import Defect, Implementation
from refattn.testing.constraints import Constraints
from refattn.testing.drawing import DEFAULT_FEATURES
from refattn.testing.layouts import (
    bottom_right_lengths,
    heads_first,
    pack_varlen,
    page_kv,
    sequence_first,
)
from refattn.testing.precision import FLASH_ATTN, Precision

#: What FlashInfer's kernels require of every problem's shapes: head dims 64, 128 or 256
#: (the drawn ones are 64 and 128) and Dv == D.
FLASHINFER_CONSTRAINTS = Constraints(head_dim_multiple=64, max_head_dim=256, same_value_dim=True)
#: The decode adapters' too: every row holds at least as many keys as it has queries (each
#: query is a decode step over the keys up to its own position).
FLASHINFER_DECODE_CONSTRAINTS = replace(FLASHINFER_CONSTRAINTS, keys_cover_queries=True)
#: The head dims FlashInfer's kernels are compiled for (``DISPATCH_HEAD_DIM``).
FLASHINFER_HEAD_DIMS = (64, 128, 256)
#: The query heads per KV head FlashInfer's decode kernels take (``DISPATCH_GQA_GROUP_SIZE``).
FLASHINFER_DECODE_GROUP_SIZES = (1, 2, 3, 4, 8)
#: The page sizes of the paged adapters, one chosen by each problem's seed.
FLASHINFER_PAGE_SIZES = (1, 4, 16)
#: The float workspace every wrapper is given: the 128 MB FlashInfer's docs recommend.
WORKSPACE_BYTES = 128 * 1024 * 1024

FLASHINFER_DECODE = Precision(scores="float32", softmax="float32", accumulator="float32",
                              lse="float32")  # fmt: skip
"""FlashInfer's decode kernels: float32 throughout (CUDA cores), the output rounded once."""

FLASHINFER_PREFILL = replace(FLASH_ATTN, prescale="query")
"""FlashInfer's prefill kernels: q times the scale rounded to the input dtype before q k^T,
float32 scores, the weights cast to the input dtype before P V (flash-attn's contract)."""


def flashinfer_single_decode(problem: AttentionProblem) -> Any:
    r"""FlashInfer's ``single_decode_with_kv_cache``, one request per query (CUDA).

    Query i of row b is a decode step: ``q`` (Hq, D) over the row's first
    :math:`n = L_b - S_q + i + 1` keys with ``causal`` (the keys up to its own
    position, :func:`decode_lengths`), or all :math:`L_b` without, ``k``/``v``
    (n, Hkv, D) packed from the row's held slots in slot order. FlashInfer
    puts the query after the last key it is given, at :math:`n - 1`, which is
    where refattn's query sits; ``window_left = W - 1``.

    Raises
    ------
    Unsupported
        For what FlashInfer's kernels cannot express (the module docstring),
        and for a non-causal window with more than one query (the keys after
        a query are in no decode request).
    """
    flashinfer, device, q, k, v = _flashinfer_inputs(problem)
    lengths = _flashinfer_lengths(problem, decode=True)
    _check_decode_heads(q, k)
    window_left = _window_left(problem)
    if problem.return_lse and not _takes(flashinfer.single_decode_with_kv_cache, "return_lse"):
        raise Unsupported("this FlashInfer's single_decode_with_kv_cache returns no lse")
    packed = pack_varlen(_on_device(problem, q, k, v, device))
    starts = np.concatenate([[0], np.cumsum(lengths)])
    B, Sq = q.shape[0], q.shape[2]
    counts = decode_lengths(lengths, Sq, causal=problem.causal).reshape(B, Sq)
    queries = sequence_first(q)  # (B, Sq, Hq, D)
    outs, lses = [], []
    for b in range(B):
        for i in range(Sq):
            keys = slice(int(starts[b]), int(starts[b]) + int(counts[b, i]))
            result = flashinfer.single_decode_with_kv_cache(
                queries[b, i].contiguous(), packed.k[keys], packed.v[keys],  # (Hq, D), (n, Hkv, D)
                kv_layout="NHD", pos_encoding_mode="NONE", window_left=window_left,
                logits_soft_cap=problem.softcap, sm_scale=problem.scale,
                return_lse=problem.return_lse,
            )  # fmt: skip
            out, lse = result if problem.return_lse else (result, None)
            outs.append(out)
            lses.append(lse)
    return _flashinfer_result(problem, outs, lses if problem.return_lse else None)


def flashinfer_single_prefill(problem: AttentionProblem) -> Any:
    r"""FlashInfer's ``single_prefill_with_kv_cache``, one call per row (CUDA).

    Row b's queries ``q`` (Sq, Hq, D) over its :math:`L_b` held keys ``k``,
    ``v`` (L_b, Hkv, D), in slot order; FlashInfer aligns the queries to the
    bottom right, query i at :math:`L_b - S_q + i`, which is where refattn's
    sit. ``causal``, ``window_left = W - 1`` and ``logits_soft_cap`` as the
    module docstring says.

    Raises
    ------
    Unsupported
        For what FlashInfer's kernels cannot express (the module docstring);
        with ``causal``, for a row with fewer keys than queries, which the
        kernel rejects ("When mask_mode is set to MaskMode::kCausal, kv_len
        must be greater than or equal to qo_len").
    """
    flashinfer, device, q, k, v = _flashinfer_inputs(problem)
    lengths = _flashinfer_lengths(problem, decode=False)
    window_left = _window_left(problem)
    packed = pack_varlen(_on_device(problem, q, k, v, device))
    starts = np.concatenate([[0], np.cumsum(lengths)])
    queries = sequence_first(q)  # (B, Sq, Hq, D)
    outs, lses = [], []
    for b in range(q.shape[0]):
        keys = slice(int(starts[b]), int(starts[b + 1]))
        result = flashinfer.single_prefill_with_kv_cache(
            queries[b].contiguous(), packed.k[keys], packed.v[keys],  # (Sq, Hq, D), (L_b, Hkv, D)
            causal=problem.causal, kv_layout="NHD", pos_encoding_mode="NONE",
            sm_scale=problem.scale, window_left=window_left, logits_soft_cap=problem.softcap,
            return_lse=problem.return_lse,
        )  # fmt: skip
        out, lse = result if problem.return_lse else (result, None)
        outs.append(out)
        lses.append(lse)
    return _flashinfer_result(problem, outs, lses if problem.return_lse else None)


def flashinfer_batch_decode_paged(problem: AttentionProblem) -> Any:
    r"""FlashInfer's ``BatchDecodeWithPagedKVCacheWrapper``: plan, then run (CUDA).

    The keys and values go into pages (:func:`~refattn.testing.layouts.page_kv`:
    random block order, spare blocks, NaN in every slot no token fills) of
    :func:`page_size_of` tokens. Each query is one request, as for
    :func:`flashinfer_single_decode`: query i of row b reads the first
    :math:`n_{b,i}` tokens of row b's pages (:func:`decode_lengths`), so the
    requests of one row share its pages and differ in ``last_page_len``
    (:func:`paged_kv_indices`). ``q`` is (B * Sq, Hq, D), request-major.

    Raises
    ------
    Unsupported
        As :func:`flashinfer_single_decode`.
    """
    flashinfer, device, q, k, v = _flashinfer_inputs(problem)
    lengths = _flashinfer_lengths(problem, decode=True)
    _check_decode_heads(q, k)
    window_left = _window_left(problem)
    paged = page_kv(_on_device(problem, q, k, v, device), page_size=page_size_of(problem),
                    seed=problem.spec.seed)  # fmt: skip
    B, Hq, Sq, D = q.shape
    counts = decode_lengths(lengths, Sq, causal=problem.causal)  # (B * Sq,)
    table = np.repeat(_host(paged.block_table), Sq, axis=0)  # (B * Sq, blocks_per_row)
    indptr, indices, last_page_len = paged_kv_indices(table, counts, paged.page_size)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(_workspace(device), "NHD")
    wrapper.plan(
        _index(indptr, device), _index(indices, device), _index(last_page_len, device),
        Hq, k.shape[1], D, paged.page_size, pos_encoding_mode="NONE", window_left=window_left,
        logits_soft_cap=problem.softcap, q_data_type=q.dtype, kv_data_type=k.dtype,
        sm_scale=problem.scale,
    )  # fmt: skip
    result = wrapper.run(sequence_first(q).reshape(B * Sq, Hq, D).contiguous(),
                         (paged.k_cache, paged.v_cache), return_lse=problem.return_lse)  # fmt: skip
    out, lse = result if problem.return_lse else (result, None)
    return _flashinfer_result(problem, [out], None if lse is None else [lse])


def flashinfer_batch_prefill_paged(problem: AttentionProblem) -> Any:
    r"""FlashInfer's ``BatchPrefillWithPagedKVCacheWrapper``: plan, then run (CUDA).

    Row b is one request: its Sq queries (``qo_indptr = [0, Sq, 2 Sq, ...]``,
    ``q`` (B * Sq, Hq, D)) over its :math:`L_b` tokens in pages of
    :func:`page_size_of` tokens, as :func:`flashinfer_batch_decode_paged`
    pages them (:func:`paged_kv_indices`). The queries are aligned to the
    bottom right of their request, as for :func:`flashinfer_single_prefill`.

    Raises
    ------
    Unsupported
        As :func:`flashinfer_single_prefill` (with ``causal``, a row with fewer
        keys than queries: the single-request kernel rejects it, and the batch
        one is reported to give the queries that see no key a finite lse,
        flashinfer-ai/flashinfer#4452).
    """
    flashinfer, device, q, k, v = _flashinfer_inputs(problem)
    lengths = _flashinfer_lengths(problem, decode=False)
    window_left = _window_left(problem)
    paged = page_kv(_on_device(problem, q, k, v, device), page_size=page_size_of(problem),
                    seed=problem.spec.seed)  # fmt: skip
    B, Hq, Sq, D = q.shape
    qo_indptr = np.arange(B + 1) * Sq
    indptr, indices, last_page_len = paged_kv_indices(_host(paged.block_table), lengths,
                                                      paged.page_size)  # fmt: skip
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(_workspace(device), "NHD")
    wrapper.plan(
        _index(qo_indptr, device), _index(indptr, device), _index(indices, device),
        _index(last_page_len, device), Hq, k.shape[1], D, paged.page_size,
        causal=problem.causal, pos_encoding_mode="NONE", sm_scale=problem.scale,
        window_left=window_left, logits_soft_cap=problem.softcap, q_data_type=q.dtype,
        kv_data_type=k.dtype,
    )  # fmt: skip
    result = wrapper.run(sequence_first(q).reshape(B * Sq, Hq, D).contiguous(),
                         (paged.k_cache, paged.v_cache), return_lse=problem.return_lse)  # fmt: skip
    out, lse = result if problem.return_lse else (result, None)
    return _flashinfer_result(problem, [out], None if lse is None else [lse])


for _adapter in (flashinfer_single_decode, flashinfer_batch_decode_paged):
    _adapter.constraints = FLASHINFER_DECODE_CONSTRAINTS  # type: ignore[attr-defined]
    _adapter.precision = FLASHINFER_DECODE  # type: ignore[attr-defined]
for _adapter in (flashinfer_single_prefill, flashinfer_batch_prefill_paged):
    _adapter.constraints = FLASHINFER_CONSTRAINTS  # type: ignore[attr-defined]
    _adapter.precision = FLASHINFER_PREFILL  # type: ignore[attr-defined]


# -- the host side: page tables and request lengths ----------------------------------


def paged_kv_indices(
    block_table: Any, lengths: Any, page_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FlashInfer's page table of requests: ``(indptr, indices, last_page_len)``, int32.

    Request r reads its first ``lengths[r]`` tokens through its row of
    ``block_table`` (R, n): the first ``ceil(lengths[r] / page_size)`` blocks
    are its pages, ``indices[indptr[r]:indptr[r + 1]]``, and its last page
    holds ``last_page_len[r] = lengths[r] - (pages - 1) * page_size`` tokens,
    from 1 to ``page_size`` as FlashInfer requires.

    Raises
    ------
    ValueError
        For a request of no tokens, or of more than its row of the table spans.

    >>> table = np.array([[3, 0, 5], [1, 4, 2]])
    >>> [a.tolist() for a in paged_kv_indices(table, [5, 2], page_size=2)]
    [[0, 3, 4], [3, 0, 5, 1], [1, 2]]
    """
    table = np.asarray(block_table, dtype=np.int64)
    counts = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if table.ndim != 2 or table.shape[0] != counts.shape[0]:
        raise ValueError(f"block_table must be (R, n) for {counts.shape[0]} requests; got "
                         f"shape {table.shape}")  # fmt: skip
    if isinstance(page_size, bool) or int(page_size) < 1:
        raise ValueError(f"page_size must be a positive integer; got {page_size!r}")
    P = int(page_size)
    pages = -(-counts // P)  # (R,)
    if counts.size and (int(counts.min()) < 1 or int(pages.max()) > table.shape[1]):
        raise ValueError(f"every request must hold 1 to {table.shape[1] * P} tokens (its row "
                         f"of the table); got {counts.tolist()}")  # fmt: skip
    indptr = np.concatenate([[0], np.cumsum(pages)])
    used = [table[r, : pages[r]] for r in range(counts.shape[0])]
    indices = np.concatenate(used) if used else np.zeros(0, dtype=np.int64)
    last_page_len = counts - (pages - 1) * P
    return indptr.astype(np.int32), indices.astype(np.int32), last_page_len.astype(np.int32)


def decode_lengths(lengths: Any, q_len: int, *, causal: bool) -> np.ndarray:
    """(B * Sq,) int64: the keys each query's decode request holds, row by row.

    Query i of row b sits at :math:`L_b - S_q + i`; with ``causal`` it sees
    the keys up to its own position, :math:`L_b - S_q + i + 1` of them, and
    without, all :math:`L_b`.

    >>> decode_lengths([3, 5], 2, causal=True).tolist(), decode_lengths([3, 5], 2, causal=False).tolist()
    ([2, 3, 4, 5], [3, 3, 5, 5])
    """  # noqa: E501
    rows = np.asarray(lengths, dtype=np.int64).reshape(-1, 1)  # (B, 1)
    if causal:
        counts = rows - q_len + 1 + np.arange(q_len)[None, :]  # (B, Sq)
    else:
        counts = np.repeat(rows, q_len, axis=1)
    return counts.reshape(-1)


def page_size_of(problem: AttentionProblem) -> int:
    """The page size of a paged adapter's cache: one of :data:`FLASHINFER_PAGE_SIZES`,
    chosen by the problem's seed, so that a problem is repeatable and the sizes all drawn.

    >>> from refattn.testing import ProblemSpec, make_problem
    >>> [page_size_of(make_problem(ProblemSpec(seed=s))) for s in range(4)]
    [1, 4, 16, 1]
    """
    return FLASHINFER_PAGE_SIZES[int(problem.spec.seed) % len(FLASHINFER_PAGE_SIZES)]


# -- the library, the inputs and what FlashInfer refuses ------------------------------


def _flashinfer_module() -> Any:
    """``flashinfer``, or Unavailable saying why it cannot run here."""
    require("flashinfer")
    import torch

    if not torch.cuda.is_available():
        raise Unavailable("FlashInfer needs CUDA")
    import flashinfer

    return flashinfer


_WORKSPACES: dict[str, Any] = {}


def _workspace(device: str) -> Any:
    """The float workspace of :data:`WORKSPACE_BYTES` zeros on ``device`` (zeroed for its
    first use, as FlashInfer asks), made once per device and shared by every wrapper."""
    import torch

    if device not in _WORKSPACES:
        _WORKSPACES[device] = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    return _WORKSPACES[device]


def _flashinfer_inputs(problem: AttentionProblem) -> tuple[Any, str, Any, Any, Any]:
    """What every adapter starts from: the module (or Unavailable), the GPU, q, k and v
    there as torch tensors, and Unsupported for what FlashInfer takes of no problem."""
    flashinfer = _flashinfer_module()
    device = _cuda_device(problem)
    q, k, v = (as_torch(x, device) for x in (problem.q, problem.k, problem.v))
    _check_flashinfer_problem(problem, q, v)
    return flashinfer, device, q, k, v


def _check_flashinfer_problem(problem: AttentionProblem, q: Any, v: Any) -> None:
    """Unsupported for the dtypes, shapes and options FlashInfer's kernels do not take."""
    if problem.dtype not in ("float16", "bfloat16"):
        raise Unsupported(f"FlashInfer takes float16 and bfloat16, not {problem.dtype}")
    D, Dv = q.shape[-1], v.shape[-1]
    if D != Dv:
        raise Unsupported(f"FlashInfer needs the value dim equal to the key dim; got {Dv} != {D}")
    if D not in FLASHINFER_HEAD_DIMS:
        raise Unsupported(f"FlashInfer's kernels take head dims 64, 128 and 256; got {D}")
    if q.shape[2] == 0:
        raise Unsupported("FlashInfer takes at least one query per request")
    for name in ("mask", "bias", "sink_logits"):
        if getattr(problem, name) is not None:
            raise Unsupported(f"these FlashInfer functions take no {name}")
    if problem.alibi_slopes is not None:
        raise Unsupported('FlashInfer\'s pos_encoding_mode="ALIBI" takes no slopes (it uses '
                          "its own, get_alibi_slopes(num_qo_heads))")  # fmt: skip
    if problem.sink_tokens and problem.window is not None:
        raise Unsupported("FlashInfer has no sink tokens in a window")


def _check_decode_heads(q: Any, k: Any) -> None:
    """Unsupported for a GQA group size FlashInfer's decode kernels are not compiled for."""
    group = q.shape[1] // k.shape[1]
    if group not in FLASHINFER_DECODE_GROUP_SIZES:
        raise Unsupported(f"FlashInfer's decode kernels take GQA group sizes 1, 2, 3, 4 and 8; "
                          f"got {group}")  # fmt: skip


def _flashinfer_lengths(problem: AttentionProblem, *, decode: bool) -> np.ndarray:
    """(B,) request lengths :math:`L_b`, or Unsupported saying why the rows are not requests
    FlashInfer can be given (one reason per kind, so that the report counts them together)."""
    try:
        lengths = bottom_right_lengths(problem, leading=False)
    except ValueError:
        raise Unsupported("FlashInfer numbers each request's keys from 0 (keys in slot order), "
                          "queries at the end") from None  # fmt: skip
    if lengths.size == 0 or int(lengths.min()) < 1:
        raise Unsupported("FlashInfer needs at least one key in every request "
                          "(1 <= kv_last_page_len)")  # fmt: skip
    Sq = int(problem.q.shape[2])
    if problem.causal and Sq > int(lengths.min()):
        raise Unsupported("FlashInfer's causal kernels need kv_len >= qo_len in every request")
    if decode and not problem.causal and problem.window is not None and Sq > 1:
        raise Unsupported("FlashInfer's decode query sits after every key it is given; a "
                          "window over keys after a query is not a decode")  # fmt: skip
    return lengths


def _window_left(problem: AttentionProblem) -> int:
    """``window_left``: W - 1 for refattn's window W, -1 for none; Unsupported for a right
    reach that would hide a key (FlashInfer has none): one short of the Sq - 1 keys that
    follow the first query, without ``causal``."""
    R = problem.window_right
    if R is not None and not problem.causal and R < int(problem.q.shape[2]) - 1:
        raise Unsupported("FlashInfer's windows reach left only (window_left); no right reach")
    return -1 if problem.window is None else int(problem.window) - 1


def _on_device(problem: AttentionProblem, q: Any, k: Any, v: Any, device: str) -> AttentionProblem:
    """The problem with its arrays as the torch tensors on ``device`` (for the layouts)."""
    return replace(problem, q=q, k=k, v=v, q_pos=as_torch(problem.q_pos, device),
                   k_pos=as_torch(problem.k_pos, device))  # fmt: skip


def _takes(fn: Any, name: str) -> bool:
    """Whether ``fn`` has a parameter ``name`` (True where its signature cannot be read)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True


def _host(x: Any) -> np.ndarray:
    """A torch index tensor (anywhere) as an int64 NumPy array."""
    return np.asarray(x.cpu()).astype(np.int64)


def _index(x: np.ndarray, device: str) -> Any:
    """A host index array as the int32 tensor on ``device`` FlashInfer's plans take."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int32)).to(device)


def _flashinfer_result(problem: AttentionProblem, outs: list[Any], lses: list[Any] | None) -> Any:
    r"""FlashInfer's outputs, request by request, as refattn's (B, Hq, Sq, Dv) and (B, Hq, Sq).

    ``outs`` are (n, Hq, Dv) or (Hq, Dv) per call, the requests in row-major
    order (row b's query i is request ``b * Sq + i``); ``lses`` (n, Hq) or
    (Hq,) alike. The one convention mapped: FlashInfer's lse is in base 2,
    :math:`\log_2 \sum_j e^{s_j}`, and is multiplied by :math:`\ln 2`.
    """
    import torch

    B, Hq, Sq = problem.q.shape[0], problem.q.shape[1], problem.q.shape[2]
    out = torch.cat([x.reshape(-1, Hq, x.shape[-1]) for x in outs])  # (B * Sq, Hq, Dv)
    out = heads_first(out.reshape(B, Sq, Hq, out.shape[-1]))  # (B, Hq, Sq, Dv)
    if lses is None:
        return out
    lse = torch.cat([x.reshape(-1, Hq) for x in lses]).to(torch.float32)  # (B * Sq, Hq)
    lse = lse.reshape(B, Sq, Hq).permute(0, 2, 1) * math.log(2.0)  # (B, Hq, Sq), natural log
    return out, lse


# -- the probe and the implementations ------------------------------------------------


def _flashinfer_probe(device: str = "cuda") -> dict[str, str]:
    """FlashInfer's conventions, measured by calling ``single_prefill_with_kv_cache`` and
    ``single_decode_with_kv_cache`` directly on ``device`` (one head of dim 64, the one-hot
    values and the overflow inputs padded with zeros to it)."""
    flashinfer = _flashinfer_module()
    import torch

    D = FLASHINFER_HEAD_DIMS[0]

    def tensor(x: np.ndarray) -> Any:
        wide = np.pad(x, ((0, 0), (0, D - x.shape[1])))  # (S, D)
        return torch.tensor(wide, device=device)[:, None]  # (S, 1, D)

    def prefill(q: np.ndarray, k: np.ndarray, v: np.ndarray, **options: Any) -> Any:
        out, lse = flashinfer.single_prefill_with_kv_cache(
            tensor(q), tensor(k), tensor(v), return_lse=True, **options
        )
        width = v.shape[1]
        return out[:, 0, :width].float().cpu().numpy(), lse[:, 0].cpu().numpy()

    q, k, v = probes.one_hot_inputs(q_len=2, k_len=8, head_dim=D, dtype="float16")
    causal, lse = prefill(q, k, v, causal=True)
    window, _ = prefill(q, k, v, causal=True, window_left=2)
    keep = torch.ones((2, 8), dtype=torch.bool, device=device)
    keep[0] = False  # query 0 keeps no key
    empty, _ = prefill(q, k, v, custom_mask=keep)
    big_q, big_k, big_v, scale = probes.overflow_inputs(head_dim=8)
    scored, _ = prefill(big_q, big_k, big_v, sm_scale=scale)
    prefill_base = decode_base = probes.lse_of(lse, [7, 8])
    if _takes(flashinfer.single_decode_with_kv_cache, "return_lse"):
        _, decode_lse = flashinfer.single_decode_with_kv_cache(
            tensor(q[:1])[0], tensor(k), tensor(v), return_lse=True
        )  # one query over all 8 keys
        decode_base = probes.lse_of(decode_lse.cpu().numpy(), [8])
    same = prefill_base == decode_base
    return {
        "alignment": probes.alignment_of(probes.seen(causal), k_len=8),
        "empty_row": "custom_mask of no key: " + probes.empty_row_of(empty[0], v),
        "window": "window_left=2 keeps " + probes.reach_of(probes.seen(window)[1], 7),
        "lse": prefill_base if same else f"prefill {prefill_base}; decode {decode_base}",
        "scores": probes.scores_of(scored[0]),
    }


#: What the FlashInfer adapters express: the default features but ALiBi.
FLASHINFER_FEATURES = tuple(sorted(DEFAULT_FEATURES - {"alibi"}))
_FLASHINFER_UNSAID = (
    'rotary embedding applied in the kernel (pos_encoding_mode="ROPE_LLAMA", rope_scale, '
    "rope_theta)",
    'ALiBi (pos_encoding_mode="ALIBI" uses its own slopes, added as slope * (k - q) before '
    "the softcap)",
    "custom_mask and packed_custom_mask (one boolean mask for every head)",
    "fp8 KV caches (kv_data_type float8, k_scale, v_scale)",
    "use_tensor_cores=True in the decode functions, use_fp16_qk_reduction=True",
    'kv_layout="HND", and the 5-D paged_kv_cache (the (k_pages, v_pages) tuple is checked)',
    "backends chosen by hand (fa3, trtllm-gen, cudnn, cute-dsl); the default is used",
    "cascade and shared-prefix wrappers (MultiLevelCascadeAttentionWrapper, merge_state)",
    "BatchPrefillWithRaggedKVCacheWrapper, the MLA wrappers, POD attention",
    "attention sinks and window_right, where newer versions take them",
)


def _flashinfer_implementation(name: str, target: Any) -> Implementation:
    """One FlashInfer function or wrapper, as ``refattn conformance`` runs it."""
    return Implementation(name, "flashinfer-python", "attention", target,
                          ("float16", "bfloat16"), FLASHINFER_FEATURES, requires=("flashinfer",),
                          gpu=True, probe=_flashinfer_probe,
                          cannot_express=_FLASHINFER_UNSAID)  # fmt: skip


IMPLEMENTATIONS = (
    _flashinfer_implementation("FlashInfer single_decode_with_kv_cache",
                               flashinfer_single_decode),
    _flashinfer_implementation("FlashInfer single_prefill_with_kv_cache",
                               flashinfer_single_prefill),
    _flashinfer_implementation("FlashInfer BatchDecodeWithPagedKVCacheWrapper",
                               flashinfer_batch_decode_paged),
    _flashinfer_implementation("FlashInfer BatchPrefillWithPagedKVCacheWrapper",
                               flashinfer_batch_prefill_paged),
)  # fmt: skip
DEFECTS: tuple[Defect, ...] = ()
