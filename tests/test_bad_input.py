"""Bad input fails at once with an error naming the argument, the expected and the given."""

from __future__ import annotations

import re

import numpy as np
import pytest

from refattn import attention, attention_blockwise, attention_split_kv

B, HQ, HKV, SQ, SK, D = 2, 4, 2, 3, 5, 8


@pytest.fixture
def qkv() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((B, HQ, SQ, D)),
        rng.standard_normal((B, HKV, SK, D)),
        rng.standard_normal((B, HKV, SK, D)),
    )


def _raises(error: type[Exception], *fragments: str):
    """pytest.raises whose message must contain every fragment, in order."""
    return pytest.raises(error, match=".*".join(re.escape(f) for f in fragments))


def test_wrong_rank_names_the_argument_and_its_layout(qkv):
    q, k, v = qkv
    with _raises(
        ValueError, "q must have 4 dimensions (B, Hq, Sq, D)", "(2, 4, 8)", "3 dimensions"
    ):
        attention(q[:, :, 0], k, v)
    with _raises(ValueError, "v must have 4 dimensions", "(2, 2, 5, 8, 1)"):
        attention(q, k, v[..., None])


def test_query_heads_must_be_a_multiple_of_key_heads(qkv):
    q, k, v = qkv
    with _raises(ValueError, "k has 3 heads but q has 4", "multiple"):
        attention(q, np.concatenate([k, k[:, :1]], 1), np.concatenate([v, v[:, :1]], 1))


def test_head_dim_of_q_and_k_must_match(qkv):
    q, k, v = qkv
    with _raises(ValueError, "k has head dim 7 but q has 8"):
        attention(q, k[..., :7], v)


def test_keys_and_values_must_have_the_same_length(qkv):
    q, k, v = qkv
    with _raises(ValueError, "k has 5 keys but v has 4 values"):
        attention(q, k, v[:, :, :4])


def test_batch_and_kv_heads_must_agree(qkv):
    q, k, v = qkv
    with _raises(ValueError, "batch sizes differ: q has 2, k has 1, v has 2"):
        attention(q, k[:1], v)
    with _raises(ValueError, "k has 2 heads but v has 1"):
        attention(q, k, v[:, :1])


def test_mixed_dtypes_are_refused(qkv):
    q, k, v = qkv
    with _raises(TypeError, "k has dtype float32 but q has float64"):
        attention(q, k.astype(np.float32), v)
    with _raises(TypeError, "q has dtype int64", "floating"):
        attention(q.astype(np.int64), k.astype(np.int64), v.astype(np.int64))


def test_arrays_from_two_libraries_are_refused(qkv):
    import array_api_strict as xs

    q, k, v = qkv
    with _raises(TypeError, "k is a array_api_strict array but q is a numpy array"):
        attention(q, xs.asarray(k), v)
    with _raises(TypeError, "k_pos is a array_api_strict array but q is a numpy array"):
        attention(q, k, v, k_pos=xs.arange(SK))
    with _raises(TypeError, "v must be an array", "got list"):
        attention(q, k, v.tolist())


def test_positions_need_an_integer_dtype_and_the_right_shape(qkv):
    q, k, v = qkv
    with _raises(TypeError, "q_pos must have an integer dtype; got float64"):
        attention(q, k, v, q_pos=np.arange(SQ, dtype=np.float64))
    with _raises(ValueError, "k_pos must have shape (2, 5), (1, 5) or (5,); got (2, 4)"):
        attention(q, k, v, k_pos=np.zeros((B, 4), dtype=np.int64))
    with _raises(ValueError, "q_pos must have shape (2, 3)", "got (3, 3)"):
        attention(q, k, v, q_pos=np.zeros((3, SQ), dtype=np.int64))


@pytest.mark.parametrize("window", [0, -3])
def test_window_must_be_at_least_one(qkv, window):
    with _raises(ValueError, f"window must be >= 1 (the query itself counts); got {window}"):
        attention(*qkv, window=window)


def test_sink_tokens_must_be_non_negative(qkv):
    with _raises(ValueError, "sink_tokens must be >= 0; got -1"):
        attention(*qkv, sink_tokens=-1)


@pytest.mark.parametrize("sink_tokens", [1.5, True, "2"])
def test_sink_tokens_must_be_an_integer_like_its_siblings(qkv, sink_tokens):
    """A wrong type is a TypeError, as for window, scale and softcap; a wrong value a ValueError."""
    with _raises(TypeError, f"sink_tokens must be an integer >= 0; got {sink_tokens!r}"):
        attention(*qkv, sink_tokens=sink_tokens)


def test_window_must_be_an_integer(qkv):
    with _raises(TypeError, "window must be an integer >= 1; got 2.5"):
        attention(*qkv, window=2.5)


@pytest.mark.parametrize("function", [attention, attention_blockwise, attention_split_kv])
def test_an_unknown_option_is_named_with_the_options_there_are(qkv, function):
    extra = {"num_splits": 2} if function is attention_split_kv else {}
    with _raises(TypeError, f"{function.__name__}() got unexpected keyword arguments ['casual']",
                 "its options are ['causal', 'q_pos'"):  # fmt: skip
        function(*qkv, casual=True, **extra)


@pytest.mark.parametrize("size", [0, -1])
def test_block_sizes_and_splits_must_be_at_least_one(qkv, size):
    with _raises(ValueError, f"block_k must be >= 1; got {size}"):
        attention_blockwise(*qkv, block_k=size)
    with _raises(ValueError, f"num_splits must be >= 1; got {size}"):
        attention_split_kv(*qkv, num_splits=size)


def test_block_sizes_must_be_integers(qkv):
    with _raises(TypeError, "block_q must be an integer >= 1; got 2.5"):
        attention_blockwise(*qkv, block_q=2.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("softcap", [0.0, -1.0, float("inf"), float("nan")])
def test_softcap_must_be_positive_and_finite(qkv, softcap):
    with _raises(ValueError, "softcap must be finite and > 0"):
        attention(*qkv, softcap=softcap)


def test_scale_must_be_a_finite_number(qkv):
    with _raises(TypeError, "scale must be a finite real number or None; got 'big'"):
        attention(*qkv, scale="big")
    with _raises(ValueError, "scale must be finite; got inf"):
        attention(*qkv, scale=float("inf"))


def test_missing_arrays_and_zero_head_dim_are_named(qkv):
    q, k, v = qkv
    with _raises(TypeError, "q must be an array; got None"):
        attention(None, k, v)
    with _raises(ValueError, "q has head dim 0; expected >= 1"):
        attention(q[..., :0], k[..., :0], v)


def test_flags_must_be_booleans(qkv):
    with _raises(TypeError, "causal must be True or False; got 'no'"):
        attention(*qkv, causal="no")


def test_arrays_on_another_device_are_named():
    import array_api_strict as xs

    rng = np.random.default_rng(0)
    cpu, other = xs.Device("CPU_DEVICE"), xs.Device("device1")
    q, k, v = (
        xs.asarray(rng.standard_normal(s), device=cpu)
        for s in ((1, 1, 2, 4), (1, 1, 3, 4), (1, 1, 3, 4))
    )
    with _raises(ValueError, "k_pos is on device", "but q is on"):
        attention(q, k, v, k_pos=xs.arange(3, device=other))


def test_alibi_slopes_and_sinks_need_one_value_per_query_head(qkv):
    with _raises(ValueError, "alibi_slopes must have shape (4,) or (2, 4); got (2,)"):
        attention(*qkv, alibi_slopes=np.ones(HKV))
    with _raises(ValueError, "sink_logits must have shape (4,); got (2, 4)"):
        attention(*qkv, sink_logits=np.ones((B, HQ)))
    with _raises(TypeError, "alibi_slopes must have a floating dtype; got int64"):
        attention(*qkv, alibi_slopes=np.ones(HQ, dtype=np.int64))


def test_mask_must_be_boolean_and_broadcastable(qkv):
    with _raises(TypeError, "mask must have dtype bool (True = keep); got float64"):
        attention(*qkv, mask=np.ones((SQ, SK)))
    with _raises(
        ValueError, "mask must be broadcastable to (B, Hq, Sq, Sk) = (2, 4, 3, 5); got shape (3, 4)"
    ):
        attention(*qkv, mask=np.ones((SQ, 4), dtype=bool))


def test_bias_must_be_floating_and_broadcastable(qkv):
    with _raises(ValueError, "bias must be broadcastable", "got shape (2, 4, 3, 6)"):
        attention(*qkv, bias=np.zeros((B, HQ, SQ, SK + 1)))
    with _raises(TypeError, "bias must have a floating dtype; got bool"):
        attention(*qkv, bias=np.zeros((SQ, SK), dtype=bool))
