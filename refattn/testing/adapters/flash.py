r"""flash-attn 2's functions as candidates (CUDA, float16 and bfloat16)."""

from __future__ import annotations

import inspect
import math
from dataclasses import replace
from typing import Any

import numpy as np

from refattn.testing.adapters.libraries import require
from refattn.testing.adapters.torch_masks import (
    as_torch,
    visibility,
)
from refattn.testing.adapters.torch_masks import cuda_device as _cuda_device
from refattn.testing.candidate import AttentionProblem, Result, Unavailable, Unsupported
from refattn.testing.conformance import probes
from refattn.testing.conformance.implementations import Defect, Implementation
from refattn.testing.constraints import Constraints
from refattn.testing.drawing import DEFAULT_FEATURES
from refattn.testing.layouts import (
    bottom_right_lengths,
    heads_first,
    in_op_cache,
    pack_varlen,
    page_kv,
    sequence_first,
    unpack_varlen,
)

#: What flash-attn 2 requires of every problem's shapes: head dims up to 256, Dv == D.
FLASH_CONSTRAINTS = Constraints(max_head_dim=256, same_value_dim=True)
#: The page size of the paged adapter: flash-attn 2 takes multiples of 256 only.
FLASH_PAGE_SIZE = 256


def flash_attn_func(problem: AttentionProblem) -> Any:
    r"""flash-attn 2's ``flash_attn_func`` on the problem (CUDA, float16/bfloat16).

    flash-attn has no positions: its causal mask and window are aligned to
    the bottom right, query :math:`i` sitting at :math:`S_k - S_q + i`, which
    is refattn's default, so only problems with default positions in every
    row are expressible. The arrays go sequence-first
    (:func:`~refattn.testing.layouts.sequence_first`). The window is
    ``window_size=(left, right)`` (:func:`_flash_window`); ALiBi slopes go as
    float32 (H,) or (B, H). See :func:`_flash_lse` for how the lse is read.

    Raises
    ------
    Unsupported
        Where flash_attn or CUDA is missing, and for what flash-attn 2 cannot
        express: positions other than the defaults, dtypes other than
        float16/bfloat16, ``Dv != D``, ``D > 256``, a mask, a bias, sinks,
        softcap before flash-attn 2.6, and the windows it clamps.
    """
    flash_attn, device, q, k, v = _flash_inputs(problem)
    Sk = k.shape[2]
    lengths = _flash_lengths(problem, leading=True)
    if bool((lengths != Sk).any()):
        raise Unsupported("flash_attn_func has only default positions (queries at the end)")
    window_size = _flash_window(problem, q.shape[2], Sk)
    options = _flash_options(problem, flash_attn.flash_attn_func, window_size, device)
    result = flash_attn.flash_attn_func(
        *(sequence_first(x) for x in (q, k, v)),  # (B, S, H, D)
        softmax_scale=problem.scale, causal=problem.causal,
        return_attn_probs=problem.return_lse, **options,
    )  # fmt: skip
    out, lse = (result[0], result[1]) if problem.return_lse else (result, None)
    return _flash_result(problem, heads_first(out), lse, window_size, Sk)


def flash_attn_varlen_func(problem: AttentionProblem) -> Any:
    r"""flash-attn 2's ``flash_attn_varlen_func`` on the problem (CUDA, float16/bfloat16).

    The rows are packed (:func:`~refattn.testing.layouts.pack_varlen`): each
    row's held key slots, wherever they are, one sequence after another, and
    every query; ``cu_seqlens_q``/``cu_seqlens_k`` and the longest of each
    say where each sequence starts. flash-attn numbers each sequence's keys
    0 .. L_b - 1 and aligns its queries to the bottom right, so row b must
    hold positions 0 .. L_b - 1 in slot order with queries at
    :math:`L_b - S_q + i` (:func:`~refattn.testing.layouts.bottom_right_lengths`).
    flash-attn clamps the window to ``max_seqlen_k``; its lse comes back as
    (Hq, total_q) and is unpacked.

    Raises
    ------
    Unsupported
        As :func:`flash_attn_func`, for rows numbered otherwise, and for a
        batch with no key at all.
    """
    flash_attn, device, q, k, v = _flash_inputs(problem)
    _flash_lengths(problem, leading=False)
    packed = pack_varlen(_on_device(problem, q, k, v, device))
    if packed.total_k == 0:
        raise Unsupported("flash_attn_varlen_func needs at least one key in the batch")
    window_size = _flash_window(problem, packed.max_seqlen_q, packed.max_seqlen_k)
    options = _flash_options(problem, flash_attn.flash_attn_varlen_func, window_size, device)
    result = flash_attn.flash_attn_varlen_func(
        packed.q, packed.k, packed.v, packed.cu_seqlens_q, packed.cu_seqlens_k,
        packed.max_seqlen_q, packed.max_seqlen_k, softmax_scale=problem.scale,
        causal=problem.causal, return_attn_probs=problem.return_lse, **options,
    )  # fmt: skip
    if not problem.return_lse:
        return unpack_varlen(packed, result)
    out, lse = unpack_varlen(packed, result[0], result[1])  # (B, Hq, Sq, Dv), (B, Hq, Sq)
    return _flash_result(problem, out, lse, window_size, packed.max_seqlen_k)


def flash_attn_with_kvcache(problem: AttentionProblem) -> Any:
    r"""flash-attn 2's ``flash_attn_with_kvcache`` on the problem (CUDA, float16/bfloat16).

    ``k`` and ``v`` are the cache (sequence-first), ``cache_seqlens`` the
    per-row lengths :math:`L_b`: row :math:`b` holds keys at positions
    :math:`0 .. L_b - 1` in its first slots (the rest empty, never read) and
    its queries end at :math:`L_b - 1`, :math:`q^{pos}_i = L_b - S_q + i`.
    That is every position layout it can express; the defaults are
    :math:`L_b = S_k`. Window, softcap and ALiBi are given as for
    :func:`flash_attn_func`.

    Raises
    ------
    Unsupported
        As :func:`flash_attn_func`, for positions that are not per-row
        lengths, and for a cache of ``Sk = 0`` slots.
    """
    flash_attn, device, q, k, v = _flash_inputs(problem)
    Sk = k.shape[2]
    if Sk == 0:
        raise Unsupported("flash_attn_with_kvcache needs a cache of at least one slot")
    lengths = _flash_lengths(problem, leading=True)
    window_size = _flash_window(problem, q.shape[2], Sk)
    options = _flash_options(problem, flash_attn.flash_attn_with_kvcache, window_size, device)
    k_cache, v_cache = (sequence_first(x).contiguous() for x in (k, v))  # (B, Sk, Hkv, D)
    result = flash_attn.flash_attn_with_kvcache(
        sequence_first(q), k_cache, v_cache,  # (B, Sq, Hq, D), (B, Sk, Hkv, D) x 2
        cache_seqlens=_int32(lengths, device), softmax_scale=problem.scale,
        causal=problem.causal, return_softmax_lse=problem.return_lse, **options,
    )  # fmt: skip
    out, lse = result if problem.return_lse else (result, None)
    return _flash_result(problem, heads_first(out), lse, window_size, Sk)


def flash_attn_with_kvcache_paged(problem: AttentionProblem) -> Any:
    r"""flash-attn 2's ``flash_attn_with_kvcache`` with a ``block_table`` (a paged cache).

    The keys and values go into pages of :data:`FLASH_PAGE_SIZE` tokens (the
    multiple of 256 flash-attn 2 requires) in a random block order drawn from
    the problem's seed, with spare blocks, every slot no token fills holding
    NaN (:func:`~refattn.testing.layouts.page_kv`); ``cache_seqlens`` says how
    many tokens each row holds. Like packing, paging drops empty slots, so
    the rows are numbered as for :func:`flash_attn_varlen_func`. flash-attn
    clamps the window to the row's table span, ``blocks_per_row * 256``.

    Raises
    ------
    Unsupported
        As :func:`flash_attn_varlen_func`.
    """
    flash_attn, device, q, k, v = _flash_inputs(problem)
    _flash_lengths(problem, leading=False)
    paged = page_kv(_on_device(problem, q, k, v, device), page_size=FLASH_PAGE_SIZE,
                    seed=problem.spec.seed)  # fmt: skip
    span = paged.blocks_per_row * paged.page_size
    window_size = _flash_window(problem, q.shape[2], span)
    options = _flash_options(problem, flash_attn.flash_attn_with_kvcache, window_size, device)
    result = flash_attn.flash_attn_with_kvcache(
        sequence_first(q), paged.k_cache, paged.v_cache,  # (N, 256, Hkv, D) x 2
        cache_seqlens=paged.cache_seqlens, block_table=paged.block_table,
        softmax_scale=problem.scale, causal=problem.causal,
        return_softmax_lse=problem.return_lse, **options,
    )  # fmt: skip
    out, lse = result if problem.return_lse else (result, None)
    return _flash_result(problem, heads_first(out), lse, window_size, span)


def flash_attn_with_kvcache_in_op(problem: AttentionProblem) -> Any:
    r"""flash-attn 2's ``flash_attn_with_kvcache`` given the new tokens' ``k=`` and ``v=``.

    The problem is split (:func:`~refattn.testing.layouts.in_op_cache`): the
    cache holds each row's past, ``cache_seqlens`` its length
    :math:`L_b - n`, the new tokens' slots NaN; flash-attn writes the
    :math:`n` new keys and values there in place, at ``cache_seqlens``, and
    attends over all :math:`L_b`. The cache it wrote is returned as the
    :attr:`~refattn.testing.Result.present`, which the verifier compares with
    the problem's keys and values. Rows must be per-row lengths, as for
    :func:`flash_attn_with_kvcache`; with no new token, ``k`` and ``v`` are
    not passed.

    Raises
    ------
    Unsupported
        As :func:`flash_attn_with_kvcache`.
    """
    flash_attn, device, q, k, v = _flash_inputs(problem)
    Sk = k.shape[2]
    if Sk == 0:
        raise Unsupported("flash_attn_with_kvcache needs a cache of at least one slot")
    _flash_lengths(problem, leading=True)
    split = in_op_cache(_on_device(problem, q, k, v, device))
    window_size = _flash_window(problem, q.shape[2], Sk)
    options = _flash_options(problem, flash_attn.flash_attn_with_kvcache, window_size, device)
    k_cache, v_cache = (sequence_first(x).contiguous() for x in (split.k_past, split.v_past))
    if split.new_slots.shape[1]:
        options |= {"k": sequence_first(split.k_new), "v": sequence_first(split.v_new)}
    result = flash_attn.flash_attn_with_kvcache(
        sequence_first(q), k_cache, v_cache,  # (B, Sq, Hq, D), (B, Sk, Hkv, D) x 2
        cache_seqlens=_int32(split.past_lengths, device), softmax_scale=problem.scale,
        causal=problem.causal, return_softmax_lse=problem.return_lse, **options,
    )  # fmt: skip
    out, lse = result if problem.return_lse else (result, None)
    answer = _flash_result(problem, heads_first(out), lse, window_size, Sk)
    out, lse = answer if problem.return_lse else (answer, None)
    return Result(out, lse=lse, present=(heads_first(k_cache), heads_first(v_cache)))


for _adapter in (flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache,
                 flash_attn_with_kvcache_paged, flash_attn_with_kvcache_in_op):  # fmt: skip
    _adapter.constraints = FLASH_CONSTRAINTS  # type: ignore[attr-defined]


def _flash_attn_module() -> Any:
    """``flash_attn``, or Unavailable saying why it cannot run here."""
    require("flash_attn")
    import torch

    if not torch.cuda.is_available():
        raise Unavailable("flash-attn needs CUDA")
    import flash_attn

    return flash_attn


def _check_flash_problem(problem: AttentionProblem, q: Any, v: Any) -> None:
    """Unsupported for dtypes, head dims and options flash-attn 2 does not take."""
    if problem.dtype not in ("float16", "bfloat16"):
        raise Unsupported(f"flash-attn takes float16 and bfloat16, not {problem.dtype}")
    D, Dv = q.shape[-1], v.shape[-1]
    if D != Dv:
        raise Unsupported(f"flash-attn 2 needs the value dim equal to the key dim; got {Dv} != {D}")
    if D > 256:
        raise Unsupported(f"flash-attn 2 takes head dims up to 256; got {D}")
    for name in ("mask", "bias", "sink_logits"):
        if getattr(problem, name) is not None:
            raise Unsupported(f"flash-attn 2 takes no {name}")
    if problem.sink_tokens and problem.window is not None:
        raise Unsupported("flash-attn 2 has no sink tokens in a window")


def _flash_inputs(problem: AttentionProblem) -> tuple[Any, str, Any, Any, Any]:
    """What every flash adapter starts from: the module (or Unavailable), the GPU, q, k and
    v there as torch tensors, and Unsupported for what flash-attn 2 takes of no problem."""
    flash_attn = _flash_attn_module()
    device = _cuda_device(problem)
    q, k, v = (as_torch(x, device) for x in (problem.q, problem.k, problem.v))
    _check_flash_problem(problem, q, v)
    return flash_attn, device, q, k, v


def _flash_lengths(problem: AttentionProblem, *, leading: bool) -> np.ndarray:
    """(B,) row lengths as flash-attn's layouts take them, or Unsupported saying why not."""
    try:
        return bottom_right_lengths(problem, leading=leading)
    except ValueError:
        # One reason for every such problem, so the report counts them together.
        why = "keys in the first slots" if leading else "keys in slot order"
        raise Unsupported(f"flash-attn numbers each row's keys from 0 ({why}), queries at "
                          "the end") from None  # fmt: skip


def _on_device(problem: AttentionProblem, q: Any, k: Any, v: Any, device: str) -> AttentionProblem:
    """The problem with its arrays as the torch tensors on ``device`` (for the layouts)."""
    return replace(problem, q=q, k=k, v=v, q_pos=as_torch(problem.q_pos, device),
                   k_pos=as_torch(problem.k_pos, device))  # fmt: skip


def _int32(x: Any, device: str) -> Any:
    import torch

    return as_torch(np.asarray(x) if isinstance(x, np.ndarray) else x, device).to(torch.int32)


def _flash_window(problem: AttentionProblem, Sq: int, Sk: int) -> tuple[int, int]:
    """``window_size=(left, right)`` for refattn's window W and right reach R: (W - 1, 0)
    causal; (W - 1 or -1, R or -1) not; (-1, -1) for neither.

    ``Sk`` is the key count flash-attn clamps to (the cache's slots, or
    ``max_seqlen_k``). It turns a reach at or past ``Sk`` into none, and a
    right reach of none into ``Sk`` once the left one is set, so without
    ``causal`` query 0 reaches only key ``2 Sk - Sq``: short of the last key
    when ``Sq > Sk + 1``, where refattn's queries (at negative positions) see
    every key; and a right reach R >= Sk that flash-attn drops still holds back
    refattn's queries below ``Sk - 1 - R``. With ``Sq > Sk + 1`` those are
    Unsupported. A left reach of ``Sk`` or more is no window for flash-attn or
    refattn.
    """
    W, R = problem.window, problem.window_right
    if W is None and (R is None or problem.causal):
        return (-1, -1)
    left = -1 if W is None else W - 1
    if problem.causal:
        return (left, 0)
    right = -1 if R is None else R
    clamped = right >= Sk or (right < 0 and 0 <= left < Sk)  # right reach none, or Sk
    if clamped and Sq > Sk + 1:
        raise Unsupported("flash-attn caps a window's right reach at Sk; Sq > Sk + 1 needs more")
    return (left, right)


def _causal_kernel(problem: AttentionProblem, window_size: tuple[int, int], Sk: int) -> bool:
    """Whether flash-attn runs its causal kernel: no left reach left after clamping to
    ``Sk``, and a right reach of 0 (``causal`` sets it)."""
    left, right = (-1 if w >= Sk else w for w in window_size)
    right = 0 if problem.causal else right
    return left < 0 and right == 0


def _flash_options(
    problem: AttentionProblem, fn: Any, window_size: tuple[int, int], device: str
) -> dict[str, Any]:
    """The window, softcap and ALiBi keywords of a flash-attn call."""
    import torch

    options: dict[str, Any] = {"window_size": window_size}
    if problem.softcap is not None:
        if "softcap" not in inspect.signature(fn).parameters:
            raise Unsupported("this flash-attn has no softcap (it came in 2.6)")
        options["softcap"] = float(problem.softcap)
    if problem.alibi_slopes is not None:
        slopes = as_torch(problem.alibi_slopes, device)
        options["alibi_slopes"] = slopes.to(torch.float32).contiguous()  # exact: widened
    return options


def _flash_result(
    problem: AttentionProblem, out: Any, lse: Any, window_size: tuple[int, int], Sk: int
) -> Any:
    r"""flash-attn's output, already (B, Hq, Sq, Dv), and its lse, in refattn's conventions.

    Two conventions differ on purpose and are mapped:

    - a row with no visible key has lse :math:`+\infty` in flash-attn
      (:math:`-\infty` in refattn); its output is already 0, and is left as
      flash-attn gives it;
    - in its causal kernel (:func:`_causal_kernel`), flash-attn adds the ALiBi
      term as :math:`+m_h j` instead of :math:`-m_h (q^{pos}_i - j)`: the same
      softmax (they differ by a constant per row) but an lse larger by
      :math:`m_h q^{pos}_i`, which is subtracted.
    """
    import torch

    if lse is None:
        return out
    q_pos, k_pos = as_torch(problem.q_pos, lse.device), as_torch(problem.k_pos, lse.device)
    empty = ~visibility(q_pos, k_pos, problem).any(dim=-1)[:, None, :]  # (B, 1, Sq)
    lse = torch.where(empty & torch.isposinf(lse), -math.inf, lse)  # (B, Hq, Sq)
    if problem.alibi_slopes is not None and _causal_kernel(problem, window_size, Sk):
        slopes = as_torch(problem.alibi_slopes, lse.device).to(torch.float32)
        slopes = slopes.reshape(-1, lse.shape[1])[:, :, None]  # (B or 1, Hq, 1)
        lse = lse - slopes * q_pos[:, None, :].to(torch.float32)  # (B, Hq, Sq)
    return out, lse


def _flash_probe() -> dict[str, str]:
    """flash-attn's conventions, measured by calling ``flash_attn_func`` directly (CUDA)."""
    flash_attn = _flash_attn_module()
    import torch

    def run(q: np.ndarray, k: np.ndarray, v: np.ndarray, **options: Any) -> Any:
        q_, k_, v_ = (torch.tensor(x, device="cuda")[None, :, None] for x in (q, k, v))
        out, lse, _ = flash_attn.flash_attn_func(q_, k_, v_, return_attn_probs=True, **options)
        return out[0, :, 0].float().cpu().numpy(), lse[0, 0].float().cpu().numpy(), lse.dtype

    q, k, v = probes.one_hot_inputs(q_len=2, k_len=8, head_dim=8, dtype="float16")
    causal, lse, lse_dtype = run(q, k, v, causal=True)
    window, _, _ = run(q, k, v, causal=True, window_size=(2, 0))
    many_q, _, _ = probes.one_hot_inputs(q_len=10, k_len=8, head_dim=8, dtype="float16")
    empty, _, _ = run(many_q, k, v, causal=True)  # bottom-right: query 0 sits before key 0
    big_q, big_k, big_v, scale = probes.overflow_inputs(head_dim=8)
    scored, _, _ = run(big_q, big_k, big_v, softmax_scale=scale)
    return {
        "alignment": probes.alignment_of(probes.seen(causal), k_len=8),
        "empty_row": probes.empty_row_of(empty[0], v),
        "window": "window_size=(2, 0) keeps " + probes.reach_of(probes.seen(window)[1], 7),
        "lse": probes.lse_of(lse.astype(np.float32), [7, 8]).replace("float32", str(lse_dtype)),
        "scores": probes.scores_of(scored[0]),
    }


#: What the flash-attn adapters express: the default features and a right reach.
FLASH_FEATURES = tuple(sorted({*DEFAULT_FEATURES, "two_sided_window"}))
_LAYOUT_FEATURES = ("positions", "empty_slots", "ragged")
_FLASH_UNSAID = ("dropout_p", "deterministic backward", "rotary embedding applied in "
                 "flash_attn_with_kvcache (rotary_cos/rotary_sin)", "cache_batch_idx",
                 "cache_leftpad", "block_table with flash_attn_varlen_func")  # fmt: skip


def _flash_implementation(name: str, target: Any, features: tuple[str, ...]) -> Implementation:
    return Implementation(name, "flash-attn", "attention", target, ("float16", "bfloat16"),
                          features, requires=("flash_attn",), gpu=True, probe=_flash_probe,
                          cannot_express=_FLASH_UNSAID)  # fmt: skip


IMPLEMENTATIONS = (
    _flash_implementation("flash-attn flash_attn_func", flash_attn_func,
                          tuple(f for f in FLASH_FEATURES if f not in _LAYOUT_FEATURES)),
    _flash_implementation("flash-attn flash_attn_varlen_func", flash_attn_varlen_func,
                          FLASH_FEATURES),
    _flash_implementation("flash-attn flash_attn_with_kvcache", flash_attn_with_kvcache,
                          FLASH_FEATURES),
    _flash_implementation("flash-attn flash_attn_with_kvcache (block_table)",
                          flash_attn_with_kvcache_paged, FLASH_FEATURES),
    _flash_implementation("flash-attn flash_attn_with_kvcache (k=, v= appended)",
                          flash_attn_with_kvcache_in_op, (*FLASH_FEATURES, "in_op_cache")),
)  # fmt: skip
DEFECTS: tuple[Defect, ...] = ()
