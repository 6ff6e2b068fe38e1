"""Every KV cache the field uses, under one contract (see :mod:`refattn.caches.base`).

Caches store keys, values and positions; they import no attention code. The
positions they hand back (``k_pos``, -1 for an empty slot) are the whole
interface between a cache and :func:`refattn.attention`.
"""

from refattn.caches.base import KVCache
from refattn.caches.cross import CrossAttentionCache
from refattn.caches.dynamic import DynamicCache
from refattn.caches.kinds import KINDS, make_cache
from refattn.caches.paged import PagedCache
from refattn.caches.quantized import QuantizedCache
from refattn.caches.sliding import SlidingWindowCache
from refattn.caches.static import StaticCache

__all__ = [
    "KINDS",
    "CrossAttentionCache",
    "DynamicCache",
    "KVCache",
    "PagedCache",
    "QuantizedCache",
    "SlidingWindowCache",
    "StaticCache",
    "make_cache",
]
