"""The quantized cache: keys and values stored as small integers with a scale per token and head
(KIVI-like storage, symmetric, dequantized on read)."""

from __future__ import annotations

from typing import Any

from refattn.caches.base import KVCache, _check_count
from refattn.namespace import Array


class QuantizedCache(KVCache):
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

    Examples
    --------
    >>> import numpy as np
    >>> cache = QuantizedCache(batch=1, kv_heads=1, head_dim=4, max_len=8, dtype=np.float32)
    >>> x = np.array([[[[1.0, -0.5, 0.25, 0.0]]]], dtype=np.float32)
    >>> k, v, k_pos = cache.update(x, x)
    >>> float(np.abs(k - x).max()) <= 1.0 / 254
    True
    """

    def __init__(
        self,
        *,
        max_len: int,
        bits: int = 8,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        _check_count("max_len", max_len, minimum=1)
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"bits must be an integer in [2, 8]; got {bits!r}")
        self.max_len, self.bits = max_len, bits
        self.q_max = 2 ** (bits - 1) - 1
        xp, B, H = self.xp, self.batch, self.kv_heads
        on = self.device
        self.key_codes = xp.zeros((B, H, max_len, self.head_dim), dtype=xp.int8, device=on)
        self.value_codes = xp.zeros((B, H, max_len, self.value_dim), dtype=xp.int8, device=on)
        self.key_scales = xp.ones((B, H, max_len, 1), dtype=xp.float32, device=on)
        self.value_scales = xp.ones((B, H, max_len, 1), dtype=xp.float32, device=on)
        self.positions = xp.full((B, max_len), -1, dtype=xp.int64, device=on)

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

    def _append(self, k_new: Array, v_new: Array, n: list[int]) -> None:
        self._check_room(n, self.max_len)
        new_pos = self._new_positions(n, k_new.shape[2])  # (B, T)
        for b in range(self.batch):
            start, end = self._lengths[b], self._lengths[b] + n[b]
            slots = (b, slice(None), slice(start, end), slice(None))
            k_codes, k_scales = self.quantize(k_new[b, :, : n[b], :])  # real tokens only
            v_codes, v_scales = self.quantize(v_new[b, :, : n[b], :])
            self.key_codes = self._write(self.key_codes, slots, k_codes)
            self.key_scales = self._write(self.key_scales, slots, k_scales)
            self.value_codes = self._write(self.value_codes, slots, v_codes)
            self.value_scales = self._write(self.value_scales, slots, v_scales)
            self.positions = self._write(self.positions, (b, slice(start, end)), new_pos[b, : n[b]])
            self._lengths[b] = end

    def view(self) -> tuple[Array, Array, Array]:
        """The held slots, dequantized: (B, Hkv, max length, D) in the cache's dtype."""
        used = max(self._lengths)
        k = self.dequantize(self.key_codes[:, :, :used, :], self.key_scales[:, :, :used, :])
        v = self.dequantize(self.value_codes[:, :, :used, :], self.value_scales[:, :, :used, :])
        return k, v, self.positions[:, :used]

    def _storage(self) -> list[Array]:
        return [self.key_codes, self.value_codes, self.key_scales, self.value_scales]
