"""The paged cache: a shared pool of fixed-size blocks and a block table per row (vLLM,
FlashInfer), with prefix sharing by copy-on-write."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any, ClassVar

from refattn.caches.base import KVCache, _check_count, _check_row
from refattn.namespace import Array, index_dtype


class PagedCache(KVCache):
    r"""Keys and values in ``num_blocks`` blocks of ``block_size`` slots, shared by all rows.

    Row b's token at position p lives in slot ``p % block_size`` of block
    ``block_table[b][p // block_size]``. Blocks come from a free list when a
    row needs one and go back when it is released; :meth:`fork` lets a row
    share another row's blocks (a common prompt, beam search), and a shared
    block is copied before a row writes into it (copy-on-write), so sharing
    never changes what another row sees.

    The reference semantics is "gather the row's blocks in table order, then
    attend": :meth:`view` does exactly that (a kernel reads through the table
    instead of gathering). Appending writes only the new tokens, so its cost
    per token stays flat; the gather in :meth:`update` costs O(length).

    Memory: the whole pool, :math:`2 \cdot \mathrm{num\_blocks} \cdot H_{kv}
    \cdot \mathrm{block\_size} \cdot D \cdot \text{itemsize}` bytes, allocated once.

    Parameters
    ----------
    block_size, num_blocks : the pool's shape
    block_order : optional order in which free blocks are handed out (default
        0, 1, 2, ...); which physical blocks a row gets must never matter.

    Examples
    --------
    >>> import numpy as np
    >>> cache = PagedCache(batch=2, kv_heads=1, head_dim=1, block_size=2, num_blocks=4,
    ...                    dtype=np.float64)
    >>> _ = cache.update(np.ones((2, 1, 3, 1)), np.ones((2, 1, 3, 1)), n_new=[3, 1])
    >>> cache.block_table, cache.free_blocks
    ([[0, 1], [2]], [3])
    >>> cache.fork(0, 1); cache.block_table
    [[0, 1], [0, 1]]
    """

    STORAGE: ClassVar[tuple[str, ...]] = ("key_blocks", "value_blocks")
    #: The block size :func:`refattn.caches.make_cache` gives a paged cache when none is named.
    DEFAULT_BLOCK_SIZE: ClassVar[int] = 16

    def __init__(
        self,
        *,
        block_size: int,
        num_blocks: int,
        block_order: Sequence[int] | None = None,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        block_size = _check_count("block_size", block_size, minimum=1)
        num_blocks = _check_count("num_blocks", num_blocks, minimum=1)
        order = list(range(num_blocks)) if block_order is None else list(block_order)
        if any(isinstance(i, bool) or not isinstance(i, Integral) for i in order):
            raise TypeError(f"block_order must hold integers; got {block_order!r}")
        order = [int(i) for i in order]
        if sorted(order) != list(range(num_blocks)):
            raise ValueError(
                f"block_order must be a permutation of range({num_blocks}); got {block_order!r}"
            )
        self.block_size, self.num_blocks = block_size, num_blocks
        xp, H = self.xp, self.kv_heads
        shape = (num_blocks, H, block_size)
        self.key_blocks = xp.zeros((*shape, self.head_dim), dtype=self.dtype, device=self.device)
        self.value_blocks = xp.zeros((*shape, self.value_dim), dtype=self.dtype, device=self.device)
        self.block_table: list[list[int]] = [[] for _ in range(self.batch)]
        self.free_blocks: list[int] = order
        self.references = [0] * num_blocks  # rows whose table holds each block

    def _append(self, k_new: Array, v_new: Array, n: list[int]) -> None:
        needed = self._blocks_needed(n)
        if needed > len(self.free_blocks):
            raise ValueError(
                f"PagedCache out of blocks: this update needs {needed} new blocks of "
                f"{self.block_size} slots but only {len(self.free_blocks)} are free"
            )
        for b in range(self.batch):
            if n[b]:
                self._copy_shared_tail(b)
            self._write_row(b, k_new[b, :, : n[b], :], v_new[b, :, : n[b], :])

    def _blocks_needed(self, n: list[int]) -> int:
        """New blocks the rows need for n[b] more tokens each, copies-on-write included.

        Counted before anything is written, so an update that cannot fit fails
        whole. A shared tail is copied by every row that writes into it but the
        last one, which then holds it alone.
        """
        references = list(self.references)
        needed = 0
        for b, m in enumerate(n):
            length, table = self._lengths[b], self.block_table[b]
            needed += -(-(length + m) // self.block_size) - len(table)  # ceil, minus held
            if m and length % self.block_size and references[table[-1]] > 1:
                references[table[-1]] -= 1
                needed += 1
        return needed

    def _copy_shared_tail(self, b: int) -> None:
        """Give row b its own copy of a partly filled last block that another row shares."""
        table = self.block_table[b]
        if not (self._lengths[b] % self.block_size and self.references[table[-1]] > 1):
            return
        old, new = table[-1], self.free_blocks.pop(0)
        self.key_blocks = self._write(self.key_blocks, (new, ...), self.key_blocks[old, ...])
        self.value_blocks = self._write(self.value_blocks, (new, ...), self.value_blocks[old, ...])
        self.references[old] -= 1
        self.references[new] = 1
        table[-1] = new

    def _write_row(self, b: int, k: Array, v: Array) -> None:
        """Write row b's new tokens, (Hkv, n, D), block by block."""
        done, n = 0, k.shape[1]
        while done < n:
            position = self._lengths[b]
            offset = position % self.block_size
            if offset == 0:
                block = self.free_blocks.pop(0)
                self.references[block] = 1
                self.block_table[b].append(block)
            block = self.block_table[b][position // self.block_size]
            m = min(n - done, self.block_size - offset)
            slots = (block, slice(None), slice(offset, offset + m), slice(None))
            self.key_blocks = self._write(self.key_blocks, slots, k[:, done : done + m, :])
            self.value_blocks = self._write(self.value_blocks, slots, v[:, done : done + m, :])
            self._lengths[b] += m
            done += m

    def view(self) -> tuple[Array, Array, Array]:
        """Gather each row's blocks in table order: (B, Hkv, blocks * block_size, D)."""
        xp, B, H, bs = self.xp, self.batch, self.kv_heads, self.block_size
        n_blocks = max(len(t) for t in self.block_table)
        # Rows with fewer blocks are padded with block 0; their slots report k_pos = -1.
        table = [t + [0] * (n_blocks - len(t)) for t in self.block_table]
        index = xp.asarray(table, dtype=index_dtype(xp), device=self.device)  # (B, n_blocks)
        index = xp.reshape(index, (B * n_blocks,))

        def gather(blocks: Array) -> Array:
            rows = xp.take(blocks, index, axis=0)  # (B*n_blocks, H, bs, D)
            rows = xp.reshape(rows, (B, n_blocks, H, bs, blocks.shape[-1]))
            rows = xp.permute_dims(rows, (0, 2, 1, 3, 4))  # (B, H, n_blocks, bs, D)
            return xp.reshape(rows, (B, H, n_blocks * bs, blocks.shape[-1]))

        slot = xp.arange(n_blocks * bs, dtype=index_dtype(xp), device=self.device)[None, :]
        held = slot < xp.asarray(self._lengths, dtype=index_dtype(xp), device=self.device)[:, None]
        k_pos = xp.where(held, slot, xp.asarray(-1, dtype=index_dtype(xp), device=self.device))
        return gather(self.key_blocks), gather(self.value_blocks), k_pos

    def fork(self, src: int, dst: int) -> None:
        """Make row ``dst`` a copy of row ``src`` that shares its blocks (no data copied).

        Whatever ``dst`` held is released first. Later writes by either row into
        a shared block copy it first.
        """
        src, dst = _check_row("src", src, self.batch), _check_row("dst", dst, self.batch)
        if src == dst:
            return
        self.release(dst)
        self.block_table[dst] = list(self.block_table[src])
        for block in self.block_table[dst]:
            self.references[block] += 1
        self._lengths[dst] = self._lengths[src]

    def _release_row(self, b: int) -> None:
        for block in self.block_table[b]:
            self.references[block] -= 1
            if self.references[block] == 0:
                self.free_blocks.append(block)
        self.block_table[b] = []
