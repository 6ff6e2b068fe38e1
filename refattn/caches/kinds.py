"""Every cache kind by name, and one way to make an empty cache of a kind.

The models (``refattn.models.LayerCaches``), the test suite and the self-check
(through ``refattn.testing.decoding.cache_on``) and the append benchmark make
their caches here, so a kind means the same cache everywhere.
"""

from __future__ import annotations

import inspect
from typing import Any

from refattn.caches.base import KVCache, _check_count
from refattn.caches.cross import CrossAttentionCache
from refattn.caches.dynamic import DynamicCache
from refattn.caches.paged import PagedCache
from refattn.caches.quantized import QuantizedCache
from refattn.caches.sliding import SlidingWindowCache
from refattn.caches.static import StaticCache

#: The self-attention cache kinds, by name ("cross" is the cross-attention cache).
KINDS = ("static", "dynamic", "sliding", "paged", "quantized")

_CLASSES: dict[str, type[KVCache]] = {
    "static": StaticCache,
    "dynamic": DynamicCache,
    "sliding": SlidingWindowCache,
    "paged": PagedCache,
    "quantized": QuantizedCache,
    "cross": CrossAttentionCache,
}
_COMMON = ("batch", "kv_heads", "head_dim", "value_dim", "dtype", "device", "xp")


def make_cache(kind: str, *, max_len: int, **arguments: Any) -> KVCache:
    """An empty cache of ``kind`` (one of :data:`KINDS`, or ``"cross"``) whose rows will
    hold at most ``max_len`` tokens.

    ``arguments`` are the keywords every cache takes (``batch``, ``kv_heads``,
    ``head_dim``, ``dtype``, ...) and the kind's own, passed through with the
    kind's own defaults. ``max_len`` is what each kind needs of it: static and
    quantized caches preallocate it, a paged cache gets enough blocks for
    every row to reach it (unless ``num_blocks`` is named), and a sliding
    cache without a ``window`` keeps that many, so it never drops a key. A
    keyword the kind does not take is a TypeError naming it.

    >>> make_cache("paged", batch=2, kv_heads=1, head_dim=4, max_len=20, block_size=8).num_blocks
    6
    >>> make_cache("static", batch=1, kv_heads=1, head_dim=4, max_len=8, window=4)
    Traceback (most recent call last):
    ...
    TypeError: a static cache takes no window; its own keywords are ['max_len']
    """
    if kind not in _CLASSES:
        raise ValueError(f"kind must be one of {(*KINDS, 'cross')}; got {kind!r}")
    cls = _CLASSES[kind]
    own = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "common")]
    unknown = sorted(set(arguments) - set(own) - set(_COMMON))
    if unknown:
        raise TypeError(f"a {kind} cache takes no {', '.join(unknown)}; its own keywords are {own}")
    max_len = _check_count("max_len", max_len, minimum=1)
    if kind == "sliding":
        arguments.setdefault("window", max_len)
    if kind == "paged":
        block_size = arguments.setdefault("block_size", PagedCache.DEFAULT_BLOCK_SIZE)
        if "num_blocks" not in arguments:
            # Checked here, before the pool's size is derived from them.
            block_size = _check_count("block_size", block_size, minimum=1)
            batch = _check_count("batch", arguments.get("batch"), minimum=1)
            arguments["num_blocks"] = batch * -(-max_len // block_size)
    if "max_len" in own:
        arguments["max_len"] = max_len
    return cls(**arguments)
