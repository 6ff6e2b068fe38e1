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
   ``k_pos < 0``) are dropped;
6. a per-head sink logit joins the softmax denominator but carries no value.

Then ``Z = sum_j exp(s_j) (+ exp(sink_h))``, ``out = sum_j exp(s_j) / Z * v_j``
and ``lse = log(Z)``. A row with nothing in its denominator gives ``out = 0`` and
``lse = -inf``.
"""

from __future__ import annotations

import math
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
    qf = _to_float64(q, "q")
    kf = _to_float64(k, "k")
    vf = _to_float64(v, "v")

    # ---- shapes -------------------------------------------------------------
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
    d_v = vf.shape[3]
    if n_kvheads == 0 or n_qheads % n_kvheads != 0:
        raise ValueError(f"Hq={n_qheads} is not a multiple of Hkv={n_kvheads}")
    group = n_qheads // n_kvheads

    # ---- scalars ------------------------------------------------------------
    if scale is None:
        if d_qk == 0:
            raise ValueError("the default scale 1/sqrt(D) needs D > 0")
        scale_f = 1.0 / math.sqrt(d_qk)
    else:
        scale_f = float(scale)
    cap = None if softcap is None else float(softcap)
    win = None if window is None else int(window)

    # ---- positions (Python ints, so differences cannot overflow) ------------
    qp_rows = _positions(
        q_pos, n_batch, n_queries, [n_keys - n_queries + i for i in range(n_queries)], "q_pos"
    )
    kp_rows = _positions(k_pos, n_batch, n_keys, list(range(n_keys)), "k_pos")

    # ---- broadcast the optional per-score and per-head inputs once ----------
    full = (n_batch, n_qheads, n_queries, n_keys)
    mask_b = None if mask is None else np.broadcast_to(np.asarray(mask, dtype=bool), full)
    bias_b = None if bias is None else np.broadcast_to(_to_float64(bias, "bias"), full)
    slopes_b = (
        None
        if alibi_slopes is None
        else np.broadcast_to(_to_float64(alibi_slopes, "alibi_slopes"), (n_batch, n_qheads))
    )
    sinks_b = (
        None
        if sink_logits is None
        else np.broadcast_to(_to_float64(sink_logits, "sink_logits"), (n_qheads,))
    )

    out = np.zeros((n_batch, n_qheads, n_queries, d_v), dtype=np.float64)
    probs = np.zeros((n_batch, n_qheads, n_queries, n_keys), dtype=np.float64)
    lse = np.empty((n_batch, n_qheads, n_queries), dtype=np.float64)

    # inf/NaN in *visible* inputs are allowed to propagate; silence the
    # floating-point warnings NumPy would raise while they do.
    with np.errstate(all="ignore"):
        for b in range(n_batch):
            qp_row = qp_rows[b]
            kp_row = kp_rows[b]
            for h in range(n_qheads):
                hk = h // group
                k_rows = list(kf[b, hk])  # k_rows[j] is the key vector of slot j
                v_mat = vf[b, hk]  # v_mat[j] is the value vector of slot j
                sink = None if sinks_b is None else float(sinks_b[h])
                slope = None if slopes_b is None else float(slopes_b[b, h])
                for i in range(n_queries):
                    qpos = qp_row[i]
                    q_vec = qf[b, h, i]
                    mask_row = None if mask_b is None else mask_b[b, h, i].tolist()
                    bias_row = None if bias_b is None else bias_b[b, h, i].tolist()

                    # Pass 1: the visible keys and their scores.
                    visible: list[int] = []
                    scores: list[float] = []
                    for j in range(n_keys):
                        kpos = kp_row[j]
                        if kpos < 0:
                            continue
                        if causal and kpos > qpos:
                            continue
                        outside_window = win is not None and not (qpos - kpos < win)
                        if outside_window and not kpos < sink_tokens:
                            continue
                        if mask_row is not None and not mask_row[j]:
                            continue
                        # Elementwise products, not BLAS: some BLAS kernels skip zero
                        # factors, which would hide a NaN that IEEE arithmetic keeps.
                        s = scale_f * float(np.sum(q_vec * k_rows[j]))
                        if cap is not None:
                            s = cap * math.tanh(s / cap)
                        if slope is not None:
                            s -= slope * abs(qpos - kpos)
                        if bias_row is not None:
                            s += bias_row[j]
                        visible.append(j)
                        scores.append(s)

                    # Terms of the softmax denominator: the scores and the sink.
                    terms = scores + ([] if sink is None else [sink])
                    if not terms:
                        # No visible key and no sink: empty softmax.
                        out[b, h, i] = 0.0
                        lse[b, h, i] = -math.inf
                        continue
                    # np.max propagates NaN, unlike the builtin max.
                    m = float(np.max(np.array(terms, dtype=np.float64)))
                    if m == -math.inf:
                        # Every term is exp(-inf) = 0: the denominator is 0.
                        out[b, h, i] = 0.0
                        lse[b, h, i] = -math.inf
                        continue

                    # Pass 2: shifted exponentials and their sum.
                    weights = [math.exp(s - m) for s in scores]
                    z = sum(weights)
                    if sink is not None:
                        z += math.exp(sink - m)
                    # Weighted sum of the visible value rows only, sum_j weights[j] * v_j,
                    # elementwise for the same reason as the scores.
                    if visible:
                        w = np.array(weights, dtype=np.float64)
                        acc = np.sum(w[:, None] * v_mat[visible], axis=0)
                        out[b, h, i] = acc / z
                        probs[b, h, i, visible] = np.array(weights) / z
                    else:
                        out[b, h, i] = 0.0
                    lse[b, h, i] = m + math.log(z)

    if return_weights:
        return out, lse, probs
    return out, lse
