r"""PyTorch's own attention as a candidate: SDPA and FlexAttention."""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Iterator
from typing import Any

from refattn.testing.adapters.libraries import require
from refattn.testing.adapters.torch_masks import (
    additive_terms,
    as_torch,
    top_left_causal,
    visibility,
    with_sink_key,
)
from refattn.testing.candidate import AttentionProblem, Unavailable, Unsupported

#: What FlexAttention says when called without torch.compile: the adapter means to.
_FLEX_EAGER_WARNING = "flex_attention called without torch.compile"
#: The module switch that runs FlexAttention's forward without dynamo (see ``_uncompiled``).
_FLEX_EAGER_SWITCH = "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG"


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
    require("torch")
    if problem.softcap is not None:
        raise Unsupported("SDPA has no softcap")
    if problem.return_lse:
        raise Unsupported("SDPA does not return the log-sum-exp")
    import torch

    q, k, v = (as_torch(x) for x in (problem.q, problem.k, problem.v))
    q_pos, k_pos = as_torch(problem.q_pos, q.device), as_torch(problem.k_pos, q.device)
    keep = visibility(q_pos, k_pos, problem)[:, None]  # (B, 1, Sq, Sk)
    if problem.mask is not None:
        keep = keep & as_torch(problem.mask, q.device).to(torch.bool)  # (B, 1 or Hq, Sq, Sk)
    additive = additive_terms(problem, q, q_pos, k_pos)  # (B, Hq, Sq, Sk) or None
    options: dict[str, Any] = {"scale": problem.scale, "enable_gqa": True}
    if problem.sink_logits is not None:
        k, v, keep, additive = with_sink_key(problem, k, v, keep, additive)
    if additive is not None:
        options["attn_mask"] = additive.masked_fill(~keep, -math.inf).to(q.dtype)
    elif bool(keep.all()):
        pass  # every query sees every key: no mask to give
    elif top_left_causal(problem, q_pos, k_pos):
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

    q, k, v = (as_torch(x) for x in (problem.q, problem.k, problem.v))
    q_pos, k_pos = as_torch(problem.q_pos, q.device), as_torch(problem.k_pos, q.device)
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    sinks = problem.sink_logits is not None
    if Sk == 0 and not sinks:
        raise Unsupported("FlexAttention fails on Sk = 0 keys")
    working = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask = bias = sink = None
    if problem.mask is not None:
        mask = as_torch(problem.mask, q.device).to(torch.bool).expand(B, Hq, Sq, Sk)
    if problem.bias is not None:
        bias = as_torch(problem.bias, q.device).to(working).expand(B, Hq, Sq, Sk)
    if sinks:  # one more key slot, Sk: zeros, seen by every query, scored sigma_h
        sink = as_torch(problem.sink_logits, q.device).to(working)
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
        slopes = as_torch(problem.alibi_slopes, q.device).to(working).expand(B, Hq)

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


def _flex_attention_module() -> Any:
    """``torch.nn.attention.flex_attention``, or Unavailable where this torch lacks it."""
    require("torch")
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
