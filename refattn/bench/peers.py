"""The calls ``refattn bench`` times: the spec's paths, the fused CuPy kernel, the torch peers.

Each is built with everything but the call itself done already, so the timing
is the call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import refattn
from refattn.bench.plan import FUSED, PEERS, SPEC_PATHS, Job


def make_step(job: Job, q: Any, k: Any, v: Any, *, block_q: int, block_k: int) -> Callable[[], Any]:
    """The call to time, with everything but the call itself done already."""
    causal = job.shape.causal
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
