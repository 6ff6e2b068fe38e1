"""Every cache kind by name, and one way to make an empty cache of a kind.

The models (``refattn.models.LayerCaches``), the decoding tests and the
verifier (``refattn.testing.decoding``) and the append benchmark all make
their caches here, so a kind means the same cache everywhere.
"""

from __future__ import annotations

from typing import Any

from refattn.caches.base import KVCache
from refattn.caches.cross import CrossAttentionCache
from refattn.caches.dynamic import DynamicCache
from refattn.caches.paged import PagedCache
from refattn.caches.quantized import QuantizedCache
from refattn.caches.sliding import SlidingWindowCache
from refattn.caches.static import StaticCache

#: The self-attention cache kinds, by name ("cross" is the cross-attention cache).
KINDS = ("static", "dynamic", "sliding", "paged", "quantized")


def make_cache(
    kind: str, *, batch: int, kv_heads: int, head_dim: int, capacity: int,
    window: int | None = None, sink_tokens: int = 0, block_size: int = 16,
    block_order: list[int] | None = None, bits: int = 8, dtype: Any = None, device: Any = None,
    xp: Any = None,
) -> KVCache:  # fmt: skip
    """An empty cache of ``kind`` (one of :data:`KINDS`, or ``"cross"``).

    ``capacity`` is the most tokens a row will hold: static and quantized
    caches preallocate it, a paged cache gets enough blocks for every row to
    reach it, and a sliding cache without a ``window`` keeps that many, so it
    never drops a key. ``window`` and ``sink_tokens`` are the sliding cache's,
    ``block_size`` and ``block_order`` the paged cache's, ``bits`` the quantized
    cache's.

    >>> make_cache("paged", batch=2, kv_heads=1, head_dim=4, capacity=20, block_size=8).num_blocks
    6
    """
    common: dict[str, Any] = {"batch": batch, "kv_heads": kv_heads, "head_dim": head_dim,
                              "dtype": dtype, "device": device, "xp": xp}  # fmt: skip
    if kind == "static":
        return StaticCache(**common, max_len=capacity)
    if kind == "dynamic":
        return DynamicCache(**common)
    if kind == "sliding":
        kept = capacity if window is None else window
        return SlidingWindowCache(**common, window=kept, sink_tokens=sink_tokens)
    if kind == "paged":
        blocks = batch * -(-capacity // block_size)
        return PagedCache(**common, block_size=block_size, num_blocks=blocks,
                          block_order=block_order)  # fmt: skip
    if kind == "quantized":
        return QuantizedCache(**common, max_len=capacity, bits=bits)
    if kind == "cross":
        return CrossAttentionCache(**common)
    raise ValueError(f"kind must be one of {(*KINDS, 'cross')}; got {kind!r}")
