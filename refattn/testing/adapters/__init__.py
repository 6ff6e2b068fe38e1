r"""Third-party attention kernels as candidates for ``check_attention``: PyTorch SDPA and
FlexAttention, transformers, JAX, ONNX's Attention operator, flash-attn.

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
``onnx_attention_24``              any positions (``is_causal`` and     the lse; zero keys; a
(and opsets 23, 25; in-op;         ``nonpad_kv_seqlen`` where they say  float64 scale or softcap
``onnx_reference_attention_*``)    them, a mask otherwise), GQA,        that is no float32
                                   masks, bias, ALiBi, softcap, sinks
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

The gradients of ``flash_attn_func`` and ``flash_attn_varlen_func`` (flash-attn's
backward kernels, by ``torch.autograd``) are ``flash_attn_func_backward`` and
``flash_attn_varlen_func_backward``
(:mod:`~refattn.testing.adapters.flash_backward`), candidates for
:func:`~refattn.testing.check_attention_backward`: they express what their
forward does, less the lse.

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

from refattn.testing.adapters.flash import (
    FLASH_CONSTRAINTS,
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    flash_attn_with_kvcache_in_op,
    flash_attn_with_kvcache_paged,
)
from refattn.testing.adapters.flash_backward import (
    flash_attn_func_backward,
    flash_attn_varlen_func_backward,
)
from refattn.testing.adapters.hf import transformers_eager, transformers_sdpa
from refattn.testing.adapters.pytorch import torch_flex_attention, torch_sdpa

__all__ = [
    "FLASH_CONSTRAINTS",
    "flash_attn_func",
    "flash_attn_func_backward",
    "flash_attn_varlen_func",
    "flash_attn_varlen_func_backward",
    "flash_attn_with_kvcache",
    "flash_attn_with_kvcache_in_op",
    "flash_attn_with_kvcache_paged",
    "torch_flex_attention",
    "torch_sdpa",
    "transformers_eager",
    "transformers_sdpa",
]
