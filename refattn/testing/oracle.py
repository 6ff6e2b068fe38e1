"""The independent loop oracle: attention as plain per-query loops in float64.

``refattn verify`` and the test suite hold the spec against it; users may hold
their own kernels against it too.

This module restates the attention contract of refattn as plain per-query loops
in float64 NumPy. It deliberately shares no code with refattn and uses no
vectorised tricks: for every batch row, query head and query it walks the keys
one by one, skips the invisible ones entirely, scores the visible ones, and
takes a two-pass (max, then sum) softmax. It imports only :mod:`math` and
:mod:`numpy`, so that a bug in the vectorised implementation cannot be
reproduced here by shared code.

The contract, in the order it is applied to a visible pair (query ``i``, key
``j``) of batch row ``b`` and query head ``h`` (KV head ``h // (Hq // Hkv)``):

1. ``s = scale * dot(q[b, h, i], k[b, hk, j])``, ``scale`` defaulting to ``1 / sqrt(D)``;
2. softcap ``c``: ``s = c * tanh(s / c)``;
3. ALiBi: ``s -= slope[b, h] * |q_pos[b, i] - k_pos[b, j]|``;
4. additive bias: ``s += bias[b, h, i, j]``;
5. invisible keys (mask False, causal, window unless ``k_pos < sink_tokens``,
   more than ``window_right`` positions after the query, ``k_pos < 0``) are dropped;
6. a per-head sink logit joins the softmax denominator but carries no value.

Then ``Z = sum_j exp(s_j) (+ exp(sink_h))``, ``out = sum_j exp(s_j) / Z * v_j``
and ``lse = log(Z)``. A row with nothing in its denominator gives ``out = 0`` and
``lse = -inf``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["oracle_attention"]


def _to_float64(x: Any, name: str) -> npt.NDArray[np.float64]:
    """Convert an array of any float dtype (bfloat16 included) to float64.

    Parameters
    ----------
    x : array_like
        The input array.
    name : str
        Its name, for error messages.

    Returns
    -------
    numpy.ndarray
        A float64 copy of ``x``.
    """
    arr = np.asarray(x)
    try:
        return arr.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} cannot be converted to float64 (dtype {arr.dtype})") from exc


def _positions(pos: Any, batch: int, length: int, default: list[int], name: str) -> list[list[int]]:
    """Normalise a position argument to a ``batch x length`` list of Python ints.

    Parameters
    ----------
    pos : array_like or None
        Positions of shape ``(length,)``, ``(1, length)`` or ``(batch, length)``,
        of an integer dtype; None selects ``default`` for every batch row.
    batch : int
        Number of batch rows.
    length : int
        Number of positions per row.
    default : list of int
        The default positions of one row, used when ``pos`` is None.
    name : str
        The argument's name, for error messages.

    Returns
    -------
    list of list of int
        ``result[b][t]`` is the position of slot ``t`` in batch row ``b``.
    """
    if pos is None:
        return [list(default) for _ in range(batch)]
    arr = np.asarray(pos)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must have an integer dtype, got {arr.dtype}")
    if arr.ndim == 1:
        if arr.shape != (length,):
            raise ValueError(f"{name} has shape {arr.shape}, expected ({length},)")
        rows = [arr.tolist() for _ in range(batch)]
    elif arr.ndim == 2:
        if arr.shape[1] != length or arr.shape[0] not in (1, batch):
            raise ValueError(
                f"{name} has shape {arr.shape}, expected (1, {length}) or ({batch}, {length})"
            )
        if arr.shape[0] == 1:
            rows = [arr[0].tolist() for _ in range(batch)]
        else:
            rows = [arr[b].tolist() for b in range(batch)]
    else:
        raise ValueError(f"{name} must be 1-D or 2-D, got shape {arr.shape}")
    return [[int(p) for p in row] for row in rows]


def oracle_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    q_pos: Any = None,
    k_pos: Any = None,
    mask: Any = None,
    bias: Any = None,
    scale: float | None = None,
    window: int | None = None,
    sink_tokens: int = 0,
    softcap: float | None = None,
    alibi_slopes: Any = None,
    sink_logits: Any = None,
    return_weights: bool = False,
    window_right: int | None = None,
) -> Any:
    """Attention computed one query and one key at a time, in float64.

    Parameters
    ----------
    q : array_like
        Queries, shape ``(B, Hq, Sq, D)``, any float dtype.
    k : array_like
        Keys, shape ``(B, Hkv, Sk, D)``; ``Hq`` must be a multiple of ``Hkv``.
    v : array_like
        Values, shape ``(B, Hkv, Sk, Dv)``.
    causal : bool, optional
        If True, key ``j`` is visible to query ``i`` only when
        ``k_pos[j] <= q_pos[i]``.
    q_pos : array_like of int, optional
        Absolute query positions, shape ``(B, Sq)``, ``(1, Sq)`` or ``(Sq,)``.
        Defaults to ``Sk - Sq + i`` (bottom-right alignment).
    k_pos : array_like of int, optional
        Absolute key positions, shape ``(B, Sk)``, ``(1, Sk)`` or ``(Sk,)``.
        Defaults to ``j``. A slot with a negative position holds no key.
    mask : array_like of bool, optional
        Broadcastable to ``(B, Hq, Sq, Sk)``; False makes a key invisible.
    bias : array_like, optional
        Additive score bias broadcastable to ``(B, Hq, Sq, Sk)``.
    scale : float, optional
        Score scale; defaults to ``1 / sqrt(D)``.
    window : int, optional
        If given, a key is visible only when ``q_pos[i] - k_pos[j] < window``.
    sink_tokens : int, optional
        With a window, keys at positions below ``sink_tokens`` stay visible
        however far back they are (attention sinks, StreamingLLM).
    window_right : int, optional
        If given, a key is visible only when ``k_pos[j] - q_pos[i] <= window_right``
        (the reach forward; with ``window``, a two-sided window).
    softcap : float, optional
        If given, scores become ``softcap * tanh(score / softcap)``.
    alibi_slopes : array_like, optional
        Per-head slopes, shape ``(Hq,)`` or ``(B, Hq)``; subtracts
        ``slope * |q_pos[i] - k_pos[j]|`` from each score.
    sink_logits : array_like, optional
        Per-head sink logits, shape ``(Hq,)``, which join the softmax
        denominator but contribute no value.
    return_weights : bool, optional
        Also return the softmax weights, shape ``(B, Hq, Sq, Sk)``, 0 for an
        invisible key (the tolerance rules use them).

    Returns
    -------
    out : numpy.ndarray
        float64 array of shape ``(B, Hq, Sq, Dv)``.
    lse : numpy.ndarray
        float64 array of shape ``(B, Hq, Sq)``: the natural log of each row's
        softmax denominator (``-inf`` for a row with no visible key and no sink).
    weights : numpy.ndarray
        Only with ``return_weights``: float64 ``(B, Hq, Sq, Sk)``.

    Examples
    --------
    >>> import numpy as np
    >>> q = np.zeros((1, 1, 1, 2))
    >>> k = np.zeros((1, 1, 3, 2))
    >>> v = np.arange(6.0).reshape(1, 1, 3, 2)
    >>> out, lse = oracle_attention(q, k, v)
    >>> out.tolist()
    [[[[2.0, 3.0]]]]
    >>> round(float(lse[0, 0, 0]), 6)
    1.098612
    """
    call = _read_call(
        q, k, v, causal=causal, q_pos=q_pos, k_pos=k_pos, mask=mask, bias=bias, scale=scale,
        window=window, sink_tokens=sink_tokens, softcap=softcap, alibi_slopes=alibi_slopes,
        sink_logits=sink_logits, window_right=window_right,
    )  # fmt: skip
    n_batch, n_qheads, n_queries, _ = call.q.shape
    n_keys, d_v = call.v.shape[2], call.v.shape[3]
    out = np.zeros((n_batch, n_qheads, n_queries, d_v), dtype=np.float64)
    probs = np.zeros((n_batch, n_qheads, n_queries, n_keys), dtype=np.float64)
    lse = np.empty((n_batch, n_qheads, n_queries), dtype=np.float64)
    # inf/NaN in *visible* inputs are allowed to propagate; silence the
    # floating-point warnings NumPy would raise while they do.
    with np.errstate(all="ignore"):
        for b in range(n_batch):
            for h in range(n_qheads):
                for i in range(n_queries):
                    visible, scores = _visible_scores(call, b, h, i)
                    out[b, h, i], lse[b, h, i], weights = _softmax_row(call, b, h, visible, scores)
                    probs[b, h, i, visible] = weights
    if return_weights:
        return out, lse, probs
    return out, lse


@dataclass(frozen=True)
class _Call:
    """The inputs of one oracle call, checked, in float64, every optional one broadcast."""

    q: npt.NDArray[np.float64]  # (B, Hq, Sq, D)
    k: npt.NDArray[np.float64]  # (B, Hkv, Sk, D)
    v: npt.NDArray[np.float64]  # (B, Hkv, Sk, Dv)
    q_pos: list[list[int]]  # Python ints, so differences cannot overflow
    k_pos: list[list[int]]
    mask: Any  # (B, Hq, Sq, Sk) bool or None
    bias: Any  # (B, Hq, Sq, Sk) float64 or None
    slopes: Any  # (B, Hq) float64 or None
    sinks: Any  # (Hq,) float64 or None
    scale: float
    causal: bool
    window: int | None
    window_right: int | None
    sink_tokens: int
    softcap: float | None
    group: int  # query heads per KV head


def _read_call(q: Any, k: Any, v: Any, *, causal: bool, q_pos: Any, k_pos: Any, mask: Any,
               bias: Any, scale: float | None, window: int | None, sink_tokens: int,
               softcap: float | None, alibi_slopes: Any, sink_logits: Any,
               window_right: int | None) -> _Call:  # fmt: skip
    """Check the shapes, convert to float64 and Python ints, broadcast the optional arrays."""
    qf, kf, vf = _to_float64(q, "q"), _to_float64(k, "k"), _to_float64(v, "v")
    if qf.ndim != 4 or kf.ndim != 4 or vf.ndim != 4:
        raise ValueError("q, k and v must all be 4-D (B, H, S, D)")
    n_batch, n_qheads, n_queries, d_qk = qf.shape
    if kf.shape[0] != n_batch or vf.shape[0] != n_batch:
        raise ValueError("q, k and v must have the same batch size")
    n_kvheads, n_keys, d_k = kf.shape[1], kf.shape[2], kf.shape[3]
    if d_k != d_qk:
        raise ValueError(f"q has head dim {d_qk} but k has {d_k}")
    if vf.shape[1] != n_kvheads or vf.shape[2] != n_keys:
        raise ValueError("v must have the same heads and length as k")
    if n_kvheads == 0 or n_qheads % n_kvheads != 0:
        raise ValueError(f"Hq={n_qheads} is not a multiple of Hkv={n_kvheads}")
    if scale is None and d_qk == 0:
        raise ValueError("the default scale 1/sqrt(D) needs D > 0")
    full = (n_batch, n_qheads, n_queries, n_keys)
    return _Call(
        q=qf,
        k=kf,
        v=vf,
        q_pos=_positions(q_pos, n_batch, n_queries,
                         [n_keys - n_queries + i for i in range(n_queries)], "q_pos"),
        k_pos=_positions(k_pos, n_batch, n_keys, list(range(n_keys)), "k_pos"),
        mask=None if mask is None else np.broadcast_to(np.asarray(mask, dtype=bool), full),
        bias=None if bias is None else np.broadcast_to(_to_float64(bias, "bias"), full),
        slopes=None if alibi_slopes is None else np.broadcast_to(
            _to_float64(alibi_slopes, "alibi_slopes"), (n_batch, n_qheads)),
        sinks=None if sink_logits is None else np.broadcast_to(
            _to_float64(sink_logits, "sink_logits"), (n_qheads,)),
        scale=1.0 / math.sqrt(d_qk) if scale is None else float(scale),
        causal=causal,
        window=None if window is None else int(window),
        window_right=None if window_right is None else int(window_right),
        sink_tokens=sink_tokens,
        softcap=None if softcap is None else float(softcap),
        group=n_qheads // n_kvheads,
    )  # fmt: skip


def _visible_scores(call: _Call, b: int, h: int, i: int) -> tuple[list[int], list[float]]:
    """Pass 1 for query i of head h, row b: the visible key slots and their scores."""
    hk = h // call.group
    qpos = call.q_pos[b][i]
    visible: list[int] = []
    scores: list[float] = []
    for j, kpos in enumerate(call.k_pos[b]):
        if kpos < 0:
            continue
        if call.causal and kpos > qpos:
            continue
        outside_window = call.window is not None and not (qpos - kpos < call.window)
        if outside_window and not kpos < call.sink_tokens:
            continue
        if call.window_right is not None and kpos - qpos > call.window_right:
            continue
        if call.mask is not None and not call.mask[b, h, i, j]:
            continue
        # Elementwise products, not BLAS: some BLAS kernels skip zero
        # factors, which would hide a NaN that IEEE arithmetic keeps.
        s = call.scale * float(np.sum(call.q[b, h, i] * call.k[b, hk, j]))
        if call.softcap is not None:
            s = call.softcap * math.tanh(s / call.softcap)
        if call.slopes is not None:
            s -= float(call.slopes[b, h]) * abs(qpos - kpos)
        if call.bias is not None:
            s += float(call.bias[b, h, i, j])
        visible.append(j)
        scores.append(s)
    return visible, scores


def _softmax_row(call: _Call, b: int, h: int, visible: list[int],
                 scores: list[float]) -> tuple[Any, float, list[float]]:  # fmt: skip
    """Pass 2: (output vector, lse, weights of the visible keys) from the visible scores."""
    sink = None if call.sinks is None else float(call.sinks[h])
    terms = scores + ([] if sink is None else [sink])  # the softmax denominator's terms
    if not terms:
        return 0.0, -math.inf, []  # no visible key and no sink: empty softmax
    # np.max propagates NaN, unlike the builtin max.
    m = float(np.max(np.array(terms, dtype=np.float64)))
    if m == -math.inf:
        return 0.0, -math.inf, [0.0] * len(visible)  # every term is exp(-inf) = 0
    weights = [math.exp(s - m) for s in scores]
    z = sum(weights)
    if sink is not None:
        z += math.exp(sink - m)
    if not visible:
        return 0.0, m + math.log(z), []
    # Weighted sum of the visible value rows only, sum_j weights[j] * v_j,
    # elementwise for the same reason as the scores.
    w = np.array(weights, dtype=np.float64)
    v_rows = call.v[b, h // call.group][visible]
    return np.sum(w[:, None] * v_rows, axis=0) / z, m + math.log(z), list(w / z)
