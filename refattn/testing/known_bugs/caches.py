"""KV caches with one realistic bug each, for ``check_cache`` to catch.

Each is a small preallocated cache as users write one (``update(k_new, v_new)
-> (k, v)`` or ``(k, v, k_pos)``), with one mistake: keeping a view of the
caller's arrays, decode-only code fed a prompt, a layout mix-up, storage in
half precision, positions off by one. ``check_cache`` must fail each, and
pass refattn's own caches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from refattn.backends import to_numpy


class ListCache:
    """Correct: appends copies to a list and concatenates on read (the legacy HF layout)."""

    def __init__(self, *, batch: int, kv_heads: int, head_dim: int, max_len: int, dtype: Any,
                 **_: Any):  # fmt: skip
        self.dtype = dtype
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []

    def store(self, k_new: Any, v_new: Any) -> tuple[np.ndarray, np.ndarray]:
        return to_numpy(k_new).astype(self.dtype), to_numpy(v_new).astype(self.dtype)

    def update(self, k_new: Any, v_new: Any) -> tuple[np.ndarray, ...]:
        k, v = self.store(k_new, v_new)
        self.keys.append(k)
        self.values.append(v)
        return np.concatenate(self.keys, axis=2), np.concatenate(self.values, axis=2)


class KeepsViews(ListCache):
    """Stores the caller's arrays themselves, not copies: a reused buffer rewrites history."""

    def store(self, k_new: Any, v_new: Any) -> tuple[np.ndarray, np.ndarray]:
        return k_new, v_new


class HalfPrecisionStorage(ListCache):
    """Stores float16 whatever dtype it was asked for (so float32 keys lose precision)."""

    def store(self, k_new: Any, v_new: Any) -> tuple[np.ndarray, np.ndarray]:
        k, v = super().store(k_new, v_new)
        # float16 storage, handed back in the dtype asked for (the precision is gone)
        return k.astype(np.float16).astype(self.dtype), v.astype(np.float16).astype(self.dtype)


class SequenceFirstLayout(ListCache):
    """Reads (B, H, T, D) as if it were flash-attn's (B, T, H, D): heads and tokens mixed."""

    def store(self, k_new: Any, v_new: Any) -> tuple[np.ndarray, np.ndarray]:
        k, v = super().store(k_new, v_new)
        B, H, T, D = k.shape
        return (
            k.reshape(B, T, H, D).transpose(0, 2, 1, 3),
            v.reshape(B, T, H, D).transpose(0, 2, 1, 3),
        )


class StaticBuffer:
    """Correct: a preallocated (B, H, max_len, D) buffer and its positions."""

    def __init__(self, *, batch: int, kv_heads: int, head_dim: int, max_len: int, dtype: Any,
                 **_: Any):  # fmt: skip
        self.k = np.zeros((batch, kv_heads, max_len, head_dim), dtype)
        self.v = np.zeros_like(self.k)
        self.pos = np.full((batch, max_len), -1)
        self.n = 0

    def write(self, k_new: np.ndarray, v_new: np.ndarray) -> None:
        T = k_new.shape[2]
        self.k[:, :, self.n : self.n + T] = k_new
        self.v[:, :, self.n : self.n + T] = v_new
        self.pos[:, self.n : self.n + T] = np.arange(self.n, self.n + T)
        self.n += T

    def update(self, k_new: Any, v_new: Any) -> tuple[np.ndarray, ...]:
        self.write(to_numpy(k_new), to_numpy(v_new))
        return self.k, self.v, self.pos


class DecodeOnly(StaticBuffer):
    """Written for one token per step: a prompt or a chunk keeps only its last token."""

    def write(self, k_new: np.ndarray, v_new: np.ndarray) -> None:
        self.k[:, :, self.n] = k_new[:, :, -1]
        self.v[:, :, self.n] = v_new[:, :, -1]
        self.pos[:, self.n] = self.n
        self.n += 1


class PositionsFromOne(StaticBuffer):
    """Numbers the tokens from 1: every key looks one step later than it is."""

    def update(self, k_new: Any, v_new: Any) -> tuple[np.ndarray, ...]:
        k, v, pos = super().update(k_new, v_new)
        return k, v, np.where(pos >= 0, pos + 1, -1)


#: The wrong caches.
WRONG_CACHES: dict[str, Callable[..., Any]] = {
    c.__name__: c
    for c in (KeepsViews, HalfPrecisionStorage, SequenceFirstLayout, DecodeOnly, PositionsFromOne)
}
#: Correct caches written differently from refattn's.
CORRECT_CACHES: dict[str, Callable[..., Any]] = {c.__name__: c for c in (ListCache, StaticBuffer)}
