"""The dynamic cache: grows by concatenation (``past_key_values``, Hugging Face's DynamicCache)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from refattn.caches.base import KVCache
from refattn.namespace import Array, index_dtype


class DynamicCache(KVCache):
    r"""Keys and values that grow by concatenating each update's T new slots.

    Simple and unbounded, at a price that is easy to miss: every update copies
    the whole cache into a new array, :math:`O(\text{length})` per appended
    token and :math:`O(S^2)` over a generation, which the benchmark in
    ``benchmarks/`` shows growing. Right-padding slots of a ragged update stay
    in place as holes with ``k_pos = -1``. A released row starts again at
    position 0; its slots become holes, and the slots that then hold a token
    in no row are freed (all of them by :meth:`reset`), so storage shrinks
    back when rows end instead of only ever growing.

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
        self.positions = xp.zeros((B, 0), dtype=index_dtype(xp), device=self.device)

    def _append(self, k_new: Array, v_new: Array, n: list[int]) -> None:
        xp = self.xp
        new_pos = self._new_positions(n, k_new.shape[2])  # (B, T)
        self.keys = xp.concat([self.keys, k_new], axis=2)  # a full copy, every time
        self.values = xp.concat([self.values, v_new], axis=2)
        self.positions = xp.concat([self.positions, new_pos], axis=1)
        self._lengths = [length + m for length, m in zip(self._lengths, n, strict=True)]

    def release(self, rows: int | Iterable[int]) -> None:
        """Empty the given rows, and free the slots no row holds any more.

        The slots are shared by all rows (slot j is the j-th appended in every
        row), so a slot is freed once no row holds a token in it: releasing
        every row, as :meth:`reset` does, leaves no storage at all, and
        releasing the longest row frees what only it held.

        >>> import numpy as np
        >>> cache = DynamicCache(batch=2, kv_heads=1, head_dim=2, dtype=np.float64)
        >>> _ = cache.update(np.ones((2, 1, 3, 2)), np.ones((2, 1, 3, 2)), n_new=[3, 1])
        >>> cache.release(0); cache.keys.shape, cache.view()[2].tolist()
        ((2, 1, 1, 2), [[-1], [0]])
        >>> cache.reset(); cache.nbytes
        0
        """
        super().release(rows)
        xp = self.xp
        held = xp.any(self.positions >= 0, axis=0)  # (S,): slots some row still holds
        if bool(xp.all(held)):
            return
        kept = xp.nonzero(held)[0]
        self.keys = xp.take(self.keys, kept, axis=2)  # (B, Hkv, held slots, D)
        self.values = xp.take(self.values, kept, axis=2)
        self.positions = xp.take(self.positions, kept, axis=1)  # (B, held slots)

    def view(self) -> tuple[Array, Array, Array]:
        k_pos = self.xp.asarray(self.positions, copy=True)  # the caller's own
        return self.keys, self.values, k_pos
