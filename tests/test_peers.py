"""Cross-checks against an implementation written elsewhere (PyTorch SDPA), and the
conventions that map onto positions: top-left vs bottom-right, GQA as repeated heads."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from refattn import attention

QKV = tuple[np.ndarray, np.ndarray, np.ndarray]


@st.composite
def qkv(draw: st.DrawFn) -> QKV:
    kv_heads = draw(st.integers(1, 3))
    q_heads = kv_heads * draw(st.integers(1, 3))
    b, sq, sk = draw(st.integers(1, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    d = draw(st.sampled_from([1, 4, 8, 16]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return (
        rng.standard_normal((b, q_heads, sq, d)),
        rng.standard_normal((b, kv_heads, sk, d)),
        rng.standard_normal((b, kv_heads, sk, d)),
    )


def _sdpa(q: np.ndarray, k: np.ndarray, v: np.ndarray, **kwargs: Any) -> np.ndarray:
    """PyTorch's SDPA on NumPy arrays (an ``attn_mask`` too); the test skips without torch."""
    torch = pytest.importorskip("torch")
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    if isinstance(kwargs.get("attn_mask"), np.ndarray):
        kwargs["attn_mask"] = torch.from_numpy(kwargs["attn_mask"])
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True, **kwargs)
    return out.numpy()


@given(qkv(), st.none() | st.floats(0.05, 2.0))
def test_sdpa_is_causal_is_top_left_alignment(tensors: QKV, scale: float | None) -> None:
    """PyTorch's is_causal puts query i at position i: q_pos = arange(Sq)."""
    q, k, v = tensors
    sq = q.shape[2]
    # SDPA gives NaN for rows that see nothing; the spec gives 0 (tested elsewhere).
    assume(sq <= k.shape[2])
    ours = attention(q, k, v, causal=True, q_pos=np.arange(sq), scale=scale)
    np.testing.assert_allclose(ours, _sdpa(q, k, v, is_causal=True, scale=scale), atol=1e-12)


@given(qkv(), st.data())
def test_boolean_mask_means_keep_as_in_sdpa(tensors: QKV, data: st.DataObject) -> None:
    q, k, v = tensors
    b, hq, sq, _ = q.shape
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    mask = rng.random((b, hq, sq, k.shape[2])) < 0.7
    mask[..., 0] = True  # SDPA has no policy for empty rows worth comparing here
    ours = attention(q, k, v, mask=mask)
    theirs = _sdpa(q, k, v, attn_mask=mask)
    np.testing.assert_allclose(ours, theirs, atol=1e-12)


@given(qkv(), st.booleans(), st.none() | st.integers(1, 10))
def test_grouped_query_attention_equals_repeated_kv_heads(
    tensors: QKV, causal: bool, window: int | None
) -> None:
    """Query head h reads KV head h // G, as Llama's repeat_kv lays it out."""
    q, k, v = tensors
    group = q.shape[1] // k.shape[1]
    repeated = [np.repeat(x, group, axis=1) for x in (k, v)]
    np.testing.assert_allclose(
        attention(q, k, v, causal=causal, window=window),
        attention(q, *repeated, causal=causal, window=window),
        atol=1e-13,
    )


def test_equal_scores_average_the_visible_values() -> None:
    """q = k = ones: every visible key scores the same, so the output is their mean."""
    q, k = np.ones((1, 1, 4, 8)), np.ones((1, 1, 6, 8))
    v = np.arange(6.0).reshape(1, 1, 6, 1)
    out = np.asarray(attention(q, k, v, causal=True))[0, 0, :, 0]
    # Bottom-right: query i sits at position 2 + i and sees keys 0 .. 2 + i.
    np.testing.assert_allclose(out, [np.mean(np.arange(3 + i)) for i in range(4)])
