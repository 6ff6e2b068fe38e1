"""Positions and visibility: the single source of truth for masking.

Every query has an absolute position ``q_pos`` and every key slot a position
``k_pos``. A slot with ``k_pos < 0`` holds no key (padding, an empty ring
slot, an unused page). Which key a query may see follows from these integers
alone:

.. math::

    \\text{visible}(i, j) = [k_j \\ge 0]
        \\wedge [\\text{causal} \\Rightarrow k_j \\le q_i]
        \\wedge [W \\ne \\text{None} \\Rightarrow q_i - k_j < W \\vee k_j < n_{sink}]
        \\wedge [R \\ne \\text{None} \\Rightarrow k_j - q_i \\le R]
        \\wedge \\text{mask}_{ij}

With ``sink_tokens`` (StreamingLLM's attention sinks) the first positions stay
visible through any window. The window ``W`` reaches back from the query (its
left reach is ``W - 1``: flash-attn's ``window_size=(W - 1, ...)``);
``window_right`` :math:`R` reaches forward, keys up to :math:`R` positions
after the query staying visible (flash-attn's ``window_size=(..., R)``). Both
together are a two-sided window: :math:`q_i - W < k_j \\le q_i + R`, a band of
:math:`W + R` positions, as bidirectional sliding-window encoders use. Sink
tokens pass the left reach only: a key after the query is no attention sink.

The defaults put the queries at the end of the keys (bottom-right alignment,
the KV-cache convention of flash-attn and FlashInfer): ``k_pos = arange(Sk)``
and ``q_pos = Sk - Sq + arange(Sq)``. PyTorch SDPA's ``is_causal`` is
top-left: pass ``q_pos = arange(Sq)``.
"""

from __future__ import annotations

from refattn.namespace import Array, Namespace, index_dtype


def default_key_positions(xp: Namespace, n_keys: int, *, device: object) -> Array:
    """``k_pos = arange(Sk)``, shape (1, Sk)."""
    return xp.reshape(xp.arange(n_keys, dtype=index_dtype(xp), device=device), (1, n_keys))


def default_query_positions(xp: Namespace, n_queries: int, n_keys: int, *, device: object) -> Array:
    """``q_pos = Sk - Sq + arange(Sq)``, shape (1, Sq): the last query sits on the last key.

    >>> import array_api_compat.numpy as xp
    >>> default_query_positions(xp, 2, 5, device="cpu")
    array([[3, 4]])
    """
    start = n_keys - n_queries
    return xp.reshape(
        xp.arange(start, start + n_queries, dtype=index_dtype(xp), device=device), (1, n_queries)
    )


def as_rows(xp: Namespace, pos: Array) -> Array:
    """Positions of shape (S,) become (1, S); (B, S) stays as it is."""
    return xp.reshape(pos, (1, pos.shape[0])) if pos.ndim == 1 else pos


def visibility(
    xp: Namespace,
    q_pos: Array,
    k_pos: Array,
    *,
    causal: bool,
    window: int | None,
    sink_tokens: int = 0,
    window_right: int | None = None,
) -> Array:
    """Which key each query may see, from positions alone.

    Parameters
    ----------
    q_pos : (B, Sq) integer array
    k_pos : (B, Sk) integer array, negative for empty slots
    causal : keys at later positions than the query are invisible
    window : if set, only keys with ``q_pos - k_pos < window`` are visible
    sink_tokens : with a window, keys at positions below this stay visible (attention sinks)
    window_right : if set, only keys with ``k_pos - q_pos <= window_right`` are visible

    Returns
    -------
    (B, Sq, Sk) boolean array

    >>> import numpy as np
    >>> import array_api_compat.numpy as xp
    >>> q_pos, k_pos = np.array([[2, 3]]), np.array([[0, 1, 2, -1]])
    >>> visibility(xp, q_pos, k_pos, causal=True, window=2).astype(int)
    array([[[0, 1, 1, 0],
            [0, 0, 1, 0]]])

    A two-sided window: one key back, one forward.

    >>> visibility(xp, np.array([[1, 2]]), np.array([[0, 1, 2, 3]]), causal=False,
    ...            window=2, window_right=1).astype(int)
    array([[[1, 1, 1, 0],
            [0, 1, 1, 1]]])
    """
    q = q_pos[:, :, None]  # (B, Sq, 1)
    k = k_pos[:, None, :]  # (B, 1, Sk)
    visible = k >= 0  # (B, 1, Sk)
    if causal:
        visible = visible & (k <= q)  # (B, Sq, Sk)
    if window is not None:
        in_window = q - k < window  # (B, Sq, Sk)
        if sink_tokens:
            in_window = in_window | (k < sink_tokens)  # the first tokens stay in view
        visible = visible & in_window  # (B, Sq, Sk)
    if window_right is not None:
        visible = visible & (k - q <= window_right)  # (B, Sq, Sk)
    n_batch = max(q_pos.shape[0], k_pos.shape[0])
    return xp.broadcast_to(visible, (n_batch, q_pos.shape[1], k_pos.shape[1]))
