"""The quantized cache: keys and values stored as small integers with a scale per token and head
(KIVI-like storage, symmetric, dequantized on read)."""

from __future__ import annotations

from numbers import Integral
from typing import Any, ClassVar

from refattn.caches.static import StaticCache
from refattn.namespace import Array


class QuantizedCache(StaticCache):
    r"""A static cache whose keys and values are stored as ``bits``-bit integers.

    Each token's key (and value) vector of one head, :math:`x \in \mathbb{R}^D`,
    is stored as integer codes :math:`c = \text{round}(x / s)` with one float32
    scale :math:`s = \max_d |x_d| / q_{max}`, :math:`q_{max} = 2^{\text{bits}-1} - 1`,
    and read back as :math:`\hat x = c \cdot s`, so that

    .. math::  |x_d - \hat x_d| \le s / 2 = \max_d |x_d| / (2 q_{max}).

    Scales are per token and head rather than per channel: a token's scale is
    fixed when it arrives and never revisited, so appending never re-quantizes
    old tokens, and keys with outlier channels cost accuracy only for the
    tokens that have them. The consequence on attention is bounded in
    :func:`refattn.testing.tolerance.quantized_error_bound`.

    Codes are stored as int8 whatever ``bits`` (2 to 8: no packing), scales as
    float32. Memory per token and head: :math:`2 (D + 4)` bytes against
    :math:`4 D` for a float16 static cache, a ratio of 0.53 at D = 64 and
    0.52 at D = 128.

    Slots, positions, lengths and the room check are the static cache's: only
    how one row's keys and values are stored (:meth:`_store`) and read back
    (:meth:`view`) differ.

    Examples
    --------
    >>> import numpy as np
    >>> cache = QuantizedCache(batch=1, kv_heads=1, head_dim=4, max_len=8, dtype=np.float32)
    >>> x = np.array([[[[1.0, -0.5, 0.25, 0.0]]]], dtype=np.float32)
    >>> k, v, k_pos = cache.update(x, x)
    >>> float(np.abs(k - x).max()) <= 1.0 / 254
    True
    """

    STORAGE: ClassVar[tuple[str, ...]] = ("key_codes", "value_codes", "key_scales", "value_scales")

    def __init__(
        self,
        *,
        max_len: int,
        bits: int = 8,
        **common: Any,
    ) -> None:
        if isinstance(bits, bool) or not isinstance(bits, Integral):
            raise TypeError(f"bits must be an integer in [2, 8]; got {bits!r}")
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be an integer in [2, 8]; got {bits!r}")
        self.bits: int = int(bits)
        self.q_max: int = 2 ** (self.bits - 1) - 1
        super().__init__(max_len=max_len, **common)

    def _allocate(self) -> None:
        xp, B, H, S, on = self.xp, self.batch, self.kv_heads, self.max_len, self.device
        self.key_codes = xp.zeros((B, H, S, self.head_dim), dtype=xp.int8, device=on)
        self.value_codes = xp.zeros((B, H, S, self.value_dim), dtype=xp.int8, device=on)
        self.key_scales = xp.ones((B, H, S, 1), dtype=xp.float32, device=on)
        self.value_scales = xp.ones((B, H, S, 1), dtype=xp.float32, device=on)

    def quantize(self, x: Array) -> tuple[Array, Array]:
        """Codes and scales of x (..., D): symmetric, one scale per vector."""
        xp = self.xp
        x = xp.astype(x, xp.float32)
        scale = xp.max(xp.abs(x), axis=-1, keepdims=True) / self.q_max  # (..., 1)
        scale = xp.where(scale == 0, xp.ones_like(scale), scale)  # an all-zero vector: codes 0
        ratio = x / scale
        # A NaN or inf has no code: it keeps code 0 and its NaN or inf scale carries it.
        ratio = xp.where(xp.isfinite(ratio), ratio, xp.zeros_like(ratio))
        codes = xp.clip(xp.round(ratio), -self.q_max, self.q_max)
        return xp.astype(codes, xp.int8), scale

    def dequantize(self, codes: Array, scale: Array) -> Array:
        """codes * scale, in the cache's dtype."""
        xp = self.xp
        return xp.astype(xp.astype(codes, xp.float32) * scale, self.dtype)

    def _store(self, slots: tuple[Any, ...], k: Array, v: Array) -> None:
        """Quantize one row's new keys and values, (Hkv, n, D), into ``slots``."""
        k_codes, k_scales = self.quantize(k)
        v_codes, v_scales = self.quantize(v)
        self.key_codes = self._write(self.key_codes, slots, k_codes)
        self.key_scales = self._write(self.key_scales, slots, k_scales)
        self.value_codes = self._write(self.value_codes, slots, v_codes)
        self.value_scales = self._write(self.value_scales, slots, v_scales)

    def view(self) -> tuple[Array, Array, Array]:
        """The held slots, dequantized: (B, Hkv, max length, D) in the cache's dtype."""
        used = max(self._lengths)
        k = self.dequantize(self.key_codes[:, :, :used, :], self.key_scales[:, :, :used, :])
        v = self.dequantize(self.value_codes[:, :, :used, :], self.value_scales[:, :, :used, :])
        return k, v, self.xp.asarray(self.positions[:, :used], copy=True)  # the caller's own
