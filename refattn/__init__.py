"""refattn: the executable specification of scaled-dot-product attention with a KV cache.

One attention core, written against the Python array API standard, runs
unchanged on NumPy, CuPy, PyTorch and array-api-strict. Importing refattn
imports no framework: the namespace is found from the arrays passed in.
"""

from refattn.attention import attention
from refattn.backward import Gradients, attention_backward, attention_backward_blockwise
from refattn.blockwise import attention_blockwise, attention_split_kv
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
from refattn.merge import merge_states, merge_states_n

__all__ = [
    "CrossAttentionCache",
    "DynamicCache",
    "Gradients",
    "KVCache",
    "PagedCache",
    "QuantizedCache",
    "SlidingWindowCache",
    "StaticCache",
    "alibi_slopes",
    "attention",
    "attention_backward",
    "attention_backward_blockwise",
    "attention_blockwise",
    "attention_split_kv",
    "merge_states",
    "merge_states_n",
    "rope",
]
__version__ = "0.1.0"
