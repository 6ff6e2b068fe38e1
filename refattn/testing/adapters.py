r"""PyTorch SDPA, FlexAttention and flash-attn as candidates for ``check_attention``.

Each adapter takes an :class:`~refattn.testing.AttentionProblem`, says it in
the peer's own terms the way a careful user would (positions become a mask,
an alignment or per-row cache lengths; the layouts of
:mod:`refattn.testing.layouts` pack, page, split and transpose the arrays),
calls the peer once and hands back what the peer returned. Only conventions
that differ on purpose are mapped, each where the adapter says so; a problem
the peer cannot say raises :class:`~refattn.testing.Unsupported` with the
reason, which the report counts.

=================================  ===================================  ==========================
adapter                            expresses                            raises Unsupported for
=================================  ===================================  ==========================
``torch_sdpa``                     any positions, causal, window both   softcap, lse
                                   ways, sink tokens, GQA, mask, bias,
                                   ALiBi, sink logits (a float mask)
``torch_flex_attention``           everything SDPA does, softcap, lse   a torch without
                                                                        FlexAttention; Sk = 0
                                                                        without sink logits
``transformers_sdpa``,             rows numbered from 0, queries at     softcap, lse, sink logits,
``transformers_eager``             the end, left-padded as              other positions
                                   transformers pads them; causal,
                                   window both ways, sink tokens,
                                   mask, bias, ALiBi (its 4-D mask);
                                   padding queries are don't care
``flash_attn_func``                default positions, causal, window    other positions,
                                   both ways, GQA, softcap, ALiBi, lse  float32/64, mask, bias,
                                                                        sinks, and more
``flash_attn_varlen_func``         the same, rows of their own lengths  the same, and no key at
                                   packed by ``cu_seqlens`` (empty      all
                                   slots anywhere)
``flash_attn_with_kvcache``        the same, rows of their own lengths  the same, and Sk = 0
                                   (``cache_seqlens``)
``flash_attn_with_kvcache_paged``  the same through a block table       as ``flash_attn_varlen``
                                   (256-token pages, random order)
``flash_attn_with_kvcache_in_op``  the same, the new keys appended by   as ``flash_attn_with_
                                   the call (``k=``, ``v=``), present   kvcache``
=================================  ===================================  ==========================

Each flash adapter declares its :class:`~refattn.testing.constraints.Constraints`
(:data:`FLASH_CONSTRAINTS`: head dims up to 256, ``Dv == D``), so
``check_attention`` draws only problems of those shapes.

PyTorch and flash-attn are imported inside the adapters, never when this
module is: ``refattn.testing`` must stay importable, and cheap, where neither
is installed, and must not pull a framework into a process that did not ask
for it. An adapter for a peer that cannot run here (not installed, no GPU)
raises :class:`~refattn.testing.candidate.Unavailable` saying so, and the
check reports ``unavailable: torch is not installed`` rather than a failure.

Examples
--------
>>> import pytest; _ = pytest.importorskip("torch")
>>> from refattn.testing import ProblemSpec, check_problem
>>> from refattn.testing.adapters import torch_sdpa
>>> spec = ProblemSpec(q_len=3, k_len=5, causal=True, layout="holes", seed=1)
>>> check_problem(torch_sdpa, spec).passed
True
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import math
import threading
import warnings
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np

from refattn.testing.candidate import AttentionProblem, Result, Unavailable, Unsupported
from refattn.testing.constraints import Constraints
from refattn.testing.layouts import (
    bottom_right_lengths,
    heads_first,
    in_op_cache,
    left_pad,
    pack_varlen,
    page_kv,
    sequence_first,
    unpack_varlen,
)
from refattn.testing.precision import EAGER

__all__ = [
    "FLASH_CONSTRAINTS",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "flash_attn_with_kvcache_in_op",
    "flash_attn_with_kvcache_paged",
    "torch_flex_attention",
    "torch_sdpa",
    "transformers_eager",
    "transformers_sdpa",
]

#: What FlexAttention says when called without torch.compile: the adapter means to.
_FLEX_EAGER_WARNING = "flex_attention called without torch.compile"
#: The module switch that runs FlexAttention's forward without dynamo (see ``_uncompiled``).
_FLEX_EAGER_SWITCH = "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG"
#: What flash-attn 2 requires of every problem's shapes: head dims up to 256, Dv == D.
FLASH_CONSTRAINTS = Constraints(max_head_dim=256, same_value_dim=True)
#: The page size of the paged adapter: flash-attn 2 takes multiples of 256 only.
FLASH_PAGE_SIZE = 256


def torch_sdpa(problem: AttentionProblem) -> Any:
    r"""``torch.nn.functional.scaled_dot_product_attention`` on the problem.

    Positions, ``causal``, the window both ways (sink tokens kept) and the
    problem's boolean mask become a boolean mask (B, 1 or Hq, Sq, Sk); with
    ALiBi, a bias or sink logits, a float mask in q's dtype (as SDPA documents
    it) holding :math:`-m_h |q^{pos}_i - k^{pos}_j|` plus the bias where
    visible and :math:`-\infty` elsewhere. A sink logit :math:`\sigma_h` is
    one more key of zeros, value zeros, that every query sees with the float
    mask's :math:`\sigma_h` as its score (:math:`0 + \sigma_h`, exact): it joins the
    denominator and adds nothing. ``is_causal=True`` with no mask is used only
    where PyTorch's top-left alignment is exactly the problem (every row
    ``q_pos = arange(Sq)``, ``k_pos = arange(Sk)``, no window, mask, bias, ALiBi
    or sinks); no mask at all where every query sees every key.
    Grouped-query attention is ``enable_gqa=True``. Rows with no visible key
    are set to 0, refattn's convention (SDPA kernels have given NaN there).

    Raises
    ------
    Unsupported
        For softcap and for the log-sum-exp, which SDPA cannot express.
    """
    _require("torch")
    if problem.softcap is not None:
        raise Unsupported("SDPA has no softcap")
    if problem.return_lse:
        raise Unsupported("SDPA does not return the log-sum-exp")
    import torch

    q, k, v = (_as_torch(x) for x in (problem.q, problem.k, problem.v))
    q_pos, k_pos = _as_torch(problem.q_pos, q.device), _as_torch(problem.k_pos, q.device)
    keep = _visibility(q_pos, k_pos, problem)[:, None]  # (B, 1, Sq, Sk)
    if problem.mask is not None:
        keep = keep & _as_torch(problem.mask, q.device).to(torch.bool)  # (B, 1 or Hq, Sq, Sk)
    additive = _additive(problem, q, q_pos, k_pos)  # (B, Hq, Sq, Sk) or None
    options: dict[str, Any] = {"scale": problem.scale, "enable_gqa": True}
    if problem.sink_logits is not None:
        k, v, keep, additive = _with_sink_key(problem, k, v, keep, additive)
    if additive is not None:
        options["attn_mask"] = additive.masked_fill(~keep, -math.inf).to(q.dtype)
    elif bool(keep.all()):
        pass  # every query sees every key: no mask to give
    elif _top_left_causal(problem, q_pos, k_pos):
        options["is_causal"] = True
    else:
        options["attn_mask"] = keep
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, **options)
    seen = keep.any(dim=-1)[..., None]  # (B, 1 or Hq, Sq, 1)
    return torch.where(seen, out, torch.zeros((), dtype=out.dtype, device=out.device))


def torch_flex_attention(problem: AttentionProblem) -> Any:
    r"""``torch.nn.attention.flex_attention.flex_attention`` on the problem.

    Visibility is a ``mask_mod`` that reads the captured ``q_pos``/``k_pos``
    of the batch row (the window both ways, sink tokens kept) and the
    problem's boolean mask, made into a block mask; softcap, ALiBi and the
    bias are a ``score_mod`` on the already scaled score, softcap first, then
    :math:`-m_h |q^{pos}_i - k^{pos}_j|` and the bias, widened to the working
    precision of the scores (float32, float64 for float64 inputs), where
    FlexAttention holds them. FlexAttention has no sink logits (torch 2.13);
    a sink is one more key of zeros, value zeros, that ``mask_mod`` keeps and
    ``score_mod`` scores :math:`\sigma_h`. The log-sum-exp comes from
    ``return_aux=AuxRequest(lse=True)`` (``return_lse`` on a torch without
    it), which torch 2.13 already returns in natural log, with
    :math:`-\infty` and a zero output for a row with no visible key.

    It runs uncompiled, as plain eager PyTorch (see :func:`_uncompiled`);
    where it would warn that it is unfused, that warning alone is silenced.

    Raises
    ------
    Unsupported
        Where the installed torch has no FlexAttention, and for ``Sk = 0``
        without sink logits, on which it fails (with a block mask or without:
        it reduces over the empty key axis).
    """
    flex = _flex_attention_module()
    import torch

    q, k, v = (_as_torch(x) for x in (problem.q, problem.k, problem.v))
    q_pos, k_pos = _as_torch(problem.q_pos, q.device), _as_torch(problem.k_pos, q.device)
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    sinks = problem.sink_logits is not None
    if Sk == 0 and not sinks:
        raise Unsupported("FlexAttention fails on Sk = 0 keys")
    working = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask = bias = sink = None
    if problem.mask is not None:
        mask = _as_torch(problem.mask, q.device).to(torch.bool).expand(B, Hq, Sq, Sk)
    if problem.bias is not None:
        bias = _as_torch(problem.bias, q.device).to(working).expand(B, Hq, Sq, Sk)
    if sinks:  # one more key slot, Sk: zeros, seen by every query, scored sigma_h
        sink = _as_torch(problem.sink_logits, q.device).to(working)
        k, v = (torch.nn.functional.pad(x, (0, 0, 0, 1)) for x in (k, v))
        k_pos = torch.nn.functional.pad(k_pos, (0, 1))
        mask = None if mask is None else torch.nn.functional.pad(mask, (0, 1), value=True)
        bias = None if bias is None else torch.nn.functional.pad(bias, (0, 1))
    causal, softcap = problem.causal, problem.softcap
    window, window_right, sink_tokens = problem.window, problem.window_right, problem.sink_tokens

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        query, key = q_pos[b, q_idx], k_pos[b, kv_idx]
        keep = key >= 0
        if causal:
            keep = keep & (key <= query)
        if window is not None:
            keep = keep & ((query - key < window) | (key < sink_tokens))
        if window_right is not None:
            keep = keep & (key - query <= window_right)
        if mask is not None:
            keep = keep & mask[b, h, q_idx, kv_idx]
        if sink is not None:
            keep = keep | (kv_idx == Sk)
        return keep

    slopes = None
    if problem.alibi_slopes is not None:
        slopes = _as_torch(problem.alibi_slopes, q.device).to(working).expand(B, Hq)

    def score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if slopes is not None:
            score = score - slopes[b, h] * (q_pos[b, q_idx] - k_pos[b, kv_idx]).abs()
        if bias is not None:
            score = score + bias[b, h, q_idx, kv_idx]
        if sink is not None:
            score = torch.where(kv_idx == Sk, sink[h].to(score.dtype), score)
        return score

    modified = any(x is not None for x in (softcap, slopes, bias, sink))
    heads = Hq if mask is not None else None
    block_mask = flex.create_block_mask(mask_mod, B, heads, Sq, k.shape[2], device=q.device)
    options: dict[str, Any] = {}
    if problem.return_lse:
        aux_request = getattr(flex, "AuxRequest", None)
        options = {"return_aux": aux_request(lse=True)} if aux_request else {"return_lse": True}
    with _uncompiled(flex), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_FLEX_EAGER_WARNING, category=UserWarning)
        result = flex.flex_attention(
            q, k, v, score_mod=score_mod if modified else None, block_mask=block_mask,
            scale=problem.scale, enable_gqa=True, **options,
        )  # fmt: skip
    if not problem.return_lse:
        return result
    out, aux = result
    return out, getattr(aux, "lse", aux)  # AuxOutput, or the lse itself from return_lse


def transformers_sdpa(problem: AttentionProblem) -> Any:
    r"""transformers' ``sdpa_attention_forward`` (its ``attn_implementation="sdpa"``) on the
    problem, given as transformers gives it: left-padded rows and a 4-D mask.

    The rows are left-padded (:func:`~refattn.testing.layouts.left_pad`): each
    row's keys at the end of S slots, numbered from 0 by ``position_ids``, the
    queries on the last Sq of them. The mask is what a model builds from its
    ``attention_mask``: the pads hidden, then causal, the window both ways and
    sink tokens from the position ids, and the problem's own mask and bias
    moved to the padded slots; ALiBi and a bias make it a float mask, as
    transformers' ALiBi models pass it. A query on a pad has no defined
    output in transformers: it is returned as "don't care"
    (:attr:`~refattn.testing.Result.dont_care`). Rows that see no key are set
    to 0, as for :func:`torch_sdpa`.

    Raises
    ------
    Unsupported
        For softcap, the lse and sink logits, which transformers' sdpa
        attention does not take, and for rows not numbered from 0 with the
        queries at the end, which left padding cannot say.
    """
    return _transformers(problem, "sdpa")


def transformers_eager(problem: AttentionProblem) -> Any:
    r"""transformers' ``eager_attention_forward`` (Llama's, its ``attn_implementation=
    "eager"``) on the problem, given as :func:`transformers_sdpa` gives it, the mask
    additive with the dtype's lowest value where a key is hidden, as transformers makes it.
    It multiplies and sums in the input dtype with a float32 softmax cast back: it
    declares :data:`~refattn.testing.precision.EAGER`.

    Raises
    ------
    Unsupported
        As :func:`transformers_sdpa`.
    """
    return _transformers(problem, "eager")


def _transformers(problem: AttentionProblem, implementation: str) -> Any:
    """``transformers_sdpa`` and ``transformers_eager``: the left-padded problem, its mask
    and one call of the implementation's attention function."""
    _require("torch")
    _require("transformers")
    for unsaid, name in ((problem.softcap, "softcap"), (problem.sink_logits, "sink logits")):
        if unsaid is not None:
            raise Unsupported(f"transformers' {implementation} attention takes no {name}")
    if problem.return_lse:
        raise Unsupported(f"transformers' {implementation} attention returns no lse")
    import torch

    try:
        padded = left_pad(problem)
    except ValueError:  # one reason for every such problem, so the report counts them together
        raise Unsupported("left padding numbers each row's keys from 0 in slot order, queries "
                          "at the end") from None  # fmt: skip
    q = _as_torch(problem.q)
    k, v = _as_torch(padded.k, q.device), _as_torch(padded.v, q.device)  # (B, Hkv, S, D)
    held = _as_torch(padded.attention_mask, q.device) == 1  # (B, S)
    k_pos = torch.where(held, _as_torch(padded.position_ids, q.device), -1)  # (B, S)
    q_pos = _as_torch(padded.q_position_ids, q.device)  # (B, Sq)
    B, Hq, Sq, _ = q.shape
    slots = torch.as_tensor(np.maximum(padded.k_index, 0), device=q.device)  # (B, S)

    def moved(x: Any) -> Any:  # (..., Sq, Sk) in the problem's slots -> (B, Hq, Sq, S)
        full = _as_torch(x, q.device).expand(B, Hq, Sq, problem.k.shape[2])
        index = slots[:, None, None, :].expand(B, Hq, Sq, slots.shape[1])
        if problem.k.shape[2] == 0:  # every slot a pad: nothing to move
            return torch.zeros(index.shape, dtype=full.dtype, device=q.device)
        return torch.gather(full, -1, index)

    on_pads = replace(problem, k=k, v=v, k_pos=k_pos, q_pos=q_pos,
                      mask=None if problem.mask is None else moved(problem.mask),
                      bias=None if problem.bias is None else moved(problem.bias))  # fmt: skip
    keep = _visibility(q_pos, k_pos, on_pads)[:, None]  # (B, 1, Sq, S)
    if on_pads.mask is not None:
        keep = keep & on_pads.mask.to(torch.bool)
    additive = _additive(on_pads, q, q_pos, k_pos)  # (B, Hq, Sq, S) or None
    module = _attention_module(torch, groups=Hq // k.shape[1])
    if implementation == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        mask = keep if additive is None else additive.masked_fill(~keep, -math.inf).to(q.dtype)
        out, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=problem.scale,
                                        is_causal=False)  # fmt: skip
    else:
        from transformers.models.llama.modeling_llama import eager_attention_forward

        lowest = torch.finfo(q.dtype).min
        base = torch.zeros((), dtype=q.dtype, device=q.device) if additive is None else \
            additive.to(q.dtype)  # fmt: skip
        mask = torch.where(keep, base, torch.tensor(lowest, dtype=q.dtype, device=q.device))
        out, _ = eager_attention_forward(module, q, k, v, mask, scaling=problem.scale)
    out = out.transpose(1, 2)  # (B, Hq, Sq, Dv): transformers returns (B, Sq, Hq, Dv)
    seen = keep.any(dim=-1)[..., None]  # (B, 1, Sq, 1)
    out = torch.where(seen, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return Result(out, dont_care=_as_torch(padded.dont_care, q.device))


transformers_eager.precision = EAGER  # type: ignore[attr-defined]


def _attention_module(torch: Any, *, groups: int) -> Any:
    """What transformers' attention functions read of the layer calling them: its query heads
    per KV head, that the mask given is the whole mask (not causal on top), eval mode."""
    module = torch.nn.Module()
    module.num_key_value_groups = groups
    module.is_causal = False
    return module.eval()


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


def _as_torch(x: Any, device: Any = None) -> Any:
    """An array of the problem (NumPy, PyTorch, or anything with DLPack) as a torch tensor.

    NumPy's bfloat16 (``ml_dtypes``) is unknown to ``torch.from_numpy``, so it
    goes through float32, which holds every bfloat16 exactly.

    >>> import pytest; torch = pytest.importorskip("torch")
    >>> import ml_dtypes
    >>> x = np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16)
    >>> _as_torch(x)
    tensor([ 1.5000, -2.0000], dtype=torch.bfloat16)
    """
    import torch

    if isinstance(x, torch.Tensor):
        tensor = x
    elif isinstance(x, np.ndarray):
        if x.dtype.name == "bfloat16":
            tensor = torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
        else:
            tensor = torch.from_numpy(np.ascontiguousarray(x))
    else:
        tensor = torch.from_dlpack(x)
    return tensor if device is None else tensor.to(device)


def _visibility(q_pos: Any, k_pos: Any, problem: AttentionProblem) -> Any:
    """(B, Sq, Sk) booleans, in torch: which key each query may see, from positions alone.

    The rule of :func:`refattn.positions.visibility`: a key is visible when its
    slot is held (``k_pos >= 0``), it is not after the query (with ``causal``),
    ``q_pos - k_pos < window`` unless ``k_pos < sink_tokens`` (with a window)
    and ``k_pos - q_pos <= window_right`` (with a right reach).

    >>> import pytest; torch = pytest.importorskip("torch")
    >>> from refattn.testing import ProblemSpec, make_problem
    >>> p = make_problem(ProblemSpec(q_len=2, k_len=4, causal=True, window=2))
    >>> q_pos, k_pos = torch.tensor([[2, 3]]), torch.tensor([[0, 1, 2, -1]])
    >>> _visibility(q_pos, k_pos, p).int()
    tensor([[[0, 1, 1, 0],
             [0, 0, 1, 0]]], dtype=torch.int32)
    """
    query, key = q_pos[:, :, None], k_pos[:, None, :]  # (B, Sq, 1), (B, 1, Sk)
    visible = (key >= 0).expand(q_pos.shape[0], q_pos.shape[1], k_pos.shape[1])  # (B, Sq, Sk)
    if problem.causal:
        visible = visible & (key <= query)
    if problem.window is not None:
        visible = visible & ((query - key < problem.window) | (key < problem.sink_tokens))
    if problem.window_right is not None:
        visible = visible & (key - query <= problem.window_right)
    return visible


def _additive(problem: AttentionProblem, q: Any, q_pos: Any, k_pos: Any) -> Any:
    """(B, Hq, Sq, Sk), at least float32: the ALiBi term and the bias, or None for neither."""
    import torch

    wide = torch.promote_types(q.dtype, torch.float32)
    B, Hq, Sq, _ = q.shape
    total = None
    if problem.alibi_slopes is not None:
        slopes = _as_torch(problem.alibi_slopes, q.device)
        total = _alibi_bias(slopes, q_pos, k_pos, heads=Hq)  # (B, Hq, Sq, Sk)
    if problem.bias is not None:
        bias = _as_torch(problem.bias, q.device).to(wide)
        total = bias if total is None else total + bias
    return None if total is None else total.expand(B, Hq, Sq, k_pos.shape[1])


def _with_sink_key(
    problem: AttentionProblem, k: Any, v: Any, keep: Any, additive: Any
) -> tuple[Any, Any, Any, Any]:
    """k, v with one more slot of zeros, seen by every query with score sigma_h: the sink."""
    import torch

    B, Hq, Sq = keep.shape[0], problem.q.shape[1], keep.shape[2]
    sink = _as_torch(problem.sink_logits, k.device)
    wide = torch.promote_types(sink.dtype, torch.float32)
    k, v = (torch.nn.functional.pad(x, (0, 0, 0, 1)) for x in (k, v))  # (B, Hkv, Sk + 1, D)
    keep = torch.nn.functional.pad(keep, (0, 1), value=True)  # (B, 1 or Hq, Sq, Sk + 1)
    if additive is None:
        additive = torch.zeros((B, Hq, Sq, keep.shape[-1] - 1), dtype=wide, device=k.device)
    column = sink.to(wide).reshape(1, Hq, 1, 1).expand(B, Hq, Sq, 1)
    return k, v, keep, torch.cat([additive, column.to(additive.dtype)], dim=-1)


def _top_left_causal(problem: AttentionProblem, q_pos: Any, k_pos: Any) -> bool:
    """Whether SDPA's ``is_causal`` alone is the problem: causal, top-left positions, and no
    window, mask, bias, ALiBi or sinks."""
    extras = (problem.window, problem.window_right, problem.mask, problem.bias,
              problem.alibi_slopes, problem.sink_logits)  # fmt: skip
    return problem.causal and all(x is None for x in extras) and _is_top_left(q_pos, k_pos)


def _alibi_bias(slopes: Any, q_pos: Any, k_pos: Any, *, heads: int) -> Any:
    """(B, Hq, Sq, Sk) ALiBi term :math:`-m_h |q^{pos}_i - k^{pos}_j|`, at least float32.

    ``slopes`` is (Hq,) or (B, Hq); they arrive rounded to the problem dtype
    and are widened exactly, so only the product is rounded, once, at the end.
    """
    import torch

    wide = torch.promote_types(slopes.dtype, torch.float32)
    slopes = slopes.to(wide).reshape(-1, heads)[:, :, None, None]  # (B or 1, Hq, 1, 1)
    distance = (q_pos[:, :, None] - k_pos[:, None, :]).abs().to(wide)  # (B, Sq, Sk)
    return -slopes * distance[:, None]  # (B, Hq, Sq, Sk)


def _is_top_left(q_pos: Any, k_pos: Any) -> bool:
    """Whether every row has ``q_pos = arange(Sq)``, ``k_pos = arange(Sk)``: SDPA's is_causal."""
    import torch

    rows_q = torch.arange(q_pos.shape[1], device=q_pos.device)
    rows_k = torch.arange(k_pos.shape[1], device=k_pos.device)
    return bool((q_pos == rows_q).all()) and bool((k_pos == rows_k).all())


def _require(library: str) -> None:
    """:class:`~refattn.testing.candidate.Unavailable` where ``library`` is not installed."""
    if importlib.util.find_spec(library) is None:
        raise Unavailable(f"{library} is not installed")


def _flex_attention_module() -> Any:
    """``torch.nn.attention.flex_attention``, or Unavailable where this torch lacks it."""
    _require("torch")
    try:
        from torch.nn.attention import flex_attention
    except ImportError as exc:
        raise Unavailable(f"this torch has no FlexAttention ({exc})") from None
    return flex_attention


#: Who is inside :func:`_uncompiled` now, and the switch's value before the first came in.
_FLEX_USERS = {"count": 0, "before": False}
_FLEX_LOCK = threading.Lock()


@contextlib.contextmanager
def _uncompiled(flex: Any) -> Iterator[None]:
    """Run FlexAttention as plain eager PyTorch, not through dynamo.

    Called without ``torch.compile``, torch 2.13's ``flex_attention`` still
    traces each call with dynamo (its "eager" backend) and traces again for
    every new shape, dtype or captured value: about 0.3 s a problem, 70 s for
    200. The switch its own warning names for debugging mask and score mods
    runs the same forward (``math_attention``) directly. The switch is put
    back afterwards; a torch without it runs the traced way, whose warning
    the caller silences.

    The switch is one module attribute shared by every thread, so it is
    counted: the first caller in turns it on and the last one out puts it
    back; a thread leaving early cannot turn it off under another, nor leave
    it on.
    """
    if not hasattr(flex, _FLEX_EAGER_SWITCH):
        yield
        return
    with _FLEX_LOCK:
        if _FLEX_USERS["count"] == 0:
            _FLEX_USERS["before"] = getattr(flex, _FLEX_EAGER_SWITCH)
            setattr(flex, _FLEX_EAGER_SWITCH, True)
        _FLEX_USERS["count"] += 1
    try:
        yield
    finally:
        with _FLEX_LOCK:
            _FLEX_USERS["count"] -= 1
            if _FLEX_USERS["count"] == 0:
                setattr(flex, _FLEX_EAGER_SWITCH, _FLEX_USERS["before"])


def _flash_attn_module() -> Any:
    """``flash_attn``, or Unavailable saying why it cannot run here."""
    _require("flash_attn")
    import torch

    if not torch.cuda.is_available():
        raise Unavailable("flash-attn needs CUDA")
    import flash_attn

    return flash_attn


def _cuda_device(problem: AttentionProblem) -> str:
    """The problem's device if it is a GPU, else the first GPU (NumPy inputs move there)."""
    device = str(problem.device)
    return device if device.startswith("cuda") else "cuda"


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
    q, k, v = (_as_torch(x, device) for x in (problem.q, problem.k, problem.v))
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
    return replace(problem, q=q, k=k, v=v, q_pos=_as_torch(problem.q_pos, device),
                   k_pos=_as_torch(problem.k_pos, device))  # fmt: skip


def _int32(x: Any, device: str) -> Any:
    import torch

    return _as_torch(np.asarray(x) if isinstance(x, np.ndarray) else x, device).to(torch.int32)


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
        slopes = _as_torch(problem.alibi_slopes, device)
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
    q_pos, k_pos = _as_torch(problem.q_pos, lse.device), _as_torch(problem.k_pos, lse.device)
    empty = ~_visibility(q_pos, k_pos, problem).any(dim=-1)[:, None, :]  # (B, 1, Sq)
    lse = torch.where(empty & torch.isposinf(lse), -math.inf, lse)  # (B, Hq, Sq)
    if problem.alibi_slopes is not None and _causal_kernel(problem, window_size, Sk):
        slopes = _as_torch(problem.alibi_slopes, lse.device).to(torch.float32)
        slopes = slopes.reshape(-1, lse.shape[1])[:, :, None]  # (B or 1, Hq, 1)
        lse = lse - slopes * q_pos[:, None, :].to(torch.float32)  # (B, Hq, Sq)
    return out, lse
