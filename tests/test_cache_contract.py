"""What every cache says about itself: how to attend to it, what it takes, where it stores."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from refattn import attention
from refattn.caches import KINDS, PagedCache, QuantizedCache, StaticCache, make_cache

SHAPE: dict[str, Any] = {"batch": 2, "kv_heads": 1, "head_dim": 4, "dtype": np.float64}


@pytest.mark.parametrize("kind", [*KINDS, "cross"])
def test_only_the_ring_implies_attention_options(kind: str) -> None:
    own = {"sliding": {"window": 3, "sink_tokens": 2}}.get(kind, {})
    cache = make_cache(kind, max_len=8, **SHAPE, **own)
    expected = {"window": 3, "sink_tokens": 2} if kind == "sliding" else {}
    assert cache.attention_options == expected
    cache.attention_options["window"] = 99  # a new dict each time: the cache is untouched
    assert cache.attention_options == expected


def test_decoding_through_the_ring_with_its_options_equals_windowed_attention() -> None:
    """Chunks through a ring of 3 slots plus 1 sink, against a plain NumPy loop.

    A chunk's queries see the ring's old slots and the whole chunk, so only the
    window the cache names keeps its early queries from seeing too much.
    """
    rng = np.random.default_rng(0)
    S, W, sinks = 9, 3, 1
    q, k, v = (rng.standard_normal((1, 1, S, 4)) for _ in range(3))
    cache = make_cache("sliding", max_len=S, batch=1, kv_heads=1, head_dim=4, dtype=np.float64,
                       window=W, sink_tokens=sinks)  # fmt: skip
    start, differs = 0, False
    for T in (4, 3, 2):
        chunk = slice(start, start + T)
        q_pos = cache.lengths[:, None] + np.arange(T)[None, :]
        k_all, v_all, k_pos = cache.update(k[:, :, chunk], v[:, :, chunk])
        seeing = {"causal": True, "q_pos": q_pos, "k_pos": k_pos}
        out = np.asarray(attention(q[:, :, chunk], k_all, v_all, **seeing,
                                   **cache.attention_options))  # fmt: skip
        for i, t in enumerate(range(start, start + T)):
            seen = [j for j in range(t + 1) if t - j < W or j < sinks]
            s = np.array([q[0, 0, t] @ k[0, 0, j] / 2.0 for j in seen])
            p = np.exp(s - s.max())
            expected = (p / p.sum()) @ v[0, 0, seen]
            np.testing.assert_allclose(out[0, 0, i], expected, rtol=1e-12, atol=1e-12)
        differs |= not np.allclose(attention(q[:, :, chunk], k_all, v_all, **seeing), out)
        start += T
    assert differs  # without the cache's options the chunks' early queries see too much


@pytest.mark.parametrize(
    ("kind", "option"), [("static", "window"), ("dynamic", "bits"), ("paged", "sink_tokens")]
)
def test_an_option_the_kind_does_not_take_is_named(kind: str, option: str) -> None:
    with pytest.raises(TypeError, match=f"a {kind} cache takes no {option}; its own keywords"):
        make_cache(kind, max_len=8, **SHAPE, **{option: 1})


def test_make_cache_keeps_each_kinds_own_defaults() -> None:
    paged = make_cache("paged", max_len=40, **SHAPE)
    assert isinstance(paged, PagedCache)
    assert paged.block_size == PagedCache.DEFAULT_BLOCK_SIZE
    assert paged.num_blocks == 2 * -(-40 // paged.block_size)
    quantized = make_cache("quantized", max_len=8, **SHAPE)
    assert isinstance(quantized, QuantizedCache) and quantized.bits == 8
    assert make_cache("sliding", max_len=8, **SHAPE).attention_options == {
        "window": 8, "sink_tokens": 0,
    }  # fmt: skip


def test_a_paged_pool_derived_from_a_bad_block_size_or_max_len_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="block_size must be an integer >= 1; got 0"):
        make_cache("paged", max_len=8, block_size=0, **SHAPE)
    with pytest.raises(ValueError, match="max_len must be an integer >= 1; got 0"):
        make_cache("paged", max_len=0, **SHAPE)
    named = make_cache("paged", max_len=8, num_blocks=3, **SHAPE)
    assert isinstance(named, PagedCache) and named.num_blocks == 3


def test_quantized_and_static_caches_write_the_same_slots_for_a_ragged_update() -> None:
    rng = np.random.default_rng(1)
    static = StaticCache(max_len=6, **SHAPE)
    quantized = QuantizedCache(max_len=6, **SHAPE)
    for T, n_new in ((3, [3, 1]), (2, [0, 2]), (1, [1, 1])):
        k, v = rng.standard_normal((2, 2, 1, T, 4))
        for cache in (static, quantized):
            cache.update(k, v, n_new)
        assert quantized.lengths.tolist() == static.lengths.tolist()
        np.testing.assert_array_equal(quantized.view()[2], static.view()[2])
        np.testing.assert_allclose(quantized.view()[0], static.view()[0], atol=0.02)


def test_an_overflowing_quantized_update_leaves_the_cache_as_it_was() -> None:
    cache = QuantizedCache(max_len=4, **SHAPE)
    cache.update(np.ones((2, 1, 3, 4)), np.ones((2, 1, 3, 4)))
    before = [np.array(getattr(cache, name)) for name in (*cache.STORAGE, "positions")]
    with pytest.raises(ValueError, match="overflow: row 0 holds 3 tokens"):
        cache.update(np.ones((2, 1, 2, 4)), np.ones((2, 1, 2, 4)))
    after = [np.array(getattr(cache, name)) for name in (*cache.STORAGE, "positions")]
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(old, new)
    assert cache.lengths.tolist() == [3, 3]


@pytest.mark.parametrize("kind", [*KINDS, "cross"])
def test_nbytes_counts_exactly_the_arrays_the_kind_names_as_storage(kind: str) -> None:
    cache = make_cache(kind, max_len=8, **SHAPE)
    cache.update(np.ones((2, 1, 3, 4)), np.ones((2, 1, 3, 4)))
    assert cache.nbytes == sum(np.asarray(getattr(cache, n)).nbytes for n in cache.STORAGE)
    assert cache.nbytes > 0


def test_the_cross_attention_cache_keeps_copies_of_the_callers_arrays() -> None:
    cache = make_cache("cross", max_len=3, **SHAPE)
    k, v = np.ones((2, 1, 3, 4)), np.ones((2, 1, 3, 4))
    cache.update(k, v)
    k[...] = np.nan  # the caller reuses its buffer for the next input
    assert not np.isnan(cache.update(None, None)[0]).any()
