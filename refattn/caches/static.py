"""The static cache: preallocated storage, written in place (llama's and minGPT's ``start_pos``)."""

from __future__ import annotations

from typing import Any

from refattn.caches.base import KVCache, _check_count
from refattn.namespace import Array, index_dtype


class StaticCache(KVCache):
    r"""Keys and values in arrays of ``max_len`` slots per row, allocated once.

    Row b's token at position p lives in slot p. An update writes only the new
    tokens (amortized O(1) per token) and returns views of the first
    :math:`\max_b \text{lengths}_b` slots, so attention reads no copy; slots a
    row has not filled report ``k_pos = -1``. The views alias the storage: they
    are valid until the next update.

    Memory: :math:`2 \cdot B \cdot H_{kv} \cdot \mathrm{max\_len} \cdot D \cdot
    \text{itemsize}` bytes (with :math:`D_v = D`), whatever the lengths.

    Examples
    --------
    >>> import numpy as np
    >>> cache = StaticCache(batch=1, kv_heads=1, head_dim=2, max_len=4, dtype=np.float64)
    >>> k, v, k_pos = cache.update(np.ones((1, 1, 3, 2)), np.ones((1, 1, 3, 2)))
    >>> k.shape, k_pos.tolist(), cache.lengths.tolist()
    ((1, 1, 3, 2), [[0, 1, 2]], [3])
    """

    def __init__(
        self,
        *,
        max_len: int,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        self.max_len = _check_count("max_len", max_len, minimum=1)
        self._allocate()
        self.positions = self.xp.full(
            (self.batch, max_len), -1, dtype=index_dtype(self.xp), device=self.device
        )

    # -- what a kind that stores keys and values otherwise overrides ----------

    def _allocate(self) -> None:
        """Create the arrays named by :attr:`STORAGE`, ``max_len`` slots per row."""
        xp, B, H, S = self.xp, self.batch, self.kv_heads, self.max_len
        self.keys = xp.zeros((B, H, S, self.head_dim), dtype=self.dtype, device=self.device)
        self.values = xp.zeros((B, H, S, self.value_dim), dtype=self.dtype, device=self.device)

    def _store(self, slots: tuple[Any, ...], k: Array, v: Array) -> None:
        """Write one row's new keys and values, (Hkv, n, D), into ``slots`` of the storage."""
        self.keys = self._write(self.keys, slots, k)
        self.values = self._write(self.values, slots, v)

    # -- the row writes every in-place kind shares ----------------------------

    def _append(self, k_new: Array, v_new: Array, n: list[int]) -> None:
        """Row b's real tokens go to slots lengths[b] .. lengths[b] + n[b] - 1.

        The room check comes before the first write, so an overflowing update
        leaves every row as it was.
        """
        self._check_room(n, self.max_len)
        new_pos = self._new_positions(n, k_new.shape[2])  # (B, T)
        for b in range(self.batch):
            start, end = self._lengths[b], self._lengths[b] + n[b]
            slots = (b, slice(None), slice(start, end), slice(None))
            self._store(slots, k_new[b, :, : n[b], :], v_new[b, :, : n[b], :])  # real tokens only
            self.positions = self._write(self.positions, (b, slice(start, end)), new_pos[b, : n[b]])
            self._lengths[b] = end

    def view(self) -> tuple[Array, Array, Array]:
        used = max(self._lengths)
        k_pos = self.xp.asarray(self.positions[:, :used], copy=True)  # the caller's own
        return self.keys[:, :, :used, :], self.values[:, :, :used, :], k_pos
