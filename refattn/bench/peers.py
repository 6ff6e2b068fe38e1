"""The calls ``refattn bench`` times: the spec's paths, the fused CuPy kernel, the torch peers.

Each is built with everything but the call itself done already, so the timing
is the call. A backward is timed alone: the forward it needs runs once, when
its call is built (see :func:`make_backward_step`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import refattn
from refattn.bench.plan import BACKWARD_PATHS, FUSED, PEERS, SPEC_PATHS, Job


def make_step(
    job: Job, q: Any, k: Any, v: Any, dout: Any = None, *, block_q: int, block_k: int
) -> Callable[[], Any]:
    """The call to time, with everything but the call itself done already.

    ``dout`` (B, Hq, S, Dv), the gradient of the output, is for the backward mode only.
    """
    causal = job.shape.causal
    if job.shape.mode == "backward":
        return make_backward_step(job, q, k, v, dout, block_q=block_q, block_k=block_k)
    if job.implementation == "refattn.attention":
        return lambda: refattn.attention(q, k, v, causal=causal)
    if job.implementation == "refattn.attention_blockwise":
        return lambda: refattn.attention_blockwise(
            q, k, v, causal=causal, block_q=block_q, block_k=block_k
        )
    if job.implementation == FUSED:
        from refattn.backends.cupy_kernels.decode import decode_attention

        return lambda: decode_attention(q, k, v, causal=causal)
    if job.implementation == "torch SDPA":
        return torch_sdpa(q, k, v, causal=causal)
    if job.implementation == "torch matmul":
        return torch_matmul(q, k, v, causal=causal)
    raise ValueError(
        f"implementation must be one of {(*SPEC_PATHS, FUSED, *PEERS)}; got {job.implementation!r}"
    )


def make_backward_step(
    job: Job, q: Any, k: Any, v: Any, dout: Any, *, block_q: int, block_k: int
) -> Callable[[], tuple[Any, ...]]:
    """The backward to time, returning (dq, dk, dv), with its forward done already.

    Each side's backward gets what its own forward saved, as in training: the
    spec's paths the ``out`` and ``lse`` of :func:`refattn.attention` (or of
    :func:`refattn.attention_blockwise`, for the blockwise backward), the
    torch peers their autograd graph (see :func:`torch_backward`). Neither
    forward is in the timed call.
    """
    causal = job.shape.causal
    if job.implementation == "refattn.attention_backward":
        out, lse = refattn.attention(q, k, v, causal=causal, return_lse=True)

        def backward() -> tuple[Any, Any, Any]:
            g = refattn.attention_backward(q, k, v, dout, out=out, lse=lse, causal=causal)
            return g.dq, g.dk, g.dv

        return backward
    if job.implementation == "refattn.attention_backward_blockwise":
        blocks = {"block_q": block_q, "block_k": block_k}
        out, lse = refattn.attention_blockwise(q, k, v, causal=causal, return_lse=True, **blocks)

        def blockwise_backward() -> tuple[Any, Any, Any]:
            g = refattn.attention_backward_blockwise(
                q, k, v, dout, out=out, lse=lse, causal=causal, **blocks
            )
            return g.dq, g.dk, g.dv

        return blockwise_backward
    if job.implementation == "torch SDPA":
        return torch_backward(torch_sdpa, q, k, v, dout, causal=causal)
    if job.implementation == "torch matmul":
        return torch_backward(torch_matmul, q, k, v, dout, causal=causal)
    raise ValueError(
        f"a backward's implementation must be one of {(*BACKWARD_PATHS, *PEERS)}; "
        f"got {job.implementation!r}"
    )


def torch_backward(
    peer: Callable[..., Callable[[], Any]], q: Any, k: Any, v: Any, dout: Any, *, causal: bool
) -> Callable[[], tuple[Any, ...]]:
    """A torch peer's backward through its saved graph: dq, dk and dv of its output.

    The forward runs once, here, on leaves that require gradients; the timed
    call is ``torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)``,
    which keeps the graph so that the next call can walk it again.
    """
    import torch

    leaves = tuple(x.detach().requires_grad_() for x in (q, k, v))
    out = peer(*leaves, causal=causal)()
    return lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)


def torch_sdpa(q: Any, k: Any, v: Any, *, causal: bool) -> Callable[[], Any]:
    """PyTorch's fused attention; ``enable_gqa`` only where the heads differ."""
    from torch.nn.functional import scaled_dot_product_attention

    gqa = q.shape[1] != k.shape[1]
    return lambda: scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)


def torch_matmul(q: Any, k: Any, v: Any, *, causal: bool) -> Callable[[], Any]:
    """Attention as three plain torch calls: q k^T, softmax, times v.

    Grouped-query heads share K and V through a reshape of q, never a copy of
    K or V; the causal mask (bottom-right) is built here, once, outside the
    timed call.
    """
    import torch

    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    scale = 1 / math.sqrt(D)
    hidden = None
    if causal:
        ones = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
        hidden = torch.triu(ones, diagonal=Sk - Sq + 1)  # (Sq, Sk): key after the query

    def step() -> Any:
        grouped = q.reshape(B, Hkv, G * Sq, D)  # query head h = kv * G + g; a view
        s = (grouped * scale) @ k.transpose(-2, -1)  # (B, Hkv, G*Sq, Sk)
        if hidden is not None:
            s.view(B, Hkv, G, Sq, Sk).masked_fill_(hidden, -math.inf)
        p = torch.softmax(s, dim=-1)
        return (p @ v).reshape(B, Hq, Sq, Dv)  # (B, Hq, Sq, Dv)

    return step
