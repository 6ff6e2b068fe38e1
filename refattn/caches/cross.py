"""The cross-attention cache: the encoder's keys and values, computed once per input."""

from __future__ import annotations

from collections.abc import Sequence

from refattn.caches.dynamic import DynamicCache
from refattn.namespace import Array


class CrossAttentionCache(DynamicCache):
    """Keys and values of the encoder output, stored by the first update and reused.

    In an encoder-decoder model every decoder step's queries attend to the same
    encoder states, so their keys and values are computed once (the first
    update, ``n_new`` giving each row's real encoder length) and every later
    step calls ``update(None, None)`` or :meth:`view`, which return them
    unchanged. Attend without ``causal``: the whole input is visible. A new
    input needs :meth:`reset` first. The storage is a dynamic cache's, written
    once instead of grown.

    Examples
    --------
    >>> import numpy as np
    >>> cache = CrossAttentionCache(batch=2, kv_heads=1, head_dim=2, dtype=np.float64)
    >>> k, v, k_pos = cache.update(np.ones((2, 1, 3, 2)), np.ones((2, 1, 3, 2)), n_new=[3, 2])
    >>> k_pos.tolist(), cache.update(None, None)[2].tolist()
    ([[0, 1, 2], [0, 1, -1]], [[0, 1, 2], [0, 1, -1]])
    """

    def update(
        self,
        k_new: Array | None,
        v_new: Array | None,
        n_new: Array | Sequence[int] | None = None,
    ) -> tuple[Array, Array, Array]:
        if k_new is None and v_new is None:
            return self.view()
        if k_new is None or v_new is None:
            raise ValueError("k_new and v_new must both be arrays (store) or both None (reuse)")
        if any(self._lengths):
            raise ValueError(
                "CrossAttentionCache already holds encoder states; reset() it before "
                "storing a new input, or call update(None, None) to reuse them"
            )
        return super().update(k_new, v_new, n_new)

    def _append(self, k_new: Array, v_new: Array, n: list[int]) -> None:
        """Store the encoder states in place of whatever a reset left behind."""
        self.positions = self._new_positions(n, k_new.shape[2])
        # Copies: a caller may reuse its buffers for the next input.
        self.keys, self.values = (self.xp.asarray(x, copy=True) for x in (k_new, v_new))
        self._lengths = list(n)
