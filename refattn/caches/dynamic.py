"""The dynamic cache: grows by concatenation (``past_key_values``, Hugging Face's DynamicCache)."""

from __future__ import annotations

from typing import Any

from refattn.caches.base import KVCache
from refattn.namespace import Array


class DynamicCache(KVCache):
    r"""Keys and values that grow by concatenating each update's T new slots.

    Simple and unbounded, at a price that is easy to miss: every update copies
    the whole cache into a new array, :math:`O(\text{length})` per appended
    token and :math:`O(S^2)` over a generation, which the benchmark in
    ``benchmarks/`` shows growing. Right-padding slots of a ragged update stay
    in place as holes with ``k_pos = -1``; a released row keeps its slots as
    holes too and starts again at position 0.

    Examples
    --------
    >>> import numpy as np
    >>> cache = DynamicCache(batch=2, kv_heads=1, head_dim=2, dtype=np.float64)
    >>> k, v, k_pos = cache.update(np.ones((2, 1, 2, 2)), np.ones((2, 1, 2, 2)), n_new=[2, 1])
    >>> k_pos.tolist(), cache.lengths.tolist()
    ([[0, 1], [0, -1]], [2, 1])
    """

    def __init__(self, **common: Any) -> None:
        super().__init__(**common)
        xp, B, H = self.xp, self.batch, self.kv_heads
        self.keys = xp.zeros((B, H, 0, self.head_dim), dtype=self.dtype, device=self.device)
        self.values = xp.zeros((B, H, 0, self.value_dim), dtype=self.dtype, device=self.device)
        self.positions = xp.zeros((B, 0), dtype=xp.int64, device=self.device)

    def _append(self, k_new: Array, v_new: Array, n: list[int]) -> None:
        xp = self.xp
        new_pos = self._new_positions(n, k_new.shape[2])  # (B, T)
        self.keys = xp.concat([self.keys, k_new], axis=2)  # a full copy, every time
        self.values = xp.concat([self.values, v_new], axis=2)
        self.positions = xp.concat([self.positions, new_pos], axis=1)
        self._lengths = [length + m for length, m in zip(self._lengths, n, strict=True)]

    def view(self) -> tuple[Array, Array, Array]:
        return self.keys, self.values, self.positions
