"""The cross-attention cache: the encoder's keys and values, computed once per input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from refattn.caches.base import KVCache
from refattn.namespace import Array, Namespace


class CrossAttentionCache(KVCache):
    """Keys and values of the encoder output, stored by the first update and reused.

    In an encoder-decoder model every decoder step's queries attend to the same
    encoder states, so their keys and values are computed once (the first
    update, ``n_new`` giving each row's real encoder length) and every later
    step calls ``update(None, None)`` or :meth:`view`, which return them
    unchanged. Attend without ``causal``: the whole input is visible. A new
    input needs :meth:`reset` (or :meth:`release` of its rows) first.

    Examples
    --------
    >>> import numpy as np
    >>> cache = CrossAttentionCache(batch=2, kv_heads=1, head_dim=2, dtype=np.float64)
    >>> k, v, k_pos = cache.update(np.ones((2, 1, 3, 2)), np.ones((2, 1, 3, 2)), n_new=[3, 2])
    >>> k_pos.tolist(), cache.update(None, None)[2].tolist()
    ([[0, 1, 2], [0, 1, -1]], [[0, 1, 2], [0, 1, -1]])
    """

    def __init__(
        self,
        *,
        batch: int,
        kv_heads: int,
        head_dim: int,
        value_dim: int | None = None,
        dtype: Any = None,
        device: Any = None,
        xp: Namespace | None = None,
    ) -> None:
        super().__init__(
            batch=batch, kv_heads=kv_heads, head_dim=head_dim, value_dim=value_dim,
            dtype=dtype, device=device, xp=xp,
        )  # fmt: skip
        xp, B, H = self.xp, batch, kv_heads
        self.keys = xp.zeros((B, H, 0, head_dim), dtype=self.dtype, device=self.device)
        self.values = xp.zeros((B, H, 0, self.value_dim), dtype=self.dtype, device=self.device)
        self.positions = xp.zeros((B, 0), dtype=xp.int64, device=self.device)

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
        self.positions = self._new_positions(n, k_new.shape[2])
        self.keys, self.values = k_new, v_new
        self._lengths = n

    def view(self) -> tuple[Array, Array, Array]:
        return self.keys, self.values, self.positions

    def _storage(self) -> list[Array]:
        return [self.keys, self.values]

    def _release_row(self, b: int) -> None:
        self.positions = self._write(self.positions, (b, slice(None)), -1)
