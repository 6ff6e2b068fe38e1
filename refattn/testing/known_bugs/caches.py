"""KV caches with one realistic bug each, for ``check_cache`` to catch.

Each is a small preallocated cache as users write one (``update(k_new, v_new)
-> (k, v)`` or ``(k, v, k_pos)``), with one mistake: keeping a view of the
caller's arrays, decode-only code fed a prompt, a layout mix-up, storage in
half precision, positions off by one, an fp8 scale fixed by the first update
that clips the larger tokens after it. ``check_cache`` must fail each, and
pass refattn's own caches.

:class:`ReturnsInputFirst` is in neither list: it is correct for a caller
that lets a cache return its own arrays (``check_cache(may_alias=True)``),
and fails with the aliasing finding for one that does not (the default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from refattn.backends import to_numpy
from refattn.caches.quantized import FLOAT8
from refattn.testing.candidate import Unsupported


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


class ReturnsInputFirst:
    """Correct if the caller allows aliasing: the first update keeps and returns the caller's
    arrays themselves, later ones concatenate into new arrays (transformers' DynamicCache)."""

    def __init__(self, *, xp: Any, **_: Any) -> None:
        self.xp = xp
        self.k: Any = None
        self.v: Any = None

    def update(self, k_new: Any, v_new: Any) -> tuple[Any, Any]:
        if self.k is None:
            self.k, self.v = k_new, v_new
        else:
            self.k = self.xp.concat([self.k, k_new], axis=2)
            self.v = self.xp.concat([self.v, v_new], axis=2)
        return self.k, self.v


class FrozenScale(StaticBuffer):
    """Correct: fp8 codes (NumPy, ml_dtypes) with one float32 scale per KV head or for the
    whole cache, calibrated on the first update. A later update that the scale cannot hold
    doubles it as often as needed and halves the stored codes as often (exact for normal
    codes): ``scale = first * 2**shift``."""

    FORMATS = tuple(FLOAT8)
    SCALES = ("head", "tensor")

    def __init__(self, *, batch: int, kv_heads: int, head_dim: int, max_len: int, dtype: Any,
                 format: str = "e4m3", scales: str = "tensor", **_: Any):  # fmt: skip
        if format not in FLOAT8 or scales == "token":
            raise Unsupported(f"fp8 codes with a shared scale only, not {format} per {scales}")
        import ml_dtypes

        super().__init__(batch=batch, kv_heads=kv_heads, head_dim=head_dim, max_len=max_len,
                         dtype=dtype)  # fmt: skip
        self.out_dtype, self.f8 = dtype, FLOAT8[format]
        self.codes_dtype = getattr(ml_dtypes, self.f8.dtype)
        self.k = self.k.astype(self.codes_dtype)
        self.v = self.v.astype(self.codes_dtype)
        self.axes = (0, 2, 3) if scales == "head" else (0, 1, 2, 3)
        self.first: dict[str, np.ndarray] = {}
        self.shift = {"k": np.zeros((), np.int64), "v": np.zeros((), np.int64)}

    def scale(self, name: str) -> np.ndarray:
        return np.ldexp(self.first[name], self.shift[name]).astype(np.float32)

    def fit(self, name: str, x: np.ndarray) -> None:
        """Calibrate on the first update; later, grow the scale until x fits."""
        amax = np.abs(x).max(axis=self.axes, keepdims=True).astype(np.float32)
        if name not in self.first:
            self.first[name] = np.where(amax > 0, amax / self.f8.largest, 1).astype(np.float32)
            return
        self.grow(name, amax)

    def grow(self, name: str, amax: np.ndarray) -> None:
        while np.any(amax > self.f8.largest * self.scale(name)):
            more = amax > self.f8.largest * self.scale(name)
            self.shift[name] = self.shift[name] + more
            stored = getattr(self, name)
            halved = np.where(more, stored.astype(np.float32) / 2, stored.astype(np.float32))
            setattr(self, name, halved.astype(self.codes_dtype))

    def write(self, k_new: np.ndarray, v_new: np.ndarray) -> None:
        for name, x in (("k", k_new), ("v", v_new)):
            self.fit(name, x)
        ratio_k = np.clip(k_new / self.scale("k"), -self.f8.largest, self.f8.largest)
        ratio_v = np.clip(v_new / self.scale("v"), -self.f8.largest, self.f8.largest)
        super().write(ratio_k.astype(self.codes_dtype), ratio_v.astype(self.codes_dtype))

    def update(self, k_new: Any, v_new: Any) -> tuple[np.ndarray, ...]:
        self.write(to_numpy(k_new).astype(np.float32), to_numpy(v_new).astype(np.float32))
        k = (self.k[:, :, : self.n].astype(np.float32) * self.scale("k")).astype(self.out_dtype)
        v = (self.v[:, :, : self.n].astype(np.float32) * self.scale("v")).astype(self.out_dtype)
        return k, v, self.pos[:, : self.n]


class FrozenScaleSaturates(FrozenScale):
    """fp8 with the scale of the first update kept for good: a later, larger token is clipped
    to the largest finite code (the saturating cast of static-scale fp8 KV caches)."""

    def grow(self, name: str, amax: np.ndarray) -> None:
        pass


#: The wrong caches.
WRONG_CACHES: dict[str, Callable[..., Any]] = {
    c.__name__: c
    for c in (
        KeepsViews,
        HalfPrecisionStorage,
        SequenceFirstLayout,
        DecodeOnly,
        PositionsFromOne,
        FrozenScaleSaturates,
    )
}
#: Correct caches written differently from refattn's.
CORRECT_CACHES: dict[str, Callable[..., Any]] = {
    c.__name__: c for c in (ListCache, StaticBuffer, FrozenScale)
}
