"""refattn: the executable specification of scaled-dot-product attention with a KV cache.

One attention core, written against the Python array API standard, runs
unchanged on NumPy, CuPy, PyTorch and array-api-strict. Importing refattn
imports no framework: the namespace is found from the arrays passed in.
"""

from refattn.attention import attention
from refattn.caches import (
    CrossAttentionCache,
    DynamicCache,
    KVCache,
    PagedCache,
    QuantizedCache,
    SlidingWindowCache,
    StaticCache,
)
from refattn.encodings import alibi_slopes, rope

__all__ = [
    "CrossAttentionCache",
    "DynamicCache",
    "KVCache",
    "PagedCache",
    "QuantizedCache",
    "SlidingWindowCache",
    "StaticCache",
    "alibi_slopes",
    "attention",
    "rope",
]
__version__ = "0.1.0"
