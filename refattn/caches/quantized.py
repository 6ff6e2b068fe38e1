"""The quantized cache: keys and values stored as 8-bit codes and float32 scales, dequantized on
read: small integers with a scale per token and head (KIVI-like), or fp8 (e4m3, e5m2) with a
scale per token and head, per KV head or per tensor (the scaled fp8 KV caches of serving
engines)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral
from typing import Any, ClassVar

from refattn.caches.static import StaticCache
from refattn.namespace import Array, Namespace


@dataclass(frozen=True)
class Float8:
    """An fp8 storage format: its dtype's name, mantissa bits, least normal exponent and
    largest finite value (OCP's 8-bit floating point formats; e4m3 is the ``fn`` variant,
    finite only, as NVIDIA's and AMD's kernels use it)."""

    dtype: str
    mantissa: int
    min_exponent: int
    largest: float


#: The fp8 formats by name. A normal value x is stored within a relative
#: :math:`2^{-(m+1)}` of itself (half its spacing); below the least normal,
#: within half the least spacing :math:`2^{e_{min} - m}`; past ``largest`` it has no code.
FLOAT8 = {
    "e4m3": Float8("float8_e4m3fn", mantissa=3, min_exponent=-6, largest=448.0),
    "e5m2": Float8("float8_e5m2", mantissa=2, min_exponent=-14, largest=57344.0),
}
#: The code formats: ``bits``-bit integers, or one of :data:`FLOAT8`.
FORMATS = ("int8", *FLOAT8)
#: How many values share a scale: each token's vector of one KV head, every token of one
#: KV head (over the batch), or the whole cache.
SCALES = ("token", "head", "tensor")


class QuantizedCache(StaticCache):
    r"""A static cache whose keys and values are stored as 8-bit codes and float32 scales.

    ``format="int8"`` (the default) stores each token's key (and value) vector
    of one head, :math:`x \in \mathbb{R}^D`, as integer codes :math:`c =
    \text{round}(x / s)` with one scale :math:`s = \max_d |x_d| / q_{max}`,
    :math:`q_{max} = 2^{\text{bits}-1} - 1`, read back as :math:`\hat x = c \cdot s`:

    .. math::  |x_d - \hat x_d| \le s / 2 = \max_d |x_d| / (2 q_{max}).

    ``format="e4m3"`` or ``"e5m2"`` stores :math:`x / s` as an fp8 number
    (:data:`FLOAT8`: 3 or 2 mantissa bits, largest finite value
    :math:`F` = 448 or 57344), rounded to nearest, so that the error is
    relative: at most :math:`2^{-4} |x_d|` (e4m3) or :math:`2^{-3} |x_d|`
    (e5m2), and half the least subnormal spacing times :math:`s` below the
    least normal. ``scales`` says which values share :math:`s`:

    - ``"token"``: one per token and head, :math:`s = \max_d |x_d| / F`, fixed
      when the token arrives, so appending never re-quantizes old tokens, and
      keys with outlier channels cost accuracy only for the tokens that have
      them;
    - ``"head"``: one per KV head (shared by the batch), ``"tensor"``: one for
      the whole cache. It is fixed at the first update, :math:`\max |x| / F`
      over that update's tokens, as a static calibration fixes it. A later
      token that it cannot hold is never clipped: the scale grows by the
      least power of two that holds it, and the codes already stored are
      divided by that power, which is exact for every code that stays
      normal. So every stored value keeps its relative error bound, and those
      that fall below the least normal lose at most one least spacing in all
      (:math:`2^{e_{min}-m}` times the final scale, a geometric sum of half
      spacings). A non-finite element has no scale to share: it is stored as
      NaN (e4m3 has no infinity) and scales are taken over the finite ones.
      Releasing rows keeps the scale.

    Integer codes take only ``scales="token"``; fp8 codes need a float8 dtype,
    which NumPy has through ml_dtypes and PyTorch has itself (CuPy and
    array-api-strict have none: such a cache is refused with a clear error).
    The consequence on attention is bounded in
    :func:`refattn.testing.tolerance.quantized_output_bound` (and, for int8,
    :func:`refattn.testing.tolerance.quantized_error_bound`).

    Codes are stored as int8 whatever ``bits`` (2 to 8: no packing) or as the
    fp8 dtype, scales as float32. Memory per token and head with per-token
    scales: :math:`2 (D + 4)` bytes against :math:`4 D` for a float16 static
    cache, a ratio of 0.53 at D = 64 and 0.52 at D = 128; with shared scales,
    :math:`2 D`.

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

    fp8 codes with one scale for the cache, fixed by the first update; a later,
    larger token raises it instead of being clipped:

    >>> fp8 = QuantizedCache(batch=1, kv_heads=1, head_dim=4, max_len=8, format="e4m3",
    ...                      scales="tensor")
    >>> _ = fp8.update(x, x)
    >>> fp8.key_codes.dtype.name, fp8.key_scales.shape
    ('float8_e4m3fn', (1, 1, 1, 1))
    >>> round(448 * float(fp8.key_scales[0, 0, 0, 0]), 6)  # max |x| / 448
    1.0
    >>> k, v, k_pos = fp8.update(8 * x, 8 * x)
    >>> k[0, 0, :, 0].tolist(), round(448 * float(fp8.key_scales[0, 0, 0, 0]), 6)
    ([1.0, 8.0], 8.0)
    """

    STORAGE: ClassVar[tuple[str, ...]] = ("key_codes", "value_codes", "key_scales", "value_scales")
    #: The code formats and scale groupings it takes (what ``check_cache`` draws from).
    FORMATS: ClassVar[tuple[str, ...]] = FORMATS
    SCALES: ClassVar[tuple[str, ...]] = SCALES

    def __init__(
        self,
        *,
        max_len: int,
        bits: int | None = None,
        format: str = "int8",
        scales: str = "token",
        **common: Any,
    ) -> None:
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}; got {format!r}")
        if scales not in SCALES:
            raise ValueError(f"scales must be one of {SCALES}; got {scales!r}")
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, Integral)):
            raise TypeError(f"bits must be an integer in [2, 8]; got {bits!r}")
        if format == "int8":
            if bits is not None and not 2 <= bits <= 8:
                raise ValueError(f"bits must be an integer in [2, 8]; got {bits!r}")
            if scales != "token":
                raise ValueError(
                    f"scales must be 'token' for format='int8' (integer codes keep one scale per "
                    f"token and head; shared scales need format 'e4m3' or 'e5m2'); got {scales!r}"
                )
        elif bits not in (None, 8):
            raise ValueError(f"bits must be 8 (or not given) for format={format!r}; got {bits!r}")
        self.format, self.scales = format, scales
        self.bits: int = 8 if bits is None else int(bits)
        self.float8: Float8 | None = FLOAT8.get(format)
        #: The largest code magnitude: :math:`2^{\text{bits}-1} - 1`, or the fp8 format's largest.
        self.q_max: float = self.float8.largest if self.float8 else 2 ** (self.bits - 1) - 1
        super().__init__(max_len=max_len, **common)

    def _allocate(self) -> None:
        xp, B, H, S, on = self.xp, self.batch, self.kv_heads, self.max_len, self.device
        codes = xp.int8 if self.float8 is None else float8_dtype(xp, self.format)
        self.key_codes = xp.zeros((B, H, S, self.head_dim), dtype=codes, device=on)
        self.value_codes = xp.zeros((B, H, S, self.value_dim), dtype=codes, device=on)
        shape = {"token": (B, H, S, 1), "head": (1, H, 1, 1), "tensor": (1, 1, 1, 1)}[self.scales]
        # A shared scale of 0 is one no update has fixed yet.
        fill = xp.ones if self.scales == "token" else xp.zeros
        self.key_scales = fill(shape, dtype=xp.float32, device=on)
        self.value_scales = fill(shape, dtype=xp.float32, device=on)

    # -- codes and scales -----------------------------------------------------

    def quantize(self, x: Array, scale: Array | None = None) -> tuple[Array, Array]:
        """Codes of x (..., D) and their scales: one per vector, or ``scale`` (a shared one)."""
        xp = self.xp
        x = xp.astype(x, xp.float32)
        if scale is None:
            scale = xp.max(xp.abs(x), axis=-1, keepdims=True) / self.q_max  # (..., 1)
        # An all-zero vector (or a shared scale no nonzero value has fixed yet): codes 0.
        scale = xp.where(scale == 0, xp.ones_like(scale), scale)
        return self.encode(x / scale, shared=self.scales != "token"), scale

    def encode(self, ratio: Array, *, shared: bool) -> Array:
        """Codes of ``ratio = x / scale`` (float32): rounded to the nearest code, never past
        the largest. A NaN or inf has no code: with a scale of its own (per token) it keeps
        code 0 and its scale carries it; with a shared scale it is stored as NaN."""
        xp = self.xp
        finite = xp.isfinite(ratio)
        kept = xp.clip(ratio, -self.q_max, self.q_max)
        if self.float8 is None:
            codes = xp.round(xp.where(finite, kept, xp.zeros_like(ratio)))
            return xp.astype(codes, xp.int8)
        nan = xp.full_like(ratio, math.nan)
        codes = xp.where(finite, kept, nan if shared else xp.zeros_like(ratio))
        return xp.astype(codes, self.key_codes.dtype)  # rounds to nearest, ties to even

    def dequantize(self, codes: Array, scale: Array) -> Array:
        """codes * scale, in the cache's dtype."""
        xp = self.xp
        return xp.astype(xp.astype(codes, xp.float32) * scale, self.dtype)

    def _shared_scale(self, old: Array, x: Array, n: list[int]) -> Array:
        """The shared scale (1, H or 1, 1, 1) after an update of x (B, H, T, D) whose row b
        has ``n[b]`` real tokens: the first update's, then raised by powers of two."""
        xp = self.xp
        slot = xp.arange(x.shape[2], device=self.device)[None, :]  # (1, T)
        real = slot < xp.asarray(n, device=self.device)[:, None]  # (B, T)
        size = xp.astype(xp.abs(x), xp.float32)
        size = xp.where(real[:, None, :, None] & xp.isfinite(size), size, xp.zeros_like(size))
        axes = (0, 2, 3) if self.scales == "head" else (0, 1, 2, 3)
        needed = xp.max(size, axis=axes, keepdims=True) / self.q_max  # (1, H or 1, 1, 1)
        safe = xp.where(old > 0, old, xp.ones_like(old))
        power = xp.ceil(xp.log2(xp.where(needed > old, needed / safe, xp.ones_like(old))))
        grown = old * xp.pow(xp.asarray(2.0, dtype=xp.float32, device=self.device), power)
        # Rounding may leave a power one short: the next one holds it.
        grown = xp.where(grown < needed, 2 * grown, grown)
        return xp.where(old > 0, xp.where(needed > old, grown, old), needed)

    def _rescaled(self, codes: Array, old: Array, new: Array) -> Array:
        """Stored codes re-expressed in the larger scale (exact for fp8 codes that stay normal)."""
        xp = self.xp
        factor = xp.where(old > 0, old / new, xp.ones_like(old))  # a power of two, at most 1
        return self.encode(xp.astype(codes, xp.float32) * factor, shared=True)

    # -- the static cache's hooks ----------------------------------------------

    def _append(self, k_new: Array, v_new: Array, n: list[int]) -> None:
        """With shared scales, raise them (re-expressing the stored codes) before any row is
        written, so every row of an update is stored in the same scale."""
        if self.scales != "token" and k_new.shape[2] > 0:
            self._check_room(n, self.max_len)  # before any change, so a refused update changes none
            for codes, scales, x in (("key_codes", "key_scales", k_new),
                                     ("value_codes", "value_scales", v_new)):  # fmt: skip
                old = getattr(self, scales)
                new = self._shared_scale(old, x, n)
                setattr(self, codes, self._rescaled(getattr(self, codes), old, new))
                setattr(self, scales, new)
        super()._append(k_new, v_new, n)

    def _store(self, slots: tuple[Any, ...], k: Array, v: Array) -> None:
        """Quantize one row's new keys and values, (Hkv, n, D), into ``slots``."""
        shared = self.scales != "token"
        k_codes, k_scales = self.quantize(k, self.key_scales[0] if shared else None)
        v_codes, v_scales = self.quantize(v, self.value_scales[0] if shared else None)
        self.key_codes = self._write(self.key_codes, slots, k_codes)
        self.value_codes = self._write(self.value_codes, slots, v_codes)
        if not shared:
            self.key_scales = self._write(self.key_scales, slots, k_scales)
            self.value_scales = self._write(self.value_scales, slots, v_scales)

    def view(self) -> tuple[Array, Array, Array]:
        """The held slots, dequantized: (B, Hkv, max length, D) in the cache's dtype."""
        used = max(self._lengths)
        token = self.scales == "token"
        k_scales = self.key_scales[:, :, :used, :] if token else self.key_scales
        v_scales = self.value_scales[:, :, :used, :] if token else self.value_scales
        k = self.dequantize(self.key_codes[:, :, :used, :], k_scales)
        v = self.dequantize(self.value_codes[:, :, :used, :], v_scales)
        return k, v, self.xp.asarray(self.positions[:, :used], copy=True)  # the caller's own


def float8_dtype(xp: Namespace, format: str) -> Any:
    """The fp8 dtype of ``format`` (:data:`FLOAT8`) in the library of ``xp``.

    PyTorch names it itself; NumPy has it through ml_dtypes (as it has
    bfloat16), imported here only when an fp8 cache is made on NumPy. A
    library with neither is refused, naming the format.

    >>> import array_api_compat.numpy as xp
    >>> float8_dtype(xp, "e5m2").__name__
    'float8_e5m2'
    """
    name = FLOAT8[format].dtype
    found = getattr(xp, name, None)
    if found is not None:
        return found
    if "numpy" in xp.__name__.split("."):
        try:
            import ml_dtypes
        except ImportError:
            raise ImportError(
                f"format={format!r} on NumPy needs ml_dtypes for its {name} dtype "
                f"(pip install ml_dtypes)"
            ) from None
        return getattr(ml_dtypes, name)
    raise TypeError(
        f"format={format!r} needs a {name} dtype, which {xp.__name__} does not have; "
        f"use format='int8' there"
    )
