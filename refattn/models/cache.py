"""One KV cache per layer, made by kind, and the legacy ``past_key_values`` layout.

A decoder keeps a cache per layer; :class:`LayerCaches` holds them and makes
them alike. The legacy layout of Hugging Face (a tuple with one ``(k, v)``
pair per layer, each (B, Hkv, S, D) in position order) is what older code
and checkpoints pass around; :meth:`LayerCaches.to_legacy` and
:meth:`LayerCaches.from_legacy` convert.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from refattn.caches import KINDS, KVCache, make_cache
from refattn.namespace import Array, Namespace, index_dtype

Legacy = tuple[tuple[Array, Array], ...]


class LayerCaches(Sequence[KVCache]):
    """``layers`` caches of one ``kind``, the same shape each.

    Parameters
    ----------
    kind : one of :data:`KINDS`
    layers, batch, kv_heads, head_dim : shapes
    max_len : the most tokens a row will hold (static, paged and quantized
        preallocate it; a sliding cache without a window keeps that many, so it
        never drops a key a full-attention model needs)
    dtype, device, xp : where the caches live
    **options : the kind's own keywords (the sliding cache's ``window`` and
        ``sink_tokens``, the paged cache's ``block_size``, the quantized cache's
        ``bits``), with the kind's defaults (see :func:`refattn.caches.make_cache`)

    >>> import numpy as np
    >>> caches = LayerCaches("static", layers=2, batch=1, kv_heads=1, head_dim=4, max_len=8)
    >>> _ = caches[0].update(np.ones((1, 1, 3, 4), np.float32), np.ones((1, 1, 3, 4), np.float32))
    >>> caches[0].lengths.tolist(), len(caches)
    ([3], 2)
    """

    def __init__(
        self, kind: str, *, layers: int, batch: int, kv_heads: int, head_dim: int,
        max_len: int, dtype: Any = None, device: Any = None, xp: Namespace | None = None,
        **options: Any,
    ) -> None:  # fmt: skip
        if kind not in KINDS:
            raise ValueError(f"cache must be one of {KINDS}; got {kind!r}")
        self.kind = kind
        shape: dict[str, Any] = {
            "batch": batch, "kv_heads": kv_heads, "head_dim": head_dim, "max_len": max_len,
            "dtype": dtype, "device": device, "xp": xp, **options,
        }  # fmt: skip
        self.layers: list[KVCache] = [make_cache(kind, **shape) for _ in range(layers)]

    def __getitem__(self, i: int) -> KVCache:  # type: ignore[override]
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[KVCache]:
        return iter(self.layers)

    @property
    def lengths(self) -> Array:
        """(B,) tokens seen per row (the same in every layer)."""
        return self.layers[0].lengths

    def to_legacy(self) -> Legacy:
        """``((k, v), ...)`` per layer, (B, Hkv, S, D) in position order.

        Every row must hold the same positions (a window's tokens in a sliding
        cache), as the legacy layout has no padding.
        """
        return tuple(_in_position_order(cache) for cache in self.layers)

    @classmethod
    def from_legacy(cls, past: Legacy, kind: str = "dynamic", **shape: Any) -> LayerCaches:
        """Caches of ``kind`` holding ``past``: per layer (k, v) at positions 0..S-1."""
        k0 = past[0][0]
        B, H, S, D = k0.shape
        from array_api_compat import array_namespace, device

        xp = array_namespace(k0)
        shape = {"max_len": S, **shape}
        caches = cls(kind, layers=len(past), batch=B, kv_heads=H, head_dim=D,
                     dtype=k0.dtype, device=device(k0), xp=xp, **shape)  # fmt: skip
        for cache, (k, v) in zip(caches, past, strict=True):
            cache.append(k, v)
        return caches


def _in_position_order(cache: KVCache) -> tuple[Array, Array]:
    """A cache's tokens as (B, H, S, D) sorted by position, empty slots dropped."""
    xp = cache.xp
    k, v, k_pos = cache.view()
    order = xp.argsort(k_pos, axis=-1, stable=True)  # empty slots (-1) first
    held = int(xp.sum(xp.astype(k_pos[0, :] >= 0, index_dtype(xp))))
    rows = []
    for b in range(k.shape[0]):
        kept = order[b, k.shape[2] - held :]
        rows.append((xp.take(k[b], kept, axis=1), xp.take(v[b], kept, axis=1)))
    return xp.stack([r[0] for r in rows]), xp.stack([r[1] for r in rows])
