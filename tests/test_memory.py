"""A decode step through a StaticCache reads the cached keys and values in place: no copy.

tracemalloc sees NumPy's allocations. One float32 decode step over 8192
cached tokens allocates a few arrays of scores, each Hq * S floats (1/32 of
K at these shapes), and must not allocate anything the size of K or V.
"""

from __future__ import annotations

import tracemalloc

import numpy as np

import refattn


def test_float32_decode_through_a_static_cache_copies_no_keys_or_values() -> None:
    B, Hq, Hkv, D, S = 1, 32, 8, 128, 8192
    rng = np.random.default_rng(0)
    cache = refattn.StaticCache(batch=B, kv_heads=Hkv, head_dim=D, max_len=S, dtype=np.float32)
    history = rng.standard_normal((B, Hkv, S - 1, D), dtype=np.float32)
    cache.update(history, history)
    q = rng.standard_normal((B, Hq, 1, D), dtype=np.float32)
    k_new = rng.standard_normal((B, Hkv, 1, D), dtype=np.float32)
    tracemalloc.start()
    try:
        q_pos = cache.lengths[:, None]
        k, v, k_pos = cache.update(k_new, k_new)
        out = refattn.attention(q, k, v, causal=True, q_pos=q_pos, k_pos=k_pos)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.asarray(out).shape == (B, Hq, 1, D)
    assert k.nbytes == B * Hkv * S * D * 4
    assert peak < k.nbytes / 4, f"a decode step allocated {peak} bytes; K is {k.nbytes}"
