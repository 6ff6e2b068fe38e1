r"""A problem's visibility and additive terms as NumPy arrays, for adapters to libraries
that take NumPy inputs (ONNX Runtime, ``onnx.reference``, JAX).

The rule is refattn's (:func:`refattn.positions.visibility`), applied to the
problem's positions; what a library's own arguments can say of it is each
adapter's business.
"""

from __future__ import annotations

from typing import Any

import array_api_compat.numpy as xp_numpy
import numpy as np

from refattn.positions import visibility
from refattn.testing.candidate import AttentionProblem


def host(x: Any) -> np.ndarray:
    """``x`` as a NumPy array on the host (the problem's arrays, on any backend)."""
    if hasattr(x, "get"):  # CuPy
        return np.asarray(x.get())
    if hasattr(x, "detach"):  # torch
        return np.asarray(x.detach().cpu().numpy())
    return np.asarray(x)


def visible(problem: AttentionProblem) -> np.ndarray:
    """(B, 1 or Hq, Sq, Sk) booleans: the keys each query may see, the problem's mask kept."""
    q_pos, k_pos = host(problem.q_pos), host(problem.k_pos)
    keep = np.asarray(visibility(xp_numpy, q_pos, k_pos, causal=problem.causal,
                                 window=problem.window, sink_tokens=problem.sink_tokens,
                                 window_right=problem.window_right))[:, None]  # fmt: skip
    if problem.mask is not None:
        keep = keep & host(problem.mask).astype(bool)
    return keep


def additive(problem: AttentionProblem) -> np.ndarray | None:
    """(B, Hq, Sq, Sk) float64: ALiBi's :math:`-m_h |q^{pos} - k^{pos}|` plus the bias, or
    None for neither."""
    B, Hq, Sq, _ = problem.q.shape
    Sk = problem.k.shape[2]
    q_pos, k_pos = host(problem.q_pos), host(problem.k_pos)
    total = None
    if problem.alibi_slopes is not None:
        slopes = host(problem.alibi_slopes).astype(np.float64).reshape(-1, Hq, 1, 1)
        distance = np.abs(q_pos[:, :, None] - k_pos[:, None, :]).astype(np.float64)
        total = -slopes * distance[:, None]  # (B, Hq, Sq, Sk)
    if problem.bias is not None:
        bias = host(problem.bias).astype(np.float64)
        total = bias if total is None else total + bias
    return None if total is None else np.broadcast_to(total, (B, Hq, Sq, Sk))


def with_sink_key(
    problem: AttentionProblem, k: np.ndarray, v: np.ndarray, keep: np.ndarray,
    terms: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    r"""``k``, ``v`` with one more slot of zeros, seen by every query and scored
    :math:`\sigma_h` by the additive terms: the sink logit as a key (its value adds
    nothing to the output, its weight joins the denominator)."""
    B, Hq, Sq = k.shape[0], problem.q.shape[1], keep.shape[2]
    Sk = k.shape[2]
    pad = ((0, 0), (0, 0), (0, 1), (0, 0))
    k, v = np.pad(k, pad), np.pad(v, pad)  # (B, Hkv, Sk + 1, D)
    keep = np.pad(np.broadcast_to(keep, (B, keep.shape[1], Sq, Sk)),
                  ((0, 0), (0, 0), (0, 0), (0, 1)), constant_values=True)  # fmt: skip
    base = np.zeros((B, Hq, Sq, Sk)) if terms is None else terms
    sink = host(problem.sink_logits).astype(np.float64).reshape(1, Hq, 1, 1)
    terms = np.concatenate([base, np.broadcast_to(sink, (B, Hq, Sq, 1))], axis=-1)
    return k, v, keep, terms
