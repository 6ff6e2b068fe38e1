r"""Hugging Face transformers' attention functions as its models call them.

A transformers model does not build its own attention mask: a model's
forward asks :mod:`transformers.masking_utils` for it (``create_causal_mask``,
``create_sliding_window_causal_mask``, ``create_bidirectional_mask``, ...)
from its config, the 2-D ``attention_mask`` of its batch, its KV cache and
its ``position_ids``, and then each layer appends the new keys to the cache
and hands what the cache returns, with that mask, to the attention function
of its ``attn_implementation``. The adapters here make the same calls in the
same order, so a problem is answered by transformers' mask as well as its
attention: a left-padded batch (:func:`~refattn.testing.layouts.left_pad`)
whose past keys are already in a ``DynamicCache`` made from a one-layer
config (a sliding layer when the problem is causal with a window), the
queries being the new tokens; or, for packed documents, a row of several
documents told apart by ``position_ids`` that restart, as in training with
packing.

What no function of ``masking_utils`` builds (the problem's own boolean
mask, a one-sided window or a right reach without causality, ALiBi and an
additive bias) is combined with the mask afterwards, as a model that has
them does (an ALiBi model adds its bias to the mask).

torch and transformers are imported inside the functions, so that
``refattn.testing`` imports without them.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from refattn.testing.adapters.libraries import require
from refattn.testing.adapters.torch_masks import additive_terms, as_torch
from refattn.testing.candidate import AttentionProblem, Result, Unsupported
from refattn.testing.conformance.implementations import Defect, Implementation
from refattn.testing.conformance.probes import (
    alignment_of,
    empty_row_of,
    one_hot_inputs,
    overflow_inputs,
    reach_of,
    scores_of,
    seen,
)
from refattn.testing.layouts import left_pad
from refattn.testing.precision import EAGER
from refattn.testing.report import Failure

#: The one reason for every problem left padding cannot say (each row's keys numbered from
#: 0 in slot order, the queries at the end), so the report counts them together.
_NOT_LEFT_PADDED = "left padding numbers each row's keys from 0 in slot order, queries at the end"
#: What create_block_mask says of the ``_compile=True`` that masking_utils passes it.
_BLOCK_MASK_COMPILE_WARNING = "_compile flag on create_block_mask"
#: What FlexAttention says when called without torch.compile: the adapter means to.
_FLEX_EAGER_WARNING = "flex_attention called without torch.compile"


def transformers_sdpa(problem: AttentionProblem) -> Any:
    r"""transformers' ``sdpa_attention_forward`` (its ``attn_implementation="sdpa"``) on the
    problem, with the mask its ``masking_utils`` build, as a model calls them.

    The rows are left-padded: row b's :math:`L_b` keys in the last slots of
    S, numbered from 0 by ``position_ids``, the queries the last Sq slots (the
    new tokens). The past slots go into a ``DynamicCache`` made from a
    one-layer config first; the mask is ``create_causal_mask`` (causal),
    ``create_sliding_window_causal_mask`` (causal with a window, the config's
    ``sliding_window = W`` and a sliding cache layer: transformers' window
    keeps :math:`q - k < W`, refattn's), ``create_bidirectional_mask`` or
    ``create_bidirectional_sliding_window_mask`` (not causal; its window is
    :math:`|q - k| \le w`, a window :math:`W = w + 1` with a right reach
    :math:`w`), from the 2-D ``attention_mask``, the cache and the queries'
    ``position_ids``; sink tokens are its ``or_mask_function``. Packed
    documents (causal, Sq = Sk, every slot held, positions restarting at each
    document and the problem's mask exactly "same document") are one row
    without ``attention_mask`` or cache, the documents found by transformers
    from the restarts of ``position_ids``. The cache's ``update`` gives the
    keys and values attended over.

    The problem's own mask, and a window or right reach that the bidirectional
    masks cannot say, are and-ed with the mask after; ALiBi and a bias are
    its ``position_bias`` (in q's dtype), which ``sdpa_attention_forward``
    adds where the mask keeps a key. A query on a pad has no defined output in
    transformers: it is "don't care" (:attr:`~refattn.testing.Result.dont_care`).
    Rows that see no key under transformers' own mask get the lowest value
    of the dtype on every key and so the mean of V; they are set to 0
    (refattn's convention; ``empty_row`` in the probe).

    Raises
    ------
    Unsupported
        For softcap (``sdpa_attention_forward`` raises on it), the lse (it
        returns None) and sink logits (it takes none), and for rows not
        numbered from 0 with the queries at the end, which left padding
        cannot say.
    """
    return _transformers(problem, "sdpa")


def transformers_eager(problem: AttentionProblem) -> Any:
    r"""transformers' ``eager_attention_forward`` (Llama's, its ``attn_implementation=
    "eager"``) on the problem, as :func:`transformers_sdpa` gives it, the mask from
    ``masking_utils.eager_mask``: 0 where a key is kept and the dtype's lowest value
    where it is hidden; ALiBi and a bias are added to it, and the problem's own mask
    puts the lowest value where it hides a key. It multiplies and sums in the input
    dtype with a float32 softmax cast back: it declares
    :data:`~refattn.testing.precision.EAGER`.

    Raises
    ------
    Unsupported
        As :func:`transformers_sdpa`.
    """
    return _transformers(problem, "eager")


def transformers_flex(problem: AttentionProblem) -> Any:
    r"""transformers' ``flex_attention_forward`` (its ``attn_implementation=
    "flex_attention"``) on the problem, as :func:`transformers_sdpa` gives it, the mask a
    ``BlockMask`` from ``masking_utils.flex_attention_mask``.

    Softcap is its ``softcap``; ALiBi, a bias and the problem's own mask (as
    :math:`-\infty`) are its ``position_bias``, added to the scores in
    float32. It runs uncompiled: transformers compiles ``flex_attention``
    and the block mask with ``torch.compile``, which on a CPU builds a C++
    kernel for every new shape; with dynamo switched off for the call (and
    FlexAttention's own debug switch, see
    :func:`~refattn.testing.adapters.pytorch._uncompiled`) the same forward
    runs as plain PyTorch.

    Raises
    ------
    Unsupported
        For the lse and sink logits: on a CPU ``flex_attention_forward``
        skips the lse ("On CPU we must skip returning LSE") and raises for
        sinks; and as :func:`transformers_sdpa` for the layouts.
    """
    return _transformers(problem, "flex_attention")


transformers_eager.precision = EAGER  # type: ignore[attr-defined]


@dataclass(frozen=True)
class _Batch:
    """A problem as a model's forward sees it: the keys of every slot, the 2-D attention mask
    (None for packed documents), the position ids of every slot, the queries' slots."""

    k: Any  #: (B, Hkv, S, D)
    v: Any  #: (B, Hkv, S, Dv)
    attention_mask: Any  #: (B, S) int64 or None
    position_ids: Any  #: (B, S) int64, pads numbered 1 as generate numbers them
    k_pos: Any  #: (B, S) int64, -1 on a pad
    q_pos: Any  #: (B, Sq) int64
    pads: Any  #: (B,) int64: pads before each row's first key
    slots: Any  #: (B, S) int64: the problem's slot each slot came from (0 for a pad)
    dont_care: Any  #: (B, Sq) bool or None
    packed: bool  #: documents told apart by restarting positions, no cache


def _transformers(
    problem: AttentionProblem, implementation: str, *, padding: bool = True, past_shift: int = 0
) -> Any:
    """The three adapters: the batch, the model's mask and cache calls, one attention call.

    ``padding`` and ``past_shift`` exist so that tests can make the mistakes a wrapper
    could make (a mask built without the batch's padding, a cache holding one token too
    many or too few); the adapters leave them alone.
    """
    require("torch")
    require("transformers")
    name = {"sdpa": "sdpa", "eager": "eager", "flex_attention": "flex"}[implementation]
    if problem.sink_logits is not None:
        raise Unsupported(f"transformers' {name} attention takes no sink logits on a CPU")
    if problem.return_lse:
        raise Unsupported(f"transformers' {name} attention returns no lse on a CPU")
    if problem.softcap is not None and implementation != "flex_attention":
        raise Unsupported(f"transformers' {name} attention takes no softcap")
    import torch

    q = as_torch(problem.q)
    B, Hq, Sq, _ = q.shape
    batch = _packed(problem, q.device) or _left_padded(problem, q.device)
    S = batch.k.shape[2]
    if implementation != "flex_attention" and q.dtype == torch.float16:
        _refuse_scores_past_lowest(problem, q, batch.k, name)
    window = problem.window
    symmetric = (not problem.causal and window is not None
                 and problem.window_right == window - 1)  # fmt: skip
    sliding = window is not None and (problem.causal or symmetric)
    config_window = (window if problem.causal else window - 1) if sliding else None  # type: ignore[operator]
    # Sink tokens must still be in the cache: a sliding cache layer has let them go.
    sliding_cache = sliding and problem.causal and problem.sink_tokens == 0
    config = _config(implementation, window=config_window, sliding_layer=sliding_cache)
    extras = _extras(problem, batch, sliding=sliding)  # (B, 1 or Hq, Sq, S) or None
    additive = _additive(problem, batch, q)  # (B, Hq, Sq, S) or None
    embeds = torch.zeros((B, Sq, 1), dtype=q.dtype, device=q.device)  # only its shape is read

    import transformers

    cache = None
    past = S - Sq + past_shift
    if not batch.packed:
        cache = transformers.DynamicCache(config=config)
        if past > 0:
            cache.update(batch.k[:, :, :past], batch.v[:, :, :past], 0)
    attention_mask = batch.attention_mask if padding else None
    sinks = _sink_function(problem, batch) if problem.sink_tokens and sliding else None
    skip = extras is None  # a mask combined with more must be materialized
    with _flex_uncompiled(implementation == "flex_attention"):
        mask = _model_mask(problem, config, embeds, attention_mask, cache, batch, sinks,
                           sliding=sliding, skip=skip)  # fmt: skip
        if cache is None:
            k, v = batch.k, batch.v
        else:
            k, v = cache.update(batch.k[:, :, max(past, 0) :], batch.v[:, :, max(past, 0) :], 0)
        kept = S - k.shape[2]  # slots the cache has let go (a sliding layer's past)
        extras = None if extras is None else extras[..., kept:]
        additive = None if additive is None else additive[..., kept:]
        module = _attention_module(torch, groups=Hq // k.shape[1], causal=problem.causal)
        out, keep = _attend(implementation, module, q, k, v, mask, extras, additive, problem)
    out = out.transpose(1, 2)  # (B, Hq, Sq, Dv): transformers returns (B, Sq, Hq, Dv)
    if keep is not None:  # rows transformers' mask leaves empty: refattn's 0, not mean of V
        seen = keep.any(dim=-1)[..., None]  # (B, 1 or Hq, Sq, 1)
        out = torch.where(seen, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return Result(out, dont_care=batch.dont_care)


def _refuse_scores_past_lowest(problem: AttentionProblem, q: Any, k: Any, name: str) -> None:
    """Unsupported where a float16 scaled score reaches float16's largest value: transformers
    hides a key by adding the dtype's lowest value (``eager_mask``: "-inf (minimum value for
    the given `dtype`)"; ``create_position_bias_mask``: ``min_dtype``), not -inf, and a
    score beyond 65504 outweighs it, so the hidden key is seen."""
    import torch

    groups = q.shape[1] // k.shape[1]
    keys = k.float().repeat_interleave(groups, dim=1)  # (B, Hq, S, D)
    scores = problem.scale * (q.float() @ keys.transpose(-1, -2))  # (B, Hq, Sq, S)
    if scores.numel() and float(scores.abs().max()) >= torch.finfo(torch.float16).max:
        raise Unsupported(f"transformers' {name} attention hides a key by adding float16's "
                          "lowest value, which a score beyond 65504 outweighs")  # fmt: skip


def _left_padded(problem: AttentionProblem, device: Any) -> _Batch:
    """The problem's rows left-padded as transformers batches prompts."""
    import torch

    try:
        padded = left_pad(problem)
    except ValueError:
        raise Unsupported(_NOT_LEFT_PADDED) from None
    held = as_torch(padded.attention_mask, device) == 1  # (B, S)
    position_ids = as_torch(padded.position_ids, device)
    S = held.shape[1]
    return _Batch(
        k=as_torch(padded.k, device), v=as_torch(padded.v, device),
        attention_mask=as_torch(padded.attention_mask, device), position_ids=position_ids,
        k_pos=torch.where(held, position_ids, -1), q_pos=as_torch(padded.q_position_ids, device),
        pads=S - held.sum(dim=1),
        slots=torch.as_tensor(np.maximum(padded.k_index, 0), device=device),
        dont_care=as_torch(padded.dont_care, device), packed=False,
    )  # fmt: skip


def _packed(problem: AttentionProblem, device: Any) -> _Batch | None:
    """Packed documents as transformers finds them, or None when the problem is not that:
    causal, Sq = Sk, every slot held with the queries on them, positions that restart, no
    sink tokens, and a mask that is exactly "same document" for the documents the
    restarts delimit (transformers' ``find_packed_sequence_indices``: a new document where
    a position is not the one before plus one)."""
    import torch

    q_pos, k_pos = as_torch(problem.q_pos, device), as_torch(problem.k_pos, device)
    if problem.mask is None or not problem.causal or problem.sink_tokens:
        return None
    if q_pos.shape != k_pos.shape or bool((k_pos < 0).any()) or not bool((q_pos == k_pos).all()):
        return None
    step = torch.diff(k_pos, dim=-1, prepend=k_pos[:, :1] - 1)
    documents = (step != 1).cumsum(dim=-1)  # (B, S)
    if bool((documents[:, -1] == 0).all()):
        return None  # one document per row: transformers sees no packing
    same = documents[:, None, :, None] == documents[:, None, None, :]  # (B, 1, S, S)
    mask = as_torch(problem.mask, device).to(torch.bool)
    if not bool((mask == same).all()):
        return None
    B, S = k_pos.shape
    return _Batch(
        k=as_torch(problem.k, device), v=as_torch(problem.v, device), attention_mask=None,
        position_ids=k_pos, k_pos=k_pos, q_pos=q_pos,
        pads=torch.zeros(B, dtype=torch.int64, device=device),
        slots=torch.arange(S, device=device).expand(B, S), dont_care=None, packed=True,
    )  # fmt: skip


def _config(implementation: str, *, window: int | None, sliding_layer: bool) -> Any:
    """A one-layer model config: its attention implementation, its sliding window (read by
    the mask functions), and whether its cache layer slides."""
    import transformers

    shape: dict[str, Any] = {"num_hidden_layers": 1, "num_attention_heads": 1,
                             "num_key_value_heads": 1, "head_dim": 8, "hidden_size": 8,
                             "intermediate_size": 8, "vocab_size": 8}  # fmt: skip
    config = transformers.MistralConfig(sliding_window=window if sliding_layer else None, **shape)
    config.sliding_window = window  # the masks read it; the cache layer was made above
    config._attn_implementation = implementation
    return config


def _model_mask(
    problem: AttentionProblem, config: Any, embeds: Any, attention_mask: Any, cache: Any,
    batch: _Batch, sinks: Callable[..., Any] | None, *, sliding: bool, skip: bool,
) -> Any:  # fmt: skip
    """The mask a model's forward asks ``masking_utils`` for, before its layers run."""
    from transformers import masking_utils as mu

    if problem.causal:
        create = mu.create_sliding_window_causal_mask if sliding else mu.create_causal_mask
        position_ids = batch.position_ids if batch.packed else batch.q_pos
        return create(config, embeds, attention_mask, cache, position_ids=position_ids,
                      or_mask_function=sinks, allow_is_causal_skip=skip)  # fmt: skip
    create = mu.create_bidirectional_sliding_window_mask if sliding else \
        mu.create_bidirectional_mask  # fmt: skip
    return create(config, embeds, attention_mask, cache=cache, or_mask_function=sinks,
                  allow_is_bidirectional_skip=skip)  # fmt: skip


def _extras(problem: AttentionProblem, batch: _Batch, *, sliding: bool) -> Any:
    """(B, 1 or Hq, Sq, S) booleans that no ``masking_utils`` function builds, to and with
    its mask: the problem's own mask in the padded slots (but for packed documents, whose
    mask transformers builds), and without causality a window or right reach that is not
    the symmetric one of the bidirectional sliding mask. None when there is nothing."""
    import torch

    keep = None
    if problem.mask is not None and not batch.packed:
        keep = _moved(problem, batch, as_torch(problem.mask, batch.k.device)).to(torch.bool)
    if not problem.causal and not sliding:
        query, key = batch.q_pos[:, None, :, None], batch.k_pos[:, None, None, :]
        reach = torch.ones(query.shape[:3] + key.shape[3:], dtype=torch.bool,
                           device=batch.k.device)  # fmt: skip
        if problem.window is not None:
            reach = reach & ((query - key < problem.window) | (key < problem.sink_tokens))
        if problem.window_right is not None:
            reach = reach & (key - query <= problem.window_right)
        if problem.window is not None or problem.window_right is not None:
            keep = reach if keep is None else keep & reach
    return keep


def _additive(problem: AttentionProblem, batch: _Batch, q: Any) -> Any:
    """(B, Hq, Sq, S) ALiBi and bias in the padded slots, at least float32, or None."""
    bias = (
        None if problem.bias is None else _moved(problem, batch, as_torch(problem.bias, q.device))
    )
    on_pads = replace(problem, bias=bias)
    return additive_terms(on_pads, q, batch.q_pos, batch.k_pos)


def _moved(problem: AttentionProblem, batch: _Batch, x: Any) -> Any:
    """(..., Sq, Sk) in the problem's slots -> (B, 1 or Hq, Sq, S) in the batch's slots."""
    import torch

    B, _, Sq, _ = problem.q.shape
    x = x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))  # broadcastable to (B, Hq, Sq, Sk)
    heads = x.shape[1]
    Sk = problem.k.shape[2]
    full = x.expand(B, heads, Sq, Sk)
    index = batch.slots[:, None, None, :].expand(B, heads, Sq, batch.slots.shape[1])
    if Sk == 0:  # every slot a pad: nothing to move
        return torch.zeros(index.shape, dtype=full.dtype, device=full.device)
    return torch.gather(full, -1, index)


def _sink_function(problem: AttentionProblem, batch: _Batch) -> Callable[..., Any]:
    """The ``or_mask_function`` that keeps the first ``sink_tokens`` keys of each row through
    the window (in slots: the keys after the row's pads), causal or within the right reach."""
    pads, sinks = batch.pads, problem.sink_tokens
    causal, right = problem.causal, problem.window_right

    def sink_keys(batch_idx: Any, head_idx: Any, q_idx: Any, kv_idx: Any) -> Any:
        keep = kv_idx - pads[batch_idx] < sinks
        if causal:
            keep = keep & (kv_idx <= q_idx)
        if right is not None:
            keep = keep & (kv_idx - q_idx <= right)
        return keep

    return sink_keys


def _attend(
    implementation: str, module: Any, q: Any, k: Any, v: Any, mask: Any, extras: Any,
    additive: Any, problem: AttentionProblem,
) -> tuple[Any, Any]:  # fmt: skip
    """One call of the implementation's attention function: its output (B, Sq, Hq, Dv) and
    the keys its mask keeps, (B, 1 or Hq, Sq, Skv) booleans (None: every query sees some)."""
    import torch

    if implementation == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        keep = mask if extras is None else extras if mask is None else mask & extras
        bias = None if additive is None else additive.to(q.dtype)
        out, _ = sdpa_attention_forward(module, q, k, v, keep, scaling=problem.scale,
                                        position_bias=bias)  # fmt: skip
        return out, keep
    if implementation == "eager":
        from transformers.models.llama.modeling_llama import eager_attention_forward

        lowest = torch.tensor(torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device)
        keep = None if mask is None else mask == 0
        if extras is not None:
            keep = extras if keep is None else keep & extras
        float_mask = None if keep is None else torch.where(keep, torch.zeros_like(lowest), lowest)
        if additive is not None:  # as an ALiBi model adds its bias to the mask
            bias = additive.to(q.dtype)
            float_mask = bias if float_mask is None else float_mask + bias
        out, _ = eager_attention_forward(module, q, k, v, float_mask, scaling=problem.scale)
        return out, keep
    from torch.nn.attention.flex_attention import create_mask
    from transformers.integrations.flex_attention import flex_attention_forward

    B, Hq, Sq, _ = q.shape
    keep = create_mask(mask.mask_mod, B, 1, Sq, k.shape[2], device=q.device)  # (B, 1, Sq, Skv)
    bias = additive  # float32, or float64 for float64 inputs: the scores' own precision
    if extras is not None:
        keep = keep & extras
        wide = torch.promote_types(q.dtype, torch.float32)
        room = torch.zeros((), dtype=wide, device=q.device) if bias is None else bias
        bias = torch.where(extras, room, -math.inf)
    if bias is not None:
        bias = bias.expand(B, Hq, Sq, k.shape[2])
    out, _ = flex_attention_forward(module, q, k, v, mask, scaling=problem.scale,
                                    softcap=problem.softcap, position_bias=bias)  # fmt: skip
    return out, keep


@contextlib.contextmanager
def _flex_uncompiled(on: bool) -> Iterator[None]:
    """Where ``on``: dynamo switched off (transformers' ``torch.compile`` of
    ``flex_attention`` and of ``create_block_mask`` then run the same functions
    eagerly) and FlexAttention's own eager switch on, their warnings about it silenced."""
    if not on:
        yield
        return
    import torch

    from refattn.testing.adapters.pytorch import _flex_attention_module, _uncompiled

    flex = _flex_attention_module()
    with torch._dynamo.config.patch(disable=True), _uncompiled(flex), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_FLEX_EAGER_WARNING, category=UserWarning)
        warnings.filterwarnings("ignore", message=_BLOCK_MASK_COMPILE_WARNING,
                                category=DeprecationWarning)  # fmt: skip
        yield


def _attention_module(torch: Any, *, groups: int, causal: bool) -> Any:
    """What transformers' attention functions read of the layer calling them: its query heads
    per KV head, whether it is causal (sdpa's ``is_causal`` when the mask is skipped),
    eval mode."""
    module = torch.nn.Module()
    module.num_key_value_groups = groups
    module.is_causal = causal
    return module.eval()


# -- probes: transformers' conventions, measured by calling it directly ----------------------


def _library_attention(implementation: str) -> Callable[..., Any]:
    """transformers' attention function of ``implementation``."""
    if implementation == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    if implementation == "eager":
        from transformers.models.llama.modeling_llama import eager_attention_forward

        return eager_attention_forward
    from transformers.integrations.flex_attention import flex_attention_forward

    return flex_attention_forward


def _probe(implementation: str) -> dict[str, str]:
    """What transformers' ``implementation`` does, called as a model calls it, on
    :func:`~refattn.testing.conformance.probes.one_hot_inputs`: the queries after two cached
    keys, a query whose only key is a pad, a sliding window of 2, and the float16 overflow
    of an unscaled product."""
    require("torch")
    require("transformers")
    import torch
    import transformers
    from transformers import masking_utils as mu

    attend = _library_attention(implementation)

    def tensors(*arrays: np.ndarray) -> list[Any]:
        return [torch.from_numpy(np.ascontiguousarray(x))[None, None] for x in arrays]

    def call(q: Any, k: Any, v: Any, mask: Any, *, causal: bool, scale: float = 1.0) -> Any:
        module = _attention_module(torch, groups=1, causal=causal)
        out, _ = attend(module, q, k, v, mask, scaling=scale)
        return out[0, :, 0].float().numpy()  # (Sq, Dv)

    config = _config(implementation, window=None, sliding_layer=False)
    found: dict[str, str] = {"lse": "not returned"}
    with _flex_uncompiled(implementation == "flex_attention"):
        q, k, v = tensors(*one_hot_inputs(q_len=2, k_len=4))
        cache = transformers.DynamicCache(config=config)
        cache.update(k[:, :, :2], v[:, :, :2], 0)
        mask = mu.create_causal_mask(config, torch.zeros(1, 2, 1), None, cache)
        k_all, v_all = cache.update(k[:, :, 2:], v[:, :, 2:], 0)
        found["alignment"] = alignment_of(seen(call(q, k_all, v_all, mask, causal=True)), k_len=4)
        q, k, v = tensors(*one_hot_inputs(q_len=2, k_len=2))
        padding = torch.tensor([[0, 1]])
        mask = mu.create_causal_mask(config, torch.zeros(1, 2, 1), padding, None)
        row = call(q, k, v, mask, causal=True)[0]
        found["empty_row"] = empty_row_of(row, np.eye(2))
        windowed = _config(implementation, window=2, sliding_layer=False)
        q, k, v = tensors(*one_hot_inputs(q_len=4, k_len=4))
        mask = mu.create_sliding_window_causal_mask(windowed, torch.zeros(1, 4, 1), None, None,
                                                    allow_is_causal_skip=False)  # fmt: skip
        keys = seen(call(q, k, v, mask, causal=True))[3]
        found["window"] = f"sliding_window=2 keeps {reach_of(keys, 3)}"
        q16, k16, v16, scale = overflow_inputs()
        q, k, v = (x.to(torch.float16) for x in tensors(q16, k16, v16))
        found["scores"] = scores_of(call(q, k, v, None, causal=False, scale=scale))
    return found


def _probe_sdpa() -> dict[str, str]:
    return _probe("sdpa")


def _probe_eager() -> dict[str, str]:
    return _probe("eager")


def _probe_flex() -> dict[str, str]:
    return _probe("flex_attention")


#: What the three adapters express: every default feature but softcap (sdpa and eager raise
#: on it) and the lse (none returns it on a CPU), and every added option but sink logits.
_FEATURES = ("causal", "gqa", "positions", "empty_slots", "ragged", "window", "alibi", "long",
             "tiles", "large_logits", "mask", "tree_mask", "document_mask", "prefix_lm", "bias",
             "two_sided_window", "sink_tokens")  # fmt: skip
#: What refattn cannot yet say about them.
_CANNOT_EXPRESS = (
    "attention dropout and output_attentions (the weights eager returns)",
    "chunked attention (create_chunked_causal_mask), block-wise bidirectional groups "
    "(block_sequence_ids) and masks sized against a StaticCache's full buffer",
    "the s_aux sinks and lse of flex_attention_forward, which run only off the CPU",
)

IMPLEMENTATIONS: tuple[Implementation, ...] = (
    Implementation(
        name="transformers sdpa_attention_forward",
        library="transformers",
        kind="attention",
        target=transformers_sdpa,
        dtypes=("float32", "float64", "float16", "bfloat16"),
        features=_FEATURES,
        requires=("torch", "transformers"),
        probe=_probe_sdpa,
        cannot_express=_CANNOT_EXPRESS,
    ),
    Implementation(
        name="transformers eager_attention_forward",
        library="transformers",
        kind="attention",
        target=transformers_eager,
        dtypes=("float32", "float64", "float16", "bfloat16"),
        features=_FEATURES,
        requires=("torch", "transformers"),
        probe=_probe_eager,
        cannot_express=_CANNOT_EXPRESS,
    ),
    Implementation(
        name="transformers flex_attention_forward",
        library="transformers",
        kind="attention",
        target=transformers_flex,
        dtypes=("float32", "float64", "float16", "bfloat16"),
        features=(*_FEATURES, "softcap"),
        requires=("torch", "transformers"),
        probe=_probe_flex,
        cannot_express=_CANNOT_EXPRESS,
    ),
)


def _window_of_one(failure: Failure) -> bool:
    """A causal window of 1 through a sliding cache layer (no sink tokens, which keep the
    full layer), answered wrong: the layer kept every past token."""
    spec = failure.outcome.spec
    return (failure.symptom == "wrong out" and getattr(spec, "causal", False)
            and getattr(spec, "window", None) == 1
            and not getattr(spec, "sink_tokens", 0))  # fmt: skip


DEFECTS: tuple[Defect, ...] = tuple(
    Defect(
        implementation=implementation.name,
        title="DynamicSlidingWindowLayer(sliding_window=1) keeps every past token, and the "
        "mask sized for one key broadcasts over all of them",
        matches=_window_of_one,
        reproducer="transformers_sliding_window_one.py",
        reference="transformers/cache_utils.py, DynamicSlidingWindowLayer.update: 'Only cache "
        "the last `self.sliding_window - 1` tokens', full_key_states[:, :, "
        "-self.sliding_window + 1 :, :], which is [-0:] (everything) for a window of 1; "
        "get_mask_sizes says kv_length = sliding_window - 1 + query_length",
        expected="with a window of 1 a query sees only its own key: its output is its own "
        "value, v[1] for the token at position 1",
    )
    for implementation in IMPLEMENTATIONS
)
