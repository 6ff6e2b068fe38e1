r"""flash-attn 2's backward as a candidate for
:func:`~refattn.testing.check_attention_backward` (CUDA, float16 and bfloat16).

``flash_attn_func`` and ``flash_attn_varlen_func`` are ``torch.autograd``
functions whose backward is flash-attn's own kernel (``FlashAttnFunc.backward``
calls ``_flash_attn_backward``, the CUDA ``bwd``; the varlen one ``varlen_bwd``).
Each adapter runs the forward adapter of :mod:`refattn.testing.adapters.flash`
on leaves that require gradients
(:func:`~refattn.testing.adapters.pytorch_backward.autograd_of`), so the
problem is said to flash-attn exactly as the forward check says it (bottom-right
positions or packed rows, ``window_size``, ``softcap``, ``alibi_slopes``,
``causal``, grouped KV heads, ``dropout_p`` left at 0), and asks
``torch.autograd.grad`` for the gradients of :math:`\sum \text{out} \cdot dO`.
What the forward adapter does around the call (moving to the GPU, the
sequence-first transposes, packing and unpacking the rows) is differentiable,
so the gradients come back in refattn's layout, on the problem's device; a key
slot a packed row drops gets a gradient of 0, as no query sees it.

``flash_attn_with_kvcache`` has no backward (it is inference only), so it has
no adapter here.

Precision (:data:`FLASH_BACKWARD`): the backward kernel
(``csrc/flash_attn/src/flash_bwd_kernel.h``) recomputes the scores and
:math:`P` in float32, converts :math:`P` to the input dtype for
:math:`dV = P^T dO` (``rP = convert_type<Element>(acc_s)``), forms
:math:`dP = dO\, V^T` and :math:`dS = P (dP - D)` in float32, and converts
:math:`dS` to the input dtype for the :math:`dQ` and :math:`dK` products
(``tdSrdS = convert_type<Element>(dS)``), which accumulate in float32: the
FlashAttention-2 backward :func:`~refattn.testing.precision.evaluate_backward`
models.
"""

from __future__ import annotations

from typing import Any

from refattn.testing.adapters import flash
from refattn.testing.adapters.pytorch_backward import autograd_of
from refattn.testing.backward_check import BACKWARD_FEATURES
from refattn.testing.candidate import AttentionProblem
from refattn.testing.precision import Precision

#: flash-attn 2's backward for float16 and bfloat16: scores, :math:`dP` and :math:`dS` in
#: float32; :math:`P` and :math:`dS` rounded to the input dtype as they enter the
#: gradient products, which accumulate in float32.
FLASH_BACKWARD = Precision(scores="float32", softmax="input", accumulator="float32")

#: What ``flash_attn_varlen_func``'s backward is checked on: its forward's features that a
#: backward check draws (all but the lse).
FLASH_VARLEN_BACKWARD_FEATURES = tuple(f for f in flash.FLASH_FEATURES if f in BACKWARD_FEATURES)
#: What ``flash_attn_func``'s backward is checked on: the same but the position layouts
#: (it knows no positions, only the default ones).
FLASH_BACKWARD_FEATURES = tuple(
    f for f in FLASH_VARLEN_BACKWARD_FEATURES if f not in ("positions", "empty_slots", "ragged")
)


def flash_attn_func_backward(problem: AttentionProblem) -> dict[str, Any]:
    """The gradients of :func:`~refattn.testing.adapters.flash.flash_attn_func` by
    ``torch.autograd``: flash-attn's backward kernel (CUDA, float16/bfloat16).

    Raises
    ------
    Unavailable
        Without flash_attn or CUDA.
    Unsupported
        For what :func:`~refattn.testing.adapters.flash.flash_attn_func` cannot say.
    """
    return autograd_of(flash.flash_attn_func, problem)


def flash_attn_varlen_func_backward(problem: AttentionProblem) -> dict[str, Any]:
    """The gradients of :func:`~refattn.testing.adapters.flash.flash_attn_varlen_func` by
    ``torch.autograd``: flash-attn's varlen backward kernel, through the packed rows.

    Raises
    ------
    Unavailable
        Without flash_attn or CUDA.
    Unsupported
        For what :func:`~refattn.testing.adapters.flash.flash_attn_varlen_func` cannot say.
    """
    return autograd_of(flash.flash_attn_varlen_func, problem)


for _adapter in (flash_attn_func_backward, flash_attn_varlen_func_backward):
    _adapter.precision = FLASH_BACKWARD  # type: ignore[attr-defined]
    _adapter.constraints = flash.FLASH_CONSTRAINTS  # type: ignore[attr-defined]
