"""The sliding-window cache: a ring of ``window`` slots, plus ``sink_tokens`` slots that
keep the first tokens for good (attention sinks, StreamingLLM)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from refattn.caches.base import KVCache, _check_count
from refattn.namespace import Array, index_dtype


class SlidingWindowCache(KVCache):
    r"""The last ``window`` tokens of each row in a ring buffer, and its first ``sink_tokens``.

    Slot layout per row: slots ``0 .. sink_tokens-1`` hold positions
    ``0 .. sink_tokens-1`` for good; position :math:`p \ge` ``sink_tokens``
    lives in ring slot :math:`\text{sink} + (p - \text{sink}) \bmod W`, so slots
    are not in position order once the ring wraps, and ``k_pos`` says which
    position each slot holds (-1 for a slot never written).

    The queries of an update attend with ``**cache.attention_options``, that is
    ``window=cache.window`` and ``sink_tokens=cache.sink_tokens``:

    - a one-token update returns the slots after the write, which hold exactly
      the sinks and the last ``window`` positions: nothing else to mask;
    - a T-token update returns the slots as they were before the write
      followed by the T new tokens, because writing first would overwrite
      keys that the chunk's earlier queries still see (the off-by-one of many
      ring implementations); the window mask then trims each query's view.

    Memory: :math:`2 \cdot B \cdot H_{kv} \cdot (\text{sink} + W) \cdot D \cdot
    \text{itemsize}` bytes, whatever the length; each update writes only its
    tokens, so the cost per token stays flat.

    Examples
    --------
    >>> import numpy as np
    >>> cache = SlidingWindowCache(batch=1, kv_heads=1, head_dim=1, window=3, sink_tokens=1,
    ...                            dtype=np.float64)
    >>> for t in range(6):
    ...     k, v, k_pos = cache.update(np.ones((1, 1, 1, 1)), np.ones((1, 1, 1, 1)))
    >>> k_pos.tolist(), cache.lengths.tolist()
    ([[0, 4, 5, 3]], [6])
    """

    def __init__(
        self,
        *,
        window: int,
        sink_tokens: int = 0,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        window = _check_count("window", window, minimum=1)
        sink_tokens = _check_count("sink_tokens", sink_tokens, minimum=0)
        self.window, self.sink_tokens = window, sink_tokens
        xp, B, H, slots = self.xp, self.batch, self.kv_heads, sink_tokens + window
        self.keys = xp.zeros((B, H, slots, self.head_dim), dtype=self.dtype, device=self.device)
        self.values = xp.zeros((B, H, slots, self.value_dim), dtype=self.dtype, device=self.device)
        self.positions = xp.full((B, slots), -1, dtype=index_dtype(xp), device=self.device)

    @property
    def attention_options(self) -> dict[str, Any]:
        """The ring keeps the sinks and the last ``window`` positions: its queries look
        through that window (and a chunk's early queries must not see further)."""
        return {"window": self.window, "sink_tokens": self.sink_tokens}

    def slot(self, position: int) -> int:
        """The slot that holds ``position`` (if it is still held)."""
        if position < self.sink_tokens:
            return position
        return self.sink_tokens + (position - self.sink_tokens) % self.window

    def update(
        self, k_new: Array, v_new: Array, n_new: Array | Sequence[int] | None = None
    ) -> tuple[Array, Array, Array]:
        n = self._check_new(k_new, v_new, n_new)
        xp, T = self.xp, k_new.shape[2]
        if T == 1:  # the slots after the write are exactly the window
            self._append(k_new, v_new, n)
            return self.view()
        # The old slots, then the chunk: built before the write overwrites them.
        k, v, k_pos = self.view()
        seen = (
            xp.concat([k, k_new], axis=2),
            xp.concat([v, v_new], axis=2),
            xp.concat([k_pos, self._new_positions(n, T)], axis=1),
        )
        self._append(k_new, v_new, n)
        return seen

    def _append(self, k_new: Array, v_new: Array, n: list[int]) -> None:
        new_pos = self._new_positions(n, k_new.shape[2])  # (B, T)
        for b in range(self.batch):
            for first, last in self._kept_runs(self._lengths[b], n[b]):
                # Positions first .. last - 1 fill consecutive slots without wrapping.
                tokens = slice(first - self._lengths[b], last - self._lengths[b])
                slots = slice(self.slot(first), self.slot(first) + last - first)
                where = (b, slice(None), slots, slice(None))
                self.keys = self._write(self.keys, where, k_new[b, :, tokens, :])
                self.values = self._write(self.values, where, v_new[b, :, tokens, :])
                self.positions = self._write(self.positions, (b, slots), new_pos[b, tokens])
            self._lengths[b] += n[b]

    def _kept_runs(self, length: int, n: int) -> list[tuple[int, int]]:
        """Runs [first, last) of the new positions still held after the write, each
        mapping to consecutive slots: the sink part, then the ring part split at the wrap."""
        end = length + n
        runs = []
        if length < self.sink_tokens:
            runs.append((length, min(end, self.sink_tokens)))
        first = max(length, self.sink_tokens, end - self.window)  # older ones are overwritten
        while first < end:
            last = min(end, first + self.sink_tokens + self.window - self.slot(first))
            runs.append((first, last))
            first = last
        return [(a, b) for a, b in runs if b > a]

    def view(self) -> tuple[Array, Array, Array]:
        k_pos = self.xp.asarray(self.positions, copy=True)  # the caller's own
        return self.keys, self.values, k_pos
