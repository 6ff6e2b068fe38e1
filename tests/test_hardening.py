"""Hardening: what no query sees stays out of the results, bad arguments are named, caches
keep their own state to themselves, and ``python -m refattn`` runs the command line.

Each test states one property the library holds and would fail if it did not.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import pytest

import refattn
from refattn import (
    CrossAttentionCache,
    DynamicCache,
    KVCache,
    PagedCache,
    QuantizedCache,
    SlidingWindowCache,
    StaticCache,
    attention,
    attention_blockwise,
    attention_split_kv,
)
from refattn.caches import KINDS, make_cache
from refattn.models import GPT, GPTConfig, LayerCaches, Llama, LlamaConfig
from refattn.models.decoder import Decoder
from tests.test_caches import assert_same_state

FORMS: dict[str, Callable[..., Any]] = {
    "attention": attention,
    "blockwise": partial(attention_blockwise, block_q=2, block_k=3),
    "split_kv": partial(attention_split_kv, num_splits=3),
}
NOT_FINITE = {"+inf": np.inf, "-inf": -np.inf, "nan": np.nan}


def seen_by(q_pos: np.ndarray, k_pos: np.ndarray, *, causal: bool, window: int | None) -> Any:
    """(B, Sq, Sk): which key each query sees, written out from the definition."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    seen = (k >= 0) & (~causal | (k <= q))
    return seen & (q - k < window) if window is not None else seen


# -- 1. inf and NaN in slots no query sees: no warning, no effect ------------------------------

#: (B, Sq) query positions and (B, Sk) key positions per layout; each hides some slots from
#: every query of its row in its own way, and the hidden slots sit between seen ones.
HIDDEN: dict[str, dict[str, Any]] = {
    "empty slots": dict(
        k_pos=[[0, -1, 1, 2, 3, -1, 4, 5, 6], [0, 1, -1, 2, -1, 3, 4, -1, 5]],
        q_pos=[[4, 5, 6], [3, 4, 5]], causal=False, window=None,
    ),
    "after every causal query": dict(
        k_pos=[[0, 8, 1, 2, 3, 7, 4, 5, 6], [6, 0, 7, 1, 2, 8, 3, 4, 5]],
        q_pos=[[4, 5, 6], [3, 4, 5]], causal=True, window=None,
    ),
    "outside every window": dict(
        k_pos=[[0, 3, 1, 4, 2, 5, 6, 7, 8], [8, 0, 3, 1, 4, 2, 5, 6, 7]],
        q_pos=[[6, 7, 8], [5, 6, 7]], causal=True, window=2,
    ),
}  # fmt: skip


def hidden_problem(layout: str) -> tuple[dict[str, Any], dict[str, Any], np.ndarray]:
    """q, k, v (B=2, Hq=4, Hkv=2, Dv != D), the options, and (B, Sk): slots no query sees."""
    spec = HIDDEN[layout]
    q_pos, k_pos = np.array(spec["q_pos"]), np.array(spec["k_pos"])
    rng = np.random.default_rng(1)
    arrays = {"q": rng.standard_normal((2, 4, 3, 4)), "k": rng.standard_normal((2, 2, 9, 4)),
              "v": rng.standard_normal((2, 2, 9, 3))}  # fmt: skip
    options = dict(q_pos=q_pos, k_pos=k_pos, causal=spec["causal"], window=spec["window"])
    hidden = ~seen_by(q_pos, k_pos, causal=spec["causal"], window=spec["window"]).any(axis=1)
    assert hidden.any() and not hidden.all(axis=1).any()
    return arrays, options, hidden


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bad", NOT_FINITE)
@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("layout", HIDDEN)
def test_inf_and_nan_in_slots_no_query_sees_change_nothing_and_raise_no_warning(
    form: str, bad: str, where: str, layout: str
) -> None:
    arrays, options, hidden = hidden_problem(layout)
    fn = FORMS[form]
    expected_out, expected_lse = fn(**arrays, **options, return_lse=True)
    poisoned = {**arrays, where: arrays[where].copy()}
    poisoned[where][np.nonzero(hidden)[0], :, np.nonzero(hidden)[1], :] = NOT_FINITE[bad]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = fn(**poisoned, **options, return_lse=True)
    np.testing.assert_allclose(out, expected_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("library", ["array_api_strict", "torch"])
def test_slots_no_query_sees_change_nothing_on_the_other_array_libraries(
    form: str, library: str
) -> None:
    """The same, with +inf in the keys and NaN in the values, on a namespace other than NumPy."""
    module = pytest.importorskip(library)
    arrays, options, hidden = hidden_problem("outside every window")
    poisoned = {n: x.copy() for n, x in arrays.items()}
    rows, slots = np.nonzero(hidden)
    poisoned["k"][rows, :, slots, :], poisoned["v"][rows, :, slots, :] = np.inf, np.nan

    def run(given: dict[str, np.ndarray]) -> np.ndarray:
        positions = {n: options[n] for n in ("q_pos", "k_pos")}
        on = {n: module.asarray(x) for n, x in {**given, **positions}.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = FORMS[form](**on, causal=options["causal"], window=options["window"])
        return np.asarray(out)

    np.testing.assert_allclose(run(poisoned), run(arrays), rtol=1e-12, atol=1e-12)


# -- 2. gradients: what a query does not see does not reach its gradient -----------------------

#: Self-attention over 8 tokens, one slot (``bad``) made not finite. ``loss`` are the queries
#: the loss is taken over, none of which sees ``bad``; ``clean`` are the slots whose every
#: viewer is among them (a query that sees ``bad`` has a NaN output, and the backward
#: multiplies its zero output gradient by it: 0 * NaN is NaN at every slot it sees).
#: ``seen``: some query does see ``bad``. A blockwise pass then carries that query's NaN
#: running state back into every key block it read before (the rescale e^(m - m') is NaN),
#: so there its k and v gradients are clean only in the one-pass form; q's are in every form.
UNSEEN: dict[str, dict[str, Any]] = {
    "an empty slot no query sees": dict(k_pos=[0, 1, 2, 3, 4, 5, 6, -1], window=None, bad=7,
                                        loss=range(8), clean=range(8), seen=False),
    "a slot after every causal query": dict(k_pos=[0, 1, 2, 3, 4, 5, 6, 7], q_pos=[2, 3, 4],
                                            window=None, bad=6, loss=range(3), clean=range(8),
                                            seen=False),
    "a slot outside every window": dict(k_pos=[0, 1, 2, 3, 4, 5, 6, 7], q_pos=[5, 6, 7],
                                        window=2, bad=1, loss=range(3), clean=range(8),
                                        seen=False),
    "a slot that later queries see": dict(k_pos=[0, 1, 2, 3, 4, 5, 6, 7], window=3, bad=5,
                                          loss=range(5), clean=range(3), seen=True),
}  # fmt: skip


def _gradients(
    fn: Callable[..., Any], arrays: dict[str, np.ndarray], layout: dict[str, Any]
) -> Any:
    """Gradients of q, k, v (float64 torch) of the sum of the outputs of ``layout["loss"]``."""
    torch = pytest.importorskip("torch")
    tensors = {n: torch.tensor(x, requires_grad=True) for n, x in arrays.items()}
    positions = {n: torch.tensor(layout[n]) for n in ("q_pos", "k_pos") if n in layout}
    out = fn(**tensors, **positions, causal=True, window=layout["window"])  # (1, Hq, Sq, Dv)
    out[:, :, list(layout["loss"]), :].sum().backward()
    return {n: t.grad.numpy() for n, t in tensors.items()}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bad", NOT_FINITE)
@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("name", UNSEEN)
def test_inf_and_nan_a_query_does_not_see_leave_its_gradient_finite_and_unchanged(
    form: str, bad: str, where: str, name: str
) -> None:
    pytest.importorskip("torch")
    layout = UNSEEN[name]
    Sq = len(layout.get("q_pos", layout["k_pos"]))
    rng = np.random.default_rng(2)
    arrays = {"q": rng.standard_normal((1, 2, Sq, 4)), "k": rng.standard_normal((1, 1, 8, 4)),
              "v": rng.standard_normal((1, 1, 8, 3))}  # fmt: skip
    poisoned = {**arrays, where: arrays[where].copy()}
    poisoned[where][:, :, layout["bad"], :] = NOT_FINITE[bad]
    expected = _gradients(FORMS[form], arrays, layout)
    got = _gradients(FORMS[form], poisoned, layout)
    loss = list(layout["loss"])
    clean = list(layout["clean"]) if form == "attention" or not layout["seen"] else []
    assert np.isfinite(got["q"][:, :, loss]).all()
    np.testing.assert_allclose(got["q"][:, :, loss], expected["q"][:, :, loss], atol=1e-12)
    for n in ("k", "v"):
        np.testing.assert_allclose(got[n][:, :, clean], expected[n][:, :, clean], atol=1e-12)


# -- 3. n_new holds integers ---------------------------------------------------------------------

SHAPE: dict[str, Any] = {"batch": 2, "kv_heads": 1, "head_dim": 2, "dtype": np.float64}
OWN = {"sliding": {"window": 3}}  # a small ring, so that it wraps


def new_cache(kind: str, **shape: Any) -> KVCache:
    return make_cache(kind, max_len=12, **{**SHAPE, **shape}, **OWN.get(kind, {}))


def tokens(T: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    k, v = np.random.default_rng(seed).standard_normal((2, 2, 1, T, 2))
    return k, v


def state(cache: KVCache) -> dict[str, Any]:
    """Everything a cache holds (arrays and bookkeeping), copied."""
    return {name: copy.deepcopy(x) for name, x in vars(cache).items() if name != "xp"}


@pytest.mark.parametrize("kind", [*KINDS, "cross"])
@pytest.mark.parametrize(
    "n_new", [[1.5, 2], [2.0, 1], np.array([1.0, 2.0]), [np.float64(2), 1], [True, 1]], ids=repr
)
def test_a_count_of_new_tokens_that_is_not_an_integer_is_refused_and_changes_nothing(
    kind: str, n_new: Any
) -> None:
    cache = new_cache(kind)
    if kind != "cross":  # a cross-attention cache takes one input: it is tested empty
        cache.update(*tokens(2, 0), n_new=[2, 1])
    before = state(cache)
    with pytest.raises(TypeError, match=r"n_new must hold integers \(real tokens per row\); got"):
        cache.update(*tokens(2, 1), n_new=n_new)
    assert_same_state(before, state(cache))


@pytest.mark.parametrize("kind", [*KINDS, "cross"])
@pytest.mark.parametrize(
    "n_new",
    [[np.int64(2), 1], [np.int32(2), np.int8(1)], np.array([2, 1]), np.array([2, 1], np.int32)],
    ids=repr,
)
def test_counts_of_new_tokens_may_be_numpy_integers_or_integer_arrays(
    kind: str, n_new: Any
) -> None:
    plain, numpy_counts = new_cache(kind), new_cache(kind)
    expected = plain.update(*tokens(2, 0), n_new=[2, 1])
    got = numpy_counts.update(*tokens(2, 0), n_new=n_new)
    for x, y in zip(got, expected, strict=True):
        np.testing.assert_array_equal(x, y)
    assert numpy_counts.lengths.tolist() == [2, 1]


# -- 4. what a cache keeps and hands out is its own, or the caller's -----------------------------


def step(cache: KVCache, T: int, seed: int) -> tuple[Any, Any, Any]:
    """One update (the cross-attention cache stores once, then reuses)."""
    if isinstance(cache, CrossAttentionCache) and seed:
        return cache.update(None, None)
    return cache.update(*tokens(T, seed), n_new=[T, T - 1])


@pytest.mark.parametrize("kind", [*KINDS, "cross"])
@pytest.mark.parametrize("T", [1, 3])
def test_writing_into_what_a_cache_returned_or_was_given_changes_nothing_in_it(
    kind: str, T: int
) -> None:
    """k_pos, lengths and attention_options are the caller's; so are the arrays it passed in.

    (The k and v returned may be views of the storage, documented as read-only.)
    """
    vandalized, twin = new_cache(kind), new_cache(kind)
    for seed in range(4):
        k_new, v_new = tokens(T, seed)
        if isinstance(vandalized, CrossAttentionCache) and seed:
            got = vandalized.update(None, None)
        else:
            got = vandalized.update(k_new, v_new, n_new=[T, T - 1])
        expected = step(twin, T, seed)
        for x, y in zip(got, expected, strict=True):
            np.testing.assert_array_equal(x, y)
        k_new[...], v_new[...] = 7.0, 7.0  # the caller reuses its buffers
        got[2][...] = 99  # and writes into what it was handed
        vandalized.view()[2][...] = 99
        vandalized.lengths[...] = 99
        vandalized.attention_options["window"] = 1
    for x, y in zip(vandalized.view(), twin.view(), strict=True):
        np.testing.assert_array_equal(x, y)
    assert vandalized.lengths.tolist() == twin.lengths.tolist()
    assert vandalized.attention_options == twin.attention_options


def test_a_cross_attention_cache_keeps_copies_of_the_encoder_states() -> None:
    cache = CrossAttentionCache(**SHAPE)
    k_new, v_new = tokens(3, 0)
    cache.update(k_new, v_new, n_new=[3, 2])
    assert not np.shares_memory(cache.keys, k_new) and not np.shares_memory(cache.values, v_new)
    k_new[...], v_new[...] = np.nan, np.nan
    k, v, _ = cache.update(None, None)
    assert np.isfinite(k).all() and np.isfinite(v).all()


# -- 5. a dynamic cache gives its storage back ---------------------------------------------------


@pytest.mark.parametrize("cls", [DynamicCache, CrossAttentionCache])
def test_resetting_a_growing_cache_frees_its_storage_and_it_works_again_from_empty(
    cls: type[DynamicCache],
) -> None:
    cache, fresh = cls(**SHAPE), cls(**SHAPE)
    cache.update(*tokens(5, 0), n_new=[5, 3])
    assert cache.nbytes > 0
    cache.reset()
    assert cache.nbytes == 0
    assert cache.keys.shape[2] == cache.values.shape[2] == cache.positions.shape[1] == 0
    assert cache.lengths.tolist() == [0, 0]
    got, expected = (c.update(*tokens(2, 1), n_new=[2, 1]) for c in (cache, fresh))
    for x, y in zip(got, expected, strict=True):
        np.testing.assert_array_equal(x, y)


def test_releasing_rows_of_a_dynamic_cache_frees_the_slots_no_row_holds() -> None:
    cache = DynamicCache(**SHAPE)
    k0, v0 = tokens(4, 0)
    cache.update(k0, v0, n_new=[4, 1])  # row 1 holds slot 0 only
    k1, v1 = tokens(1, 1)
    cache.update(k1, v1)  # both rows: slot 4
    cache.release(0)
    k, v, k_pos = cache.view()
    assert k.shape[2] == v.shape[2] == 2 and cache.nbytes == 2 * 2 * 1 * 2 * 2 * 8
    assert k_pos.tolist() == [[-1, -1], [0, 1]]
    np.testing.assert_array_equal(k[1, :, 0], k0[1, :, 0])
    np.testing.assert_array_equal(v[1, :, 1], v1[1, :, 0])
    cache.release([1])
    assert cache.nbytes == 0
    k2, v2 = tokens(2, 2)
    k, v, k_pos = cache.update(k2, v2, n_new=[1, 2])
    assert k_pos.tolist() == [[0, -1], [0, 1]] and cache.lengths.tolist() == [1, 2]
    np.testing.assert_array_equal(k, k2)


# -- 6. NumPy's integers wherever Python's are taken, never a bool -------------------------------

NUMPY_INTEGERS = [np.int64, np.int32]

#: Each cache kind and its integer arguments (the shared ones come from SHAPE's).
CACHE_INTEGERS: dict[type[KVCache], dict[str, int]] = {
    StaticCache: {"max_len": 8},
    DynamicCache: {},
    SlidingWindowCache: {"window": 3, "sink_tokens": 1},
    PagedCache: {"block_size": 2, "num_blocks": 6},
    QuantizedCache: {"max_len": 8, "bits": 4},
    CrossAttentionCache: {},
}
COMMON_INTEGERS = {"batch": 2, "kv_heads": 1, "head_dim": 2, "value_dim": 3}


@pytest.mark.parametrize("integer", NUMPY_INTEGERS)
@pytest.mark.parametrize("cls", CACHE_INTEGERS, ids=lambda c: c.__name__)
def test_every_cache_takes_numpy_integers_for_its_integer_arguments(
    cls: type[KVCache], integer: type
) -> None:
    arguments = {**COMMON_INTEGERS, **CACHE_INTEGERS[cls]}
    plain = cls(dtype=np.float64, **arguments)
    numpy_ints = cls(dtype=np.float64, **{n: integer(x) for n, x in arguments.items()})
    for name, x in arguments.items():
        assert type(getattr(numpy_ints, name)) is int and getattr(numpy_ints, name) == x
    k, v = np.ones((2, 1, 3, 2)), np.ones((2, 1, 3, 3))
    for x, y in zip(numpy_ints.update(k, v), plain.update(k, v), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("cls", CACHE_INTEGERS, ids=lambda c: c.__name__)
def test_every_cache_refuses_a_bool_or_float_for_an_integer_argument_by_name(
    cls: type[KVCache],
) -> None:
    arguments: dict[str, Any] = {**COMMON_INTEGERS, **CACHE_INTEGERS[cls]}
    for name in arguments:
        for wrong in (True, 2.0):
            with pytest.raises(TypeError, match=f"{name} must be an integer"):
                cls(**{**arguments, name: wrong})


@pytest.mark.parametrize("integer", NUMPY_INTEGERS)
@pytest.mark.parametrize("kind", [*KINDS, "cross"])
def test_make_cache_takes_numpy_integers(kind: str, integer: type) -> None:
    own = {"paged": {"block_size": integer(4)}, "sliding": {"window": integer(3)},
           "quantized": {"bits": integer(6)}}.get(kind, {})  # fmt: skip
    shape = {"batch": integer(2), "kv_heads": integer(1), "head_dim": integer(2)}
    cache = make_cache(kind, max_len=integer(8), **shape, **own)
    assert type(cache.batch) is int
    cache.update(np.ones((2, 1, 3, 2), np.float32), np.ones((2, 1, 3, 2), np.float32))
    assert cache.lengths.tolist() == [3, 3]


@pytest.mark.parametrize("integer", NUMPY_INTEGERS)
def test_releasing_and_forking_rows_take_numpy_integers(integer: type) -> None:
    cache = PagedCache(block_size=2, num_blocks=6, **SHAPE)
    cache.update(*tokens(3, 0))
    cache.fork(integer(0), integer(1))
    assert cache.block_table[1] == cache.block_table[0]
    cache.release(integer(1))
    assert cache.lengths.tolist() == [3, 0]
    with pytest.raises(TypeError, match=r"rows must name rows by integers in \[0, 2\)"):
        cache.release(True)


@pytest.mark.parametrize("integer", NUMPY_INTEGERS)
def test_attention_takes_numpy_scalars_for_its_scalar_options(integer: type) -> None:
    arrays, options, _ = hidden_problem("outside every window")
    plain = {"window": 2, "sink_tokens": 1, "scale": 0.5, "softcap": 3.0}
    numpy_scalars = {"window": integer(2), "sink_tokens": integer(1),
                     "scale": np.float32(0.5), "softcap": np.float64(3.0)}  # fmt: skip
    options = {**options, "window": None}
    for fn in FORMS.values():
        np.testing.assert_array_equal(
            fn(**arrays, **options | numpy_scalars), fn(**arrays, **options | plain)
        )
    out = attention_blockwise(**arrays, **options, block_q=integer(2), block_k=integer(4))
    np.testing.assert_allclose(out, attention(**arrays, **options), atol=1e-12)
    out = attention_split_kv(**arrays, **options, num_splits=integer(2))
    np.testing.assert_allclose(out, attention(**arrays, **options), atol=1e-12)
    record = refattn.options.AttentionOptions(window=integer(2), sink_tokens=integer(1))
    assert type(record.window) is int and type(record.sink_tokens) is int


def test_attention_refuses_a_bool_where_it_takes_an_integer() -> None:
    arrays, options, _ = hidden_problem("empty slots")
    for name in ("window", "sink_tokens"):
        with pytest.raises(TypeError, match=f"{name} must be an integer"):
            attention(**arrays, **{**options, name: True})
    with pytest.raises(TypeError, match="block_k must be an integer"):
        attention_blockwise(**arrays, block_k=True)
    with pytest.raises(TypeError, match="num_splits must be an integer"):
        attention_split_kv(**arrays, num_splits=True)


GPT_SHAPE = {"vocab_size": 16, "n_positions": 12, "d_model": 8, "n_layer": 2, "n_head": 2}
LLAMA_SHAPE = {"vocab_size": 16, "d_model": 8, "n_layer": 2, "n_head": 4, "n_kv_head": 2,
               "intermediate_size": 16, "head_dim": 2, "window": 3}  # fmt: skip


def gpt(**shape: Any) -> GPT:
    return GPT.random(GPTConfig(**{**GPT_SHAPE, **shape}), seed=0)


def llama(**shape: Any) -> Llama:
    return Llama.random(LlamaConfig(**{**LLAMA_SHAPE, **shape}), seed=0)


@pytest.mark.parametrize("integer", NUMPY_INTEGERS)
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_the_models_take_numpy_integers_for_their_integer_arguments(
    family: str, integer: type
) -> None:
    shape = GPT_SHAPE if family == "gpt" else LLAMA_SHAPE
    make = gpt if family == "gpt" else llama
    model: Decoder = make(**{n: integer(x) for n, x in shape.items()})
    plain: Decoder = make()
    for name in shape:
        assert type(getattr(model.config, name)) is int  # type: ignore[attr-defined]
    prompt: np.ndarray = np.array([[1, 2, 3]], dtype=integer)
    for kind in ("static", "paged", "sliding", "quantized"):
        own = {"paged": {"block_size": integer(2)}, "sliding": {"window": integer(3)},
               "quantized": {"bits": integer(8)}}.get(kind, {})  # fmt: skip
        got = model.generate(prompt, integer(4), cache=kind, top_k=integer(3), temperature=1.0,
                             seed=integer(0), **own)  # fmt: skip
        assert got == plain.generate([[1, 2, 3]], 4, cache=kind, top_k=3, temperature=1.0,
                                     seed=0, **own)  # fmt: skip
    caches = model.new_caches("static", batch=integer(1), max_len=integer(8))
    assert isinstance(caches, LayerCaches) and caches[0].max_len == 8  # type: ignore[attr-defined]
    LayerCaches("dynamic", layers=integer(2), batch=integer(1), kv_heads=integer(1),
                head_dim=integer(2), max_len=integer(4))  # fmt: skip


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_the_models_refuse_a_bool_or_float_where_they_take_an_integer(family: str) -> None:
    shape = GPT_SHAPE if family == "gpt" else LLAMA_SHAPE
    make = gpt if family == "gpt" else llama
    config = "GPTConfig" if family == "gpt" else "LlamaConfig"
    for name in shape:
        for wrong in (True, 2.0):
            with pytest.raises(TypeError, match=f"{config}.{name} must be an integer"):
                make(**{name: wrong})
    model: Decoder = make()
    with pytest.raises(TypeError, match="max_new_tokens must be an integer"):
        model.generate([[1]], True)
    with pytest.raises(TypeError, match="top_k must be an integer"):
        model.generate([[1]], 2, top_k=1.5, temperature=1.0)  # type: ignore[arg-type]


# -- 7. token ids and positions inside the model's tables ----------------------------------------


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("bad", [16, 99, -1])
def test_a_token_id_outside_the_vocabulary_is_refused_by_name(family: str, bad: int) -> None:
    model: Decoder = gpt() if family == "gpt" else llama()
    message = rf"ids must be token ids in \[0, 16\) \(vocab_size=16\); got {bad} at ids\[1, 2\]"
    with pytest.raises(ValueError, match=message):
        model([[1, 2, 3], [4, 5, bad]])
    caches = model.new_caches("static", batch=2, max_len=8)
    with pytest.raises(ValueError, match=message):
        model([[1, 2, 3], [4, 5, bad]], caches)
    assert caches.lengths.tolist() == [0, 0]  # refused before anything was cached
    with pytest.raises(ValueError, match=r"ids must be token ids in \[0, 16\)"):
        model.generate([[1, 2], [bad]], 3)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_token_ids_that_are_not_integers_are_refused_not_truncated(family: str) -> None:
    model: Decoder = gpt() if family == "gpt" else llama()
    with pytest.raises(TypeError, match="ids must hold integer token ids; got dtype float64"):
        model([[1.5, 2.0]])
    with pytest.raises(TypeError, match="ids must hold integer token ids; got dtype float64"):
        model.generate(np.array([[1.0, 2.0]]), 2)
    with pytest.raises(
        TypeError, match=r"ids must hold integer token ids; got 2.5 at ids\[0\]\[1\]"
    ):
        model.generate([[1, 2.5]], 2)
    with pytest.raises(
        ValueError, match=r"ids must be a \(B, T\) array of token ids; got shape \(3,\)"
    ):
        model([1, 2, 3])


def test_a_sequence_past_the_learned_position_table_is_refused_by_name() -> None:
    model = gpt()  # n_positions = 12
    model([list(range(12))])  # positions 0..11: the whole table
    message = r"GPT's learned position table holds 12 positions \(max_positions=12\); a row of 13"
    with pytest.raises(ValueError, match=message):
        model([list(range(13))])
    caches = model.new_caches("dynamic", batch=1, max_len=16)
    model([list(range(10))], caches)
    with pytest.raises(
        ValueError, match=f"{message} cached and new tokens needs positions 0 to 12"
    ):
        model([[1, 2, 3]], caches)
    assert caches.lengths.tolist() == [10]
    with pytest.raises(ValueError, match=message):
        model.generate([[1, 2, 3]], 11)  # would feed positions 0..12
    assert len(model.generate([[1, 2, 3]], 10)[0]) == 13  # feeds positions 0..11


# -- 8. python -m refattn -------------------------------------------------------------------------


def test_python_dash_m_refattn_runs_the_command_line() -> None:
    version = subprocess.run([sys.executable, "-m", "refattn", "--version"],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"refattn {refattn.__version__}"
    helped = subprocess.run([sys.executable, "-m", "refattn", "verify", "--help"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: refattn verify")
