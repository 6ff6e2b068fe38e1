r"""PyTorch's attention backward as a candidate: SDPA per backend, and FlexAttention.

Each adapter runs its forward adapter of :mod:`refattn.testing.adapters.pytorch`
on leaf tensors that require gradients (q, k, v, and the problem's bias and
sink logits where it has them) and asks ``torch.autograd.grad`` for the
gradients of :math:`\sum \text{out} \cdot dO`, with the problem's ``dout``.
What the forward adapter builds from those leaves (the float mask that holds
the bias, the key of zeros scored :math:`\sigma_h` that is the sink) is
differentiable, so the bias's and the sink logits' gradients come back
through PyTorch's own backward of the mask: ``dbias`` is the gradient of the
problem's bias, not of a mask derived from it.

Rows with no visible key are set to 0 after the forward (refattn's
convention); under autograd that ``where`` passes a gradient of 0 to them,
so whatever a backend computed for such a row reaches no gradient only if
its own backward keeps it out.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from refattn.testing.adapters.libraries import require
from refattn.testing.adapters.pytorch import (
    FLEX_FEATURES,
    SDPA_FEATURES,
    _flex,
    torch_flex_attention_compiled,
    torch_sdpa,
    torch_sdpa_flash,
    torch_sdpa_math,
)
from refattn.testing.adapters.torch_masks import as_torch
from refattn.testing.candidate import AttentionProblem, Unavailable
from refattn.testing.precision import Precision

#: What dynamo warns, from inside torch, tracing a score_mod that captures a leaf tensor.
_NON_LEAF_GRAD = "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed"
#: The problem's arrays a gradient is taken of, and the name of each gradient.
LEAVES = {"q": "dq", "k": "dk", "v": "dv", "sink_logits": "dsink_logits", "bias": "dbias"}
#: What SDPA's backward is checked on: what its forward expresses.
SDPA_BACKWARD_FEATURES = SDPA_FEATURES
#: What FlexAttention's backward is checked on: its forward's features but the lse.
FLEX_BACKWARD_FEATURES = tuple(f for f in FLEX_FEATURES if f != "lse")


def torch_sdpa_backward(problem: AttentionProblem) -> dict[str, Any]:
    """The gradients of :func:`~refattn.testing.adapters.pytorch.torch_sdpa` (SDPA with the
    backend PyTorch picks) by ``torch.autograd``."""
    return autograd_of(torch_sdpa, problem)


def torch_sdpa_math_backward(problem: AttentionProblem) -> dict[str, Any]:
    """The gradients of SDPA with its math backend forced: the autograd of its composite."""
    return autograd_of(torch_sdpa_math, problem)


def torch_sdpa_flash_backward(problem: AttentionProblem) -> dict[str, Any]:
    """The gradients of SDPA with its flash backend forced: on the CPU, PyTorch's own tiled
    backward (``_scaled_dot_product_flash_attention_cpu_backward``)."""
    return autograd_of(torch_sdpa_flash, problem)


def torch_flex_attention_backward(problem: AttentionProblem) -> dict[str, Any]:
    """The gradients of FlexAttention run eagerly: its autograd operator's backward, the
    ``flex_attention_backward`` operator's dense implementation, which recomputes the
    scores through the same ``score_mod`` and ``mask_mod`` and takes their gradients.

    On the CPU, FlexAttention's public entry refuses inputs that require gradients
    (``_validate_device``, torch 2.13: "FlexAttention does not support backward on
    CPU"), although that backward runs there; the check is lifted for this call only
    (:func:`_cpu_backward_allowed`), and nothing else of FlexAttention is changed.
    """
    with _cpu_backward_allowed(problem):
        return autograd_of(_flex_traced, problem)


FLEX_BACKWARD = Precision(scores="float32", softmax="input", accumulator="float32")
"""What FlexAttention's eager backward rounds for float16 and bfloat16 inputs (float32 and
float64 are the spec's own policy): ``sdpa_dense_backward`` (torch 2.13,
``torch/_higher_order_ops/flex_attention.py``) recomputes the scores and their softmax in
float32, and casts the weights :math:`P` to the input dtype before :math:`dV = P^T dO` and
the score gradients :math:`dS` to it before :math:`dQ` and :math:`dK`: FlashAttention-2's
rounding, which :func:`~refattn.testing.precision.evaluate_backward` models."""
torch_flex_attention_backward.precision = FLEX_BACKWARD  # type: ignore[attr-defined]


def torch_flex_attention_compiled_backward(problem: AttentionProblem) -> dict[str, Any]:
    """The gradients of ``torch.compile(flex_attention)``: the backward kernel FlexAttention
    generates.

    Raises
    ------
    Unavailable
        On the CPU: torch 2.13 generates no backward kernel there (the public entry
        refuses it, and with that check lifted Inductor fails while lowering the
        backward, ``IndexError: tuple index out of range``). Run it on a GPU.
    """
    if not str(problem.device).startswith("cuda"):
        raise Unavailable(
            "FlexAttention has no compiled backward on the CPU (torch refuses inputs that "
            "require gradients there, and Inductor generates no CPU backward kernel)"
        )
    return autograd_of(torch_flex_attention_compiled, problem)


def _flex_traced(problem: AttentionProblem) -> Any:
    """:func:`~refattn.testing.adapters.pytorch.torch_flex_attention` through FlexAttention's
    own operator, whose autograd is its backward (the forward adapter's faster direct path
    takes no gradient to the bias or the sink logits its ``score_mod`` captures). Tracing
    a ``score_mod`` that captures a tensor which requires a gradient, dynamo reads that
    tensor's ``.grad`` itself and warns of it (torch 2.13); that warning alone is ignored."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NON_LEAF_GRAD, category=UserWarning)
        return _flex(problem, compiled=None, traced=True)


@contextlib.contextmanager
def _cpu_backward_allowed(problem: AttentionProblem) -> Iterator[None]:
    """FlexAttention's device check made to pass CPU inputs that require gradients, for the
    length of the block; on any other device, or a torch without that check, nothing."""
    require("torch")
    from torch.nn.attention import flex_attention as flex

    check = getattr(flex, "_validate_device", None)
    if check is None or str(problem.device).startswith("cuda"):
        yield
        return
    flex._validate_device = lambda query, key, value: None
    try:
        yield
    finally:
        flex._validate_device = check


def autograd_of(
    forward: Callable[[AttentionProblem], Any], problem: AttentionProblem
) -> dict[str, Any]:
    """``forward(problem)`` on leaves that require gradients, then ``torch.autograd.grad``
    with the problem's ``dout``: the gradient of every leaf, by its name in :data:`LEAVES`."""
    require("torch")
    import torch

    leaves = {}
    for name in LEAVES:
        x = getattr(problem, name)
        if x is not None:
            leaves[name] = as_torch(x).detach().clone().requires_grad_(True)
    out = forward(replace(problem, **leaves))
    dout = as_torch(problem.dout, out.device).to(out.dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), dout, allow_unused=True)
    return {
        LEAVES[name]: torch.zeros_like(leaf) if g is None else g
        for (name, leaf), g in zip(leaves.items(), grads, strict=True)
    }
