r"""Attention backward kernels with one realistic bug each, and correct ones written differently.

Every wrong kernel here is :func:`textbook_backward` with one step changed
the way kernel authors get it wrong. The textbook recomputes the forward's
:math:`P = e^{s - \text{lse}}` from the saved lse and takes the chain rule a
step at a time, as FlashAttention-2's backward does:

.. math::

    D_i = dO_i \cdot o_i, \quad dV = P^T dO, \quad dP = dO\, V^T, \quad
    dS = P \odot (dP - D), \quad dT = dS \odot (1 - \tanh^2(t / c)), \\
    dQ = \text{scale}\, dT\, K, \quad dK = \text{scale}\, dT^T Q, \quad
    d\sigma_h = -\textstyle\sum_i e^{\sigma_h - \text{lse}_i} D_i, \quad
    d\text{bias} = dS,

with :math:`dK` and :math:`dV` of a KV head summed over the query heads of
its group. ``check_attention_backward`` must fail every wrong one (with the
features and dtypes its bug needs: :data:`FEATURES`, :data:`WRONG`) and pass
the correct ones. ``refattn verify`` checks forwards; point
``check_attention_backward`` at one of these to see a backward's failure
report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

import refattn
from refattn.backends import to_numpy
from refattn.backends.base import round_to
from refattn.testing.adapters.libraries import require
from refattn.testing.backward_check import BACKWARD_FEATURES, DEFAULT_BACKWARD_FEATURES
from refattn.testing.candidate import AttentionProblem
from refattn.testing.known_bugs.attention import Visible, positions_visible

NamedGradients = dict[str, np.ndarray | None]


def row_dot(dout: np.ndarray, out: np.ndarray) -> np.ndarray:
    """:math:`D_i = dO_i \\cdot o_i`, (B, Hq, Sq, 1)."""
    return np.sum(dout * out, axis=-1, keepdims=True)


def summed_over_group(g: np.ndarray, kv_heads: int) -> np.ndarray:
    """A gradient per query head, (B, Hq, Sk, Dx), summed over each KV head's group:
    (B, Hkv, Sk, Dx)."""
    B, Hq, Sk, Dx = g.shape
    return g.reshape(B, kv_heads, Hq // kv_heads, Sk, Dx).sum(axis=2)


def summed_to(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The gradient ``g`` (B, Hq, Sq, Sk) of an array of ``shape`` broadcast to it: summed
    over every axis the array had as 1 or did not have."""
    full = (1,) * (g.ndim - len(shape)) + shape
    axes = tuple(a for a in range(g.ndim) if full[a] == 1 and g.shape[a] != 1)
    return g.sum(axis=axes, keepdims=True).reshape(shape)


def per_kv_head(rows: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Each query head's ``rows``, (B, Hq, Sq, X), times its KV head's ``m``, (B, Hkv, X, Y),
    with the G query heads of a group stacked as the rows of one product: (B, Hq, Sq, Y)."""
    B, Hq, Sq, X = rows.shape
    Hkv = m.shape[1]
    grouped = rows.reshape(B, Hkv, Hq // Hkv * Sq, X) @ m  # (B, Hkv, G * Sq, Y)
    return grouped.reshape(B, Hq, Sq, m.shape[-1])


def _kept(lse: np.ndarray) -> np.ndarray:
    return lse


def textbook_backward(
    p: AttentionProblem,
    *,
    delta_of: Callable[[np.ndarray, np.ndarray], np.ndarray] = row_dot,
    softcap_factor: bool = True,
    kv_gradient: Callable[[np.ndarray, int], np.ndarray] = summed_over_group,
    saved_lse: Callable[[np.ndarray], np.ndarray] = _kept,
    backward_visible: Visible = positions_visible,
    sink_sign: float = -1.0,
) -> NamedGradients:
    """The forward, then its gradients step by step, in float32 (float64 for float64
    problems), as users write a backward in NumPy.

    Each keyword is a step where a backward goes wrong; the defaults are right.
    ``delta_of(dout, out)`` gives each row's D, (B, Hq, Sq, 1); ``softcap_factor``
    whether dS is taken through :math:`\\tanh' = 1 - \\tanh^2`; ``kv_gradient(g, Hkv)``
    makes dK and dV, (B, Hkv, Sk, Dx), from the per-query-head ones, (B, Hq, Sk, Dx);
    ``saved_lse`` is what is done to the forward's lse, (B, Hq, Sq, 1), when it is saved;
    ``backward_visible`` the visibility P is recomputed with; ``sink_sign`` the sign of
    the sink logits' gradient.
    """
    acc = np.float64 if p.dtype == "float64" else np.float32
    q, k, v, dout = (to_numpy(x).astype(acc) for x in (p.q, p.k, p.v, p.dout))
    q_pos, k_pos = to_numpy(p.q_pos).astype(np.int64), to_numpy(p.k_pos).astype(np.int64)
    Hq, Hkv = q.shape[1], k.shape[1]
    k_h, v_h = np.repeat(k, Hq // Hkv, axis=1), np.repeat(v, Hq // Hkv, axis=1)  # (B, Hq, Sk, D)
    kept = np.ones((1, 1, 1, 1), dtype=bool)
    if p.mask is not None:
        kept = to_numpy(p.mask).astype(bool)  # broadcastable to (B, Hq, Sq, Sk)

    # The scores: t = scale q.k, c = softcap(t), s = c - slope |q_pos - k_pos| + bias.
    t = acc(p.scale) * (q @ np.swapaxes(k_h, -1, -2))  # (B, Hq, Sq, Sk)
    capped = t if p.softcap is None else acc(p.softcap) * np.tanh(t / acc(p.softcap))
    s = capped
    if p.alibi_slopes is not None:
        slopes = to_numpy(p.alibi_slopes).astype(acc).reshape(-1, Hq, 1, 1)
        distance = np.abs(q_pos[:, :, None] - k_pos[:, None, :])[:, None]  # (B, 1, Sq, Sk)
        s = s - slopes * distance.astype(acc)
    if p.bias is not None:
        s = s + to_numpy(p.bias).astype(acc)
    sink = None
    if p.sink_logits is not None:
        sink = to_numpy(p.sink_logits).astype(acc).reshape(1, Hq, 1, 1)

    # The forward: lse over the visible keys (and the sink), out = P V.
    seen = positions_visible(q_pos, k_pos, p)[:, None] & kept  # (B, Hq, Sq, Sk)
    masked = np.where(seen, s, -np.inf)
    m = masked.max(axis=-1, keepdims=True, initial=-np.inf)  # (B, Hq, Sq, 1)
    if sink is not None:
        m = np.maximum(m, sink)
    m = np.where(np.isfinite(m), m, 0)  # an empty row: every e^-inf stays 0
    e = np.exp(masked - m)
    z = e.sum(axis=-1, keepdims=True)  # (B, Hq, Sq, 1)
    if sink is not None:
        z = z + np.exp(sink - m)
    with np.errstate(divide="ignore"):  # log 0 = -inf: the lse of a row that sees nothing
        lse = np.log(z) + m  # (B, Hq, Sq, 1)
    out = (e @ v_h) / np.where(z > 0, z, 1)  # (B, Hq, Sq, Dv)

    # The backward: P recomputed from the saved lse, then the chain rule.
    lse = saved_lse(lse)
    seen = backward_visible(q_pos, k_pos, p)[:, None] & kept
    weights = np.exp(np.where(seen, s, -np.inf) - np.where(lse == -np.inf, 0, lse))  # P
    delta = delta_of(dout, out)  # D = rowsum(dO * O), (B, Hq, Sq, 1)
    dv = weights.swapaxes(-1, -2) @ dout  # dV = P^T dO, (B, Hq, Sk, Dv)
    # dP - D cancels on a row whose weight sits on one key (o = v_j there), and dQ and dK
    # carry its rounding times |K|. dP is one product per KV head, as the spec forms it:
    # check_attention_backward's allowance does not yet take the products per query head
    # of V repeated, which can round it otherwise (tests/test_backward_verifier.py).
    dp = per_kv_head(dout, v.swapaxes(-1, -2))  # dP = dO V^T, (B, Hq, Sq, Sk)
    ds = np.where(seen, weights * (dp - delta), 0)  # dS = P (dP - D)
    dt = ds
    if p.softcap is not None and softcap_factor:
        dt = ds * (1 - (capped / acc(p.softcap)) ** 2)  # through c tanh(t / c)
    dq = acc(p.scale) * (dt @ k_h)  # dQ = scale dT K, (B, Hq, Sq, D)
    dk = acc(p.scale) * (dt.swapaxes(-1, -2) @ q)  # dK = scale dT^T Q, (B, Hq, Sk, D)
    grads: NamedGradients = {"dq": dq, "dk": kv_gradient(dk, Hkv), "dv": kv_gradient(dv, Hkv),
                        "dsink_logits": None, "dbias": None}  # fmt: skip
    if sink is not None:
        sink_weight = np.exp(sink - lse)  # its weight in each row, (B, Hq, Sq, 1)
        grads["dsink_logits"] = sink_sign * np.sum(sink_weight * delta, axis=(0, 2, 3))  # (Hq,)
    if p.bias is not None:
        grads["dbias"] = summed_to(ds, tuple(p.bias.shape))  # dbias = dS
    return grads


def _options(p: AttentionProblem) -> dict[str, Any]:
    """The problem's options for refattn's backward, which takes no ``return_lse``."""
    return {name: x for name, x in p.options().items() if name != "return_lse"}


def blockwise_backward(p: AttentionProblem) -> refattn.Gradients:
    """Correct: refattn's blockwise forward, its out and lse saved, then FlashAttention-2's
    backward loop, in blocks of 5 queries and an odd number of keys (7, or more for long
    rows: at most 16 key blocks)."""
    options = _options(p)
    Sk = p.k.shape[2]
    block_k = max(7, -(-Sk // 16) | 1)
    out, lse = refattn.attention_blockwise(p.q, p.k, p.v, **options, return_lse=True,
                                           block_q=5, block_k=block_k)  # fmt: skip
    return refattn.attention_backward_blockwise(p.q, p.k, p.v, p.dout, out=out, lse=lse,
                                                block_q=5, block_k=block_k, **options)  # fmt: skip


def autograd_backward(p: AttentionProblem) -> NamedGradients:
    """Correct: ``torch.autograd`` through :func:`refattn.attention` on torch tensors of
    the problem's dtype (float16 and bfloat16 computed in float32 inside, as the forward
    does); the gradients of the loss :math:`\\sum o \\odot dO`. Unavailable without torch."""
    require("torch")
    import torch

    dtype = getattr(torch, p.dtype)

    def tensor(x: Any, *, leaf: bool = False) -> Any:
        array = to_numpy(x)
        if array.dtype.kind in "biu":  # positions and masks keep their dtype
            return torch.tensor(array)
        return torch.tensor(array.astype(np.float64), dtype=dtype, requires_grad=leaf)

    options = _options(p)
    leaves = {name: tensor(getattr(p, name), leaf=True) for name in ("q", "k", "v")}
    for name in ("bias", "sink_logits"):
        if options[name] is not None:
            leaves[name] = options[name] = tensor(options[name], leaf=True)
    for name in ("q_pos", "k_pos", "alibi_slopes", "mask"):
        if options[name] is not None:
            options[name] = tensor(options[name])
    out = refattn.attention(leaves["q"], leaves["k"], leaves["v"], **options)
    found = torch.autograd.grad(out, list(leaves.values()), grad_outputs=tensor(p.dout),
                                allow_unused=True)  # fmt: skip
    named = {"q": "dq", "k": "dk", "v": "dv", "bias": "dbias", "sink_logits": "dsink_logits"}
    grads: NamedGradients = dict.fromkeys(named.values())
    for name, g in zip(leaves, found, strict=True):
        zero = torch.zeros_like(leaves[name])
        grads[named[name]] = (zero if g is None else g).detach().to(torch.float64).numpy()
    return grads


# -- the wrong ones ------------------------------------------------------------


def delta_of_previous_row(p: AttentionProblem) -> NamedGradients:
    """Reads D one row back: the row pointer into the saved D is off by one, so query row i
    gets :math:`D_{i-1}` (and the first row of all, the last one's)."""

    def shifted(dout: np.ndarray, out: np.ndarray) -> np.ndarray:
        delta = row_dot(dout, out)
        return np.roll(delta.reshape(-1), 1).reshape(delta.shape)

    return textbook_backward(p, delta_of=shifted)


def softcap_factor_left_out(p: AttentionProblem) -> NamedGradients:
    """Takes dS straight to dQ and dK: the softcap's :math:`1 - \\tanh^2(t / c)` is left out
    of the chain rule (the forward soft-caps correctly)."""
    return textbook_backward(p, softcap_factor=False)


def gqa_first_head_only(p: AttentionProblem) -> NamedGradients:
    """Repeats K and V to every query head, then keeps the gradient of the first copy of
    each (``dk[:, ::G]``) instead of summing the group's: dK and dV from head g = 0 alone."""

    def first_of_group(g: np.ndarray, kv_heads: int) -> np.ndarray:
        return g[:, :: g.shape[1] // kv_heads]

    return textbook_backward(p, kv_gradient=first_of_group)


def lse_saved_in_input_dtype(p: AttentionProblem) -> NamedGradients:
    """Saves the forward's lse in the input dtype (float16 or bfloat16) rather than float32,
    so P recomputed from it is off by :math:`e^{\\Delta \\text{lse}}`: a large lse (large
    logits, long rows) loses most of its digits. One rounded down by more than 88 makes P
    overflow float32; one past float16's range is saved as inf, which leaves its row no
    weight at all."""

    def saved(lse: np.ndarray) -> np.ndarray:
        return round_to(lse, p.dtype).astype(lse.dtype)

    with np.errstate(over="ignore", invalid="ignore"):  # an lse or P out of range: the bug
        return textbook_backward(p, saved_lse=saved)


def backward_causal_excludes_diagonal(p: AttentionProblem) -> NamedGradients:
    """The backward's own causal mask is ``k_pos < q_pos`` (the forward's is right): P is
    recomputed without each query's own key, which the forward gave weight to."""

    def visible(q_pos: np.ndarray, k_pos: np.ndarray, p: AttentionProblem) -> np.ndarray:
        keep = positions_visible(q_pos, k_pos, replace(p, causal=False))
        return keep & (k_pos[:, None, :] < q_pos[:, :, None]) if p.causal else keep

    return textbook_backward(p, backward_visible=visible)


def sink_gradient_sign_flipped(p: AttentionProblem) -> NamedGradients:
    """:math:`d\\sigma_h = +\\sum_i e^{\\sigma_h - \\text{lse}_i} D_i`: the sink's gradient
    without its minus sign (the sink enlarges the denominator, so it takes weight away)."""
    return textbook_backward(p, sink_sign=1.0)


#: Each wrong backward, with the dtypes its bug shows in.
WRONG: dict[str, tuple[Callable[[AttentionProblem], Any], tuple[str, ...]]] = {
    f.__name__: (f, dtypes)
    for f, dtypes in (
        (delta_of_previous_row, ("float32",)),
        (softcap_factor_left_out, ("float32",)),
        (gqa_first_head_only, ("float32",)),
        (lse_saved_in_input_dtype, ("float16", "bfloat16")),
        (backward_causal_excludes_diagonal, ("float32",)),
        (sink_gradient_sign_flipped, ("float32",)),
    )
}
#: What a wrong backward's check draws when it is not the default features: its bug is in
#: handling something a backward need not take by default.
FEATURES: dict[str, frozenset[str]] = {
    "sink_gradient_sign_flipped": DEFAULT_BACKWARD_FEATURES | {"sink_logits"},
}
#: Every feature the correct backwards take: all a backward check draws but NaN planted in
#: unseen slots.
EVERY_BACKWARD_OPTION = frozenset(BACKWARD_FEATURES) - {"unseen_nan"}
#: Correct backwards written differently from the spec's.
CORRECT: dict[str, Callable[[AttentionProblem], Any]] = {
    f.__name__: f for f in (textbook_backward, blockwise_backward, autograd_backward)
}
