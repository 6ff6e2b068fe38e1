"""Every KV cache, proven equal to full causal attention over each row's real history.

The state machines drive each cache kind through random ragged appends (a
prefill of any length, then chunks), row releases, resets and, for the paged
cache, forks; after every step the new tokens' outputs through the cache must
equal the loop oracle over the row's whole history. Storage the cache has not
filled is poisoned with NaN first, and the padding of every ragged update is
NaN, so anything that leaked would show.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from refattn import attention
from refattn.backends import BACKENDS, Case, selected
from refattn.backends.base import round_to
from refattn.caches import KINDS, KVCache, PagedCache, QuantizedCache, StaticCache
from refattn.namespace import index_dtype
from refattn.testing.decoding import cache_on, decode
from refattn.testing.drawing import draw_steps
from refattn.testing.oracle import oracle_attention
from refattn.testing.selfcheck.agreement import measure_cache
from refattn.testing.strategies import HypothesisDraws
from refattn.testing.tolerance import max_abs_error, quantized_error_bound, spec_error_bound

CAPACITY = 24
MACHINE_SETTINGS = settings(stateful_step_count=10)  # examples: the profile's (150 by default)

#: Where the caches run: each backend's float32, plus float64, float16 and bfloat16 somewhere,
#: and array-api-strict on a second device to catch arrays created without device=.
CACHE_CASES = [
    ("numpy", "cpu", "float64"),
    ("numpy", "cpu", "float16"),
    ("array_api_strict", "device1", "float32"),
    ("torch", "cpu", "float32"),
    ("torch", "cpu", "bfloat16"),
    ("jax", "cpu", "bfloat16"),
]


def attend_step(
    cache: KVCache, case: Case, q_new: Any, k_new: Any, v_new: Any, n_new: list[int]
) -> Any:
    """One step as a model takes it: the new queries sit at ``lengths + i``; update; attend
    (as the case's backend runs a whole function best: jitted on JAX)."""
    xp = cache.xp
    T = q_new.shape[2]
    offsets = xp.arange(T, dtype=index_dtype(xp), device=cache.device)
    q_pos = cache.lengths[:, None] + offsets[None, :]
    k, v, k_pos = cache.update(k_new, v_new, n_new)
    attend = case.backend.compiled(attention, causal=True, **cache.attention_options)
    return attend(q_new, k, v, q_pos=q_pos, k_pos=k_pos)


def _cache_case_params() -> list[Any]:
    chosen = {b.name for b in selected()}
    params = []
    for name, device, dtype in CACHE_CASES:
        backend = BACKENDS[name]
        reason = "not in REFATTN_BACKENDS" if name not in chosen else backend.unavailable_reason()
        case = Case(backend, device, dtype)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


@pytest.fixture(params=_cache_case_params())
def cache_case(request: pytest.FixtureRequest) -> Case:
    case: Case = request.param
    return case


def poison_storage(cache: KVCache) -> None:
    """Fill the float storage a cache has not written yet with NaN (the arrays its kind
    names as ``STORAGE``; integer codes cannot hold NaN, their scales can)."""
    xp = cache.xp
    for name in type(cache).STORAGE:
        x = getattr(cache, name, None)
        if x is not None and xp.isdtype(x.dtype, "real floating"):
            setattr(cache, name, xp.full(x.shape, xp.nan, dtype=x.dtype, device=cache.device))


def snapshot(cache: KVCache, case: Case) -> dict[str, Any]:
    """Everything a cache holds, as NumPy copies and plain lists."""
    state: dict[str, Any] = {"lengths": list(cache._lengths)}
    for name, x in vars(cache).items():
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            state[name] = np.array(case.backend.to_numpy(x), copy=True)
        elif isinstance(x, list):
            state[name] = copy.deepcopy(x)
    return state


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    for name, x in before.items():
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(after[name], x, err_msg=name)
        else:
            assert after[name] == x, name


def _rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    return round_to(x, dtype).astype(np.float64)


class CacheMachine(RuleBasedStateMachine):
    """One cache kind on one backend, against a model that keeps every row's real tokens."""

    def __init__(self, kind: str, case: Case) -> None:
        super().__init__()
        self.kind, self.case = kind, case

    @initialize(
        batch=st.integers(1, 3),
        kv_heads=st.integers(1, 2),
        group=st.integers(1, 2),
        head_dim=st.sampled_from([3, 8]),
        window=st.integers(1, 6),
        sink_tokens=st.integers(0, 2),
        block_size=st.integers(1, 4),
        seed=st.integers(0, 2**32 - 1),
    )
    def setup(self, batch: int, kv_heads: int, group: int, head_dim: int, window: int,
              sink_tokens: int, block_size: int, seed: int) -> None:  # fmt: skip
        self.B, self.Hkv, self.Hq, self.D = batch, kv_heads, kv_heads * group, head_dim
        self.rng = np.random.default_rng(seed)
        own: dict[str, Any] = {  # each kind's own parameters
            "sliding": {"window": window, "sink_tokens": sink_tokens},
            "paged": {"block_size": block_size, "block_order": list(
                self.rng.permutation(batch * -(-CAPACITY // block_size)))},
        }.get(self.kind, {})  # type: ignore[assignment]  # fmt: skip
        self.cache = cache_on(self.kind, self.case, batch=batch, kv_heads=kv_heads,
                              head_dim=head_dim, max_len=CAPACITY, **own)  # fmt: skip
        poison_storage(self.cache)
        self.keys: list[list[np.ndarray]] = [[] for _ in range(batch)]  # (Hkv, D) per token
        self.values: list[list[np.ndarray]] = [[] for _ in range(batch)]

    def _draw(self, shape: tuple[int, ...], n: list[int]) -> np.ndarray:
        """Random tokens rounded to the dtype, with NaN in each row's padding."""
        x = _rounded(self.rng.standard_normal(shape), self.case.dtype)
        for b, m in enumerate(n):
            x[b, :, m:] = np.nan
        return x

    @rule(T=st.integers(1, 12), data=st.data())
    def append(self, T: int, data: st.DataObject) -> None:
        n = data.draw(st.lists(st.integers(0, T), min_size=self.B, max_size=self.B), label="n_new")
        q = self._draw((self.B, self.Hq, T, self.D), n)
        k = self._draw((self.B, self.Hkv, T, self.D), n)
        v = self._draw((self.B, self.Hkv, T, self.D), n)
        backend, on = self.case.backend, {"dtype": self.case.dtype, "device": self.case.device}
        before = snapshot(self.cache, self.case)
        try:
            out = attend_step(
                self.cache, self.case, backend.asarray(q, **on), backend.asarray(k, **on),
                backend.asarray(v, **on), n,
            )  # fmt: skip
        except ValueError as error:
            # Only a full cache may refuse, and then it must have changed nothing.
            assert "overflow" in str(error) or "out of blocks" in str(error), error
            assert self.kind in ("static", "quantized", "paged")
            if self.kind != "paged":
                assert any(len(h) + m > CAPACITY for h, m in zip(self.keys, n, strict=True))
            assert_same_state(before, snapshot(self.cache, self.case))
            return
        out = backend.to_numpy(out)
        for b in range(self.B):
            self.keys[b] += list(np.moveaxis(k[b, :, : n[b]], 1, 0))
            self.values[b] += list(np.moveaxis(v[b, :, : n[b]], 1, 0))
            if n[b]:
                self._check_row(b, q[b : b + 1, :, : n[b]], out[b : b + 1, :, : n[b]])

    def _check_row(self, b: int, q: np.ndarray, out: np.ndarray) -> None:
        """The row's new outputs equal full causal attention over its whole history."""
        k = np.stack(self.keys[b], axis=1)[None]  # (1, Hkv, L, D)
        v = np.stack(self.values[b], axis=1)[None]
        L, n = k.shape[2], q.shape[2]
        options = self.cache.attention_options
        ref, _, weights = oracle_attention(
            q, k, v, causal=True, q_pos=np.arange(L - n, L), k_pos=np.arange(L), **options,
            return_weights=True,
        )  # fmt: skip
        allowed = spec_error_bound(
            {"q": q, "k": k, "v": v}, dtype=self.case.dtype, out=ref, weights=weights
        ).out
        if isinstance(self.cache, QuantizedCache):
            allowed += quantized_error_bound(q, k, v, bits=self.cache.bits, dtype=self.case.dtype)
        error = max_abs_error(out, ref)
        assert error <= allowed, (self.kind, b, error, allowed)

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        b = data.draw(st.integers(0, self.B - 1), label="row")
        self.cache.release(b)
        self.keys[b], self.values[b] = [], []

    @rule()
    def reset(self) -> None:
        self.cache.reset()
        self.keys = [[] for _ in range(self.B)]
        self.values = [[] for _ in range(self.B)]

    @precondition(lambda self: self.kind == "paged")
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        src = data.draw(st.integers(0, self.B - 1), label="src")
        dst = data.draw(st.integers(0, self.B - 1), label="dst")
        assert isinstance(self.cache, PagedCache)
        self.cache.fork(src, dst)
        self.keys[dst], self.values[dst] = list(self.keys[src]), list(self.values[src])

    @invariant()
    def lengths_count_every_real_token(self) -> None:
        if hasattr(self, "cache"):
            lengths = self.case.backend.to_numpy(self.cache.lengths).tolist()
            assert lengths == [len(h) for h in self.keys]


@pytest.mark.parametrize("kind", KINDS)
def test_decoding_through_every_cache_equals_full_causal_attention(
    kind: str, cache_case: Case
) -> None:
    machine = lambda: CacheMachine(kind, cache_case)  # noqa: E731
    run_state_machine_as_test(machine, settings=MACHINE_SETTINGS)  # type: ignore[arg-type]


# -- the same history through different caches ---------------------------------


@st.composite
def histories(draw: st.DrawFn, max_len: int = 16) -> tuple[dict[str, np.ndarray], list]:
    """Rows of tokens (q, k, v float64) and a ragged schedule that feeds them."""
    batch, kv_heads = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    q_heads = kv_heads * draw(st.integers(1, 2))
    length, head_dim = draw(st.integers(1, max_len)), draw(st.sampled_from([3, 8]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    arrays = {
        "q": rng.standard_normal((batch, q_heads, length, head_dim)),
        "k": rng.standard_normal((batch, kv_heads, length, head_dim)),
        "v": rng.standard_normal((batch, kv_heads, length, head_dim)),
    }
    steps = draw_steps(HypothesisDraws(draw), [length] * batch, max_chunk=max_len)
    return arrays, steps


def _decode(
    kind: str, case: Case, arrays: dict[str, np.ndarray], steps: list, **kw: Any
) -> np.ndarray:
    B, Hkv, S, D = arrays["k"].shape
    cache = cache_on(kind, case, batch=B, kv_heads=Hkv, head_dim=D, max_len=S, **kw)
    poison_storage(cache)
    decoded = decode(cache, case, arrays, steps)
    assert isinstance(decoded, np.ndarray), decoded
    return decoded


def _allowed(arrays: dict[str, np.ndarray], dtype: str) -> float:
    return spec_error_bound(arrays, dtype=dtype).out


@given(history=histories())
def test_static_dynamic_and_paged_caches_give_the_same_outputs(cache_case: Case, history) -> None:
    arrays, steps = history
    arrays = {name: _rounded(x, cache_case.dtype) for name, x in arrays.items()}
    static = _decode("static", cache_case, arrays, steps)
    assert not np.isnan(static).any()
    for kind in ("dynamic", "paged"):
        other = _decode(kind, cache_case, arrays, steps)
        assert max_abs_error(other, static) <= 2 * _allowed(arrays, cache_case.dtype), kind


@pytest.mark.parametrize("kind", KINDS)
@given(history=histories(), extra=st.integers(1, 5))
def test_extra_right_padding_changes_nothing(
    kind: str, cache_case: Case, history, extra: int
) -> None:
    arrays, steps = history
    arrays = {name: _rounded(x, cache_case.dtype) for name, x in arrays.items()}
    tight = _decode(kind, cache_case, arrays, steps)
    padded = _decode(kind, cache_case, arrays, [(T + extra, n) for T, n in steps])
    assert max_abs_error(padded, tight) <= 2 * _allowed(arrays, cache_case.dtype)


@given(history=histories(), data=st.data())
def test_which_physical_blocks_a_paged_row_uses_changes_nothing(
    cache_case: Case, history, data: st.DataObject
) -> None:
    arrays, steps = history
    arrays = {name: _rounded(x, cache_case.dtype) for name, x in arrays.items()}
    B, _, S, _ = arrays["k"].shape
    blocks = B * S  # block_size 1: every token a block of its own
    order = data.draw(st.permutations(range(blocks)), label="block_order")
    in_order = _decode("paged", cache_case, arrays, steps, block_size=1)
    shuffled = _decode("paged", cache_case, arrays, steps, block_size=1, block_order=order)
    # Equal to rounding: unused blocks hold NaN, and which of them pad a gathered
    # row decides whether the values take the fast product or the exact sum.
    assert not np.isnan(shuffled).any()
    assert max_abs_error(shuffled, in_order) <= 2 * _allowed(arrays, cache_case.dtype)


# -- positional encodings through the cache --------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@given(
    history=histories(),
    style=st.sampled_from(["neox", "interleaved"]),
    theta=st.sampled_from([100.0, 10000.0]),
)
def test_rope_applied_before_caching_equals_rope_on_the_full_sequence(
    kind: str, cache_case: Case, history, style: str, theta: float
) -> None:
    """Keys are rotated at their absolute positions once, before they are cached."""
    from refattn import rope

    arrays, steps = history
    arrays = {name: _rounded(x, cache_case.dtype) for name, x in arrays.items()}
    B, Hkv, S, D = arrays["k"].shape
    rotary_dim = D - D % 2

    def encode(name: str, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return rope(x, positions, theta=theta, style=style, rotary_dim=rotary_dim)

    cache = cache_on(kind, cache_case, batch=B, kv_heads=Hkv, head_dim=D, max_len=S)
    decoded = decode(cache, cache_case, arrays, steps, encode=encode)
    # The same rotation of the whole sequence, rounded as the decoded chunks were.
    full: dict[str, Any] = {
        n: _rounded(encode(n, arrays[n], np.arange(S)), cache_case.dtype) for n in "qk"
    }
    full["v"] = arrays["v"]
    ref, _, weights = oracle_attention(
        **full, causal=True, **cache.attention_options, return_weights=True
    )
    allowed = spec_error_bound(full, dtype=cache_case.dtype, out=ref, weights=weights).out
    if isinstance(cache, QuantizedCache):
        q, k, v = full["q"], full["k"], full["v"]
        allowed += quantized_error_bound(q, k, v, bits=cache.bits, dtype=cache_case.dtype)
    assert max_abs_error(decoded, ref) <= allowed


@pytest.mark.parametrize("kind", KINDS)
@given(history=histories())
def test_alibi_through_the_cache_equals_alibi_on_the_full_sequence(
    kind: str, cache_case: Case, history
) -> None:
    from refattn import alibi_slopes

    arrays, steps = history
    arrays = {name: _rounded(x, cache_case.dtype) for name, x in arrays.items()}
    B, Hkv, S, D = arrays["k"].shape
    slopes = _rounded(
        np.asarray(alibi_slopes(arrays["q"].shape[1]), dtype=np.float64), cache_case.dtype
    )
    cache = cache_on(kind, cache_case, batch=B, kv_heads=Hkv, head_dim=D, max_len=S)
    agreement = measure_cache(
        cache, cache_case, arrays, steps, oracle_attention, alibi_slopes=slopes
    )
    assert agreement.passed, agreement


# -- failures lose nothing ------------------------------------------------------------


def _bad_updates(cache: KVCache, case: Case) -> list[tuple[Any, Any, Any, type[Exception], str]]:
    """(k_new, v_new, n_new, error, message fragment): updates this cache must refuse."""
    import array_api_strict as xs

    B, H, D = cache.batch, cache.kv_heads, cache.head_dim

    def new(T: int, heads: int = H, dim: int = D, dtype: str = case.dtype) -> Any:
        return case.backend.asarray(np.ones((B, heads, T, dim)), dtype=dtype, device=case.device)

    other_dtype = "float32" if case.dtype != "float32" else "float64"  # one every backend has
    # an array of another library than the cache's (no torch needed for the NumPy cases)
    ones = np.ones((B, H, 1, D))
    foreign = xs.asarray(ones) if case.backend.name == "numpy" else ones
    bad: list[tuple[Any, Any, Any, type[Exception], str]] = [
        (new(1, heads=H + 1), new(1, heads=H + 1), None, ValueError, "k_new must have shape"),
        (new(1, dim=D + 1), new(1), None, ValueError, "k_new must have shape"),
        (new(2), new(1), None, ValueError, "k_new has 2 tokens but v_new has 1"),
        (new(1, dtype=other_dtype), new(1, dtype=other_dtype), None, TypeError, "has dtype"),
        (new(2), new(2), [3] * B, ValueError, "n_new must hold"),
        (new(2), new(2), [1] * (B + 1), ValueError, "n_new must hold"),
        (foreign, new(1), None, TypeError, "array"),
    ]
    if case.backend.name == "array_api_strict":
        xp = case.backend.namespace()
        elsewhere = xp.Device("CPU_DEVICE" if case.device != "CPU_DEVICE" else "device1")
        k = xp.asarray(np.ones((B, H, 1, D)), dtype=xp.float32, device=elsewhere)
        bad.append((k, k, None, ValueError, "is on device"))
    if isinstance(cache, PagedCache):
        bad.append(
            (new(CAPACITY * B + 1), new(CAPACITY * B + 1), None, ValueError, "out of blocks")
        )
    elif isinstance(cache, (StaticCache, QuantizedCache)):
        bad.append((new(CAPACITY + 1), new(CAPACITY + 1), None, ValueError, "overflow"))
    return bad


@pytest.mark.parametrize("kind", [*KINDS, "cross"])
def test_a_failed_update_leaves_the_cache_exactly_as_it_was(kind: str, cache_case: Case) -> None:
    rng = np.random.default_rng(0)
    B, H, D = 2, 2, 4
    own = {"sliding": {"window": 4}}.get(kind, {})
    cache = cache_on(kind, cache_case, batch=B, kv_heads=H, head_dim=D, max_len=CAPACITY, **own)
    if kind != "cross":  # a cross-attention cache takes one input, so it is tested empty
        arrays = {n: _rounded(rng.standard_normal((B, H, 5, D)), cache_case.dtype) for n in "qkv"}
        decode(cache, cache_case, arrays, [(3, [3, 1]), (2, [2, 2])])
    for k_new, v_new, n_new, error, fragment in _bad_updates(cache, cache_case):
        before = snapshot(cache, cache_case)
        with pytest.raises(error, match=fragment):
            cache.update(k_new, v_new, n_new)
        assert_same_state(before, snapshot(cache, cache_case))


def test_paged_cache_out_of_blocks_changes_nothing_even_mid_batch() -> None:
    """Each row alone would fit, both together do not: the update fails whole."""
    from refattn import PagedCache

    cache = PagedCache(
        batch=2, kv_heads=1, head_dim=2, block_size=2, num_blocks=3, dtype=np.float64
    )
    cache.update(np.ones((2, 1, 1, 2)), np.ones((2, 1, 1, 2)))
    before = (list(cache._lengths), [list(t) for t in cache.block_table], list(cache.free_blocks))
    with pytest.raises(ValueError, match="needs 2 new blocks of 2 slots but only 1 are free"):
        cache.update(np.ones((2, 1, 3, 2)), np.ones((2, 1, 3, 2)), n_new=[3, 3])
    assert (
        list(cache._lengths),
        [list(t) for t in cache.block_table],
        list(cache.free_blocks),
    ) == before


def test_fork_shares_blocks_and_copies_on_write() -> None:
    from refattn import PagedCache

    cache = PagedCache(
        batch=2, kv_heads=1, head_dim=1, block_size=2, num_blocks=6, dtype=np.float64
    )
    cache.update(
        np.arange(3.0).reshape(1, 1, 3, 1).repeat(2, 0), np.zeros((2, 1, 3, 1)), n_new=[3, 0]
    )
    cache.fork(0, 1)
    assert cache.block_table[1] == cache.block_table[0]
    shared_tail = cache.block_table[0][-1]
    k, _, _ = cache.update(np.full((2, 1, 1, 1), 7.0), np.zeros((2, 1, 1, 1)))
    # Row 0 wrote into the shared tail, so it got a copy; row 1 kept the original.
    assert cache.block_table[0][-1] != shared_tail and cache.block_table[1][-1] == shared_tail
    np.testing.assert_array_equal(k[:, 0, :, 0], [[0, 1, 2, 7], [0, 1, 2, 7]])
    cache.release(0)
    cache.release(1)
    assert sorted(cache.free_blocks) == list(range(6))


# -- memory ---------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
def test_int8_cache_holds_at_most_055_of_a_float16_static_cache(head_dim: int) -> None:
    from refattn import QuantizedCache, StaticCache

    shape: dict[str, Any] = {"batch": 2, "kv_heads": 4, "head_dim": head_dim, "max_len": 100}
    quantized = QuantizedCache(**shape, bits=8, dtype=np.float16)
    static = StaticCache(**shape, dtype=np.float16)
    assert static.nbytes == 2 * 2 * 4 * 100 * head_dim * 2
    assert quantized.nbytes / static.nbytes <= 0.55


def test_dynamic_cache_grows_and_sliding_cache_does_not() -> None:
    from refattn import DynamicCache, SlidingWindowCache

    dynamic = DynamicCache(batch=1, kv_heads=1, head_dim=4, dtype=np.float32)
    ring = SlidingWindowCache(
        batch=1, kv_heads=1, head_dim=4, window=3, sink_tokens=1, dtype=np.float32
    )
    sizes = []
    for _ in range(6):
        for cache in (dynamic, ring):
            cache.update(np.ones((1, 1, 1, 4), np.float32), np.ones((1, 1, 1, 4), np.float32))
        sizes.append((dynamic.nbytes, ring.nbytes))
    assert [d for d, _ in sizes] == [2 * 4 * 4 * t for t in range(1, 7)]
    assert {r for _, r in sizes} == {2 * 4 * 4 * 4}


# -- cross-attention ----------------------------------------------------------------


def test_cross_attention_cache_stores_the_encoder_once_and_reuses_it(cache_case: Case) -> None:
    from refattn import attention

    rng = np.random.default_rng(0)
    B, H, S, D = 2, 2, 5, 4
    enc = {n: _rounded(rng.standard_normal((B, H, S, D)), cache_case.dtype) for n in "kv"}
    cache = cache_on("cross", cache_case, batch=B, kv_heads=H, head_dim=D, max_len=S)
    on = {"dtype": cache_case.dtype, "device": cache_case.device}
    k_enc, v_enc = (cache_case.backend.asarray(enc[n], **on) for n in "kv")
    k, v, _ = cache.update(k_enc, v_enc, n_new=[5, 3])
    with pytest.raises(ValueError, match="already holds encoder states"):
        cache.update(k, v)
    for step in range(3):  # every decoder step reads the same states
        q = _rounded(rng.standard_normal((B, H, 1, D)), cache_case.dtype)
        k_step, v_step, pos = cache.update(None, None)
        out = attention(cache_case.backend.asarray(q, **on), k_step, v_step, k_pos=pos)
        for b, n in enumerate([5, 3]):
            ref, _ = oracle_attention(
                q[b : b + 1], enc["k"][b : b + 1, :, :n], enc["v"][b : b + 1, :, :n]
            )
            allowed = spec_error_bound(
                {"q": q, "k": enc["k"], "v": enc["v"]}, dtype=cache_case.dtype
            ).out
            assert max_abs_error(cache_case.backend.to_numpy(out)[b : b + 1], ref) <= allowed, step
    assert cache_case.backend.to_numpy(cache.lengths).tolist() == [5, 3]
    cache.reset()
    cache.update(k, v)


# -- the encodings themselves ---------------------------------------------------------


@pytest.mark.parametrize("style", ["neox", "interleaved"])
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)),
    extra=st.integers(0, 4),
    theta=st.floats(2.0, 1e6),
    seed=st.integers(0, 2**32 - 1),
)
def test_rope_is_a_complex_rotation_of_feature_pairs(
    style: str, shape, extra: int, theta: float, seed: int
) -> None:
    """Feature pair p, as a complex number, is multiplied by exp(i pos theta^(-2p/r))."""
    from refattn import rope

    B, H, S, half = shape
    r = 2 * half
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, H, S, r + extra))
    pos = rng.integers(0, 5000, size=(B, S))
    if style == "neox":
        z = x[..., :half] + 1j * x[..., half:r]
    else:
        z = x[..., 0:r:2] + 1j * x[..., 1:r:2]
    angle = pos[:, None, :, None] * theta ** (-2.0 * np.arange(half) / r)
    w = z * np.exp(1j * angle)
    expected = np.concatenate(
        [np.real(w), np.imag(w)]
        if style == "neox"
        else [np.stack([np.real(w), np.imag(w)], -1).reshape(B, H, S, r)],
        axis=-1,
    )
    expected = np.concatenate([expected, x[..., r:]], axis=-1)
    got = rope(x, pos, theta=theta, style=style, rotary_dim=r)
    np.testing.assert_allclose(got, expected, atol=1e-9 * max(1, pos.max()))


def test_alibi_slopes_follow_the_geometric_rule() -> None:
    from refattn import alibi_slopes

    np.testing.assert_array_equal(alibi_slopes(8), 2.0 ** -np.arange(1, 9))
    # 12 heads: the 8 slopes of 8 heads, then every other slope of 16 heads.
    sixteen = 2.0 ** (-0.5 * np.arange(1, 17))
    np.testing.assert_allclose(
        alibi_slopes(12), np.concatenate([2.0 ** -np.arange(1, 9), sixteen[0::2][:4]]), rtol=1e-7
    )
    with pytest.raises(ValueError, match="n_heads must be a positive integer; got 0"):
        alibi_slopes(0)
