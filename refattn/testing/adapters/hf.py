r"""Hugging Face transformers' attention functions as its models call them."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from refattn.testing.adapters.libraries import require
from refattn.testing.adapters.torch_masks import (
    additive_terms,
    as_torch,
    visibility,
)
from refattn.testing.candidate import AttentionProblem, Result, Unsupported
from refattn.testing.layouts import (
    left_pad,
)
from refattn.testing.precision import EAGER


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
    require("torch")
    require("transformers")
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
    q = as_torch(problem.q)
    k, v = as_torch(padded.k, q.device), as_torch(padded.v, q.device)  # (B, Hkv, S, D)
    held = as_torch(padded.attention_mask, q.device) == 1  # (B, S)
    k_pos = torch.where(held, as_torch(padded.position_ids, q.device), -1)  # (B, S)
    q_pos = as_torch(padded.q_position_ids, q.device)  # (B, Sq)
    B, Hq, Sq, _ = q.shape
    slots = torch.as_tensor(np.maximum(padded.k_index, 0), device=q.device)  # (B, S)

    def moved(x: Any) -> Any:  # (..., Sq, Sk) in the problem's slots -> (B, Hq, Sq, S)
        full = as_torch(x, q.device).expand(B, Hq, Sq, problem.k.shape[2])
        index = slots[:, None, None, :].expand(B, Hq, Sq, slots.shape[1])
        if problem.k.shape[2] == 0:  # every slot a pad: nothing to move
            return torch.zeros(index.shape, dtype=full.dtype, device=q.device)
        return torch.gather(full, -1, index)

    on_pads = replace(problem, k=k, v=v, k_pos=k_pos, q_pos=q_pos,
                      mask=None if problem.mask is None else moved(problem.mask),
                      bias=None if problem.bias is None else moved(problem.bias))  # fmt: skip
    keep = visibility(q_pos, k_pos, on_pads)[:, None]  # (B, 1, Sq, S)
    if on_pads.mask is not None:
        keep = keep & on_pads.mask.to(torch.bool)
    additive = additive_terms(on_pads, q, q_pos, k_pos)  # (B, Hq, Sq, S) or None
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
    return Result(out, dont_care=as_torch(padded.dont_care, q.device))


transformers_eager.precision = EAGER  # type: ignore[attr-defined]


def _attention_module(torch: Any, *, groups: int) -> Any:
    """What transformers' attention functions read of the layer calling them: its query heads
    per KV head, that the mask given is the whole mask (not causal on top), eval mode."""
    module = torch.nn.Module()
    module.num_key_value_groups = groups
    module.is_causal = False
    return module.eval()
