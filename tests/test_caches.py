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

from refattn.backends import BACKENDS, Case, selected
from refattn.backends.base import round_to
from refattn.caches import KVCache, PagedCache, QuantizedCache
from refattn.testing.decoding import CACHE_KINDS, attend_step, make_cache, window_options
from refattn.testing.tolerance import max_abs_error, quantized_error_bound, spec_error_bound
from refattn.tests.oracle import oracle_attention

CAPACITY = 24
MACHINE_SETTINGS = settings(max_examples=40, stateful_step_count=10, deadline=None)

#: Where the caches run: each backend's float32, plus float64, float16 and bfloat16 somewhere,
#: and array-api-strict on a second device to catch arrays created without device=.
CACHE_CASES = [
    ("numpy", "cpu", "float64"),
    ("numpy", "cpu", "float16"),
    ("array_api_strict", "device1", "float32"),
    ("torch", "cpu", "float32"),
    ("torch", "cpu", "bfloat16"),
]


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


STORAGE = ("keys", "values", "key_blocks", "value_blocks", "key_scales", "value_scales")


def poison_storage(cache: KVCache) -> None:
    """Fill the float storage a cache has not written yet with NaN."""
    xp = cache.xp
    for name in STORAGE:
        x = getattr(cache, name, None)
        if x is not None:
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
        self.cache = make_cache(
            self.kind, self.case, batch=batch, kv_heads=kv_heads, head_dim=head_dim,
            capacity=CAPACITY, window=window, sink_tokens=sink_tokens, block_size=block_size,
            block_order=list(self.rng.permutation(batch * -(-CAPACITY // block_size))),
        )  # fmt: skip
        poison_storage(self.cache)
        self.keys: list[list[np.ndarray]] = [[] for _ in range(batch)]  # (Hkv, D) per token
        self.values: list[list[np.ndarray]] = [[] for _ in range(batch)]

    def _draw(self, shape: tuple[int, ...], n: list[int]) -> np.ndarray:
        """Random tokens rounded to the dtype, with NaN in each row's padding."""
        x = _rounded(self.rng.standard_normal(shape), self.case.dtype)
        for b, m in enumerate(n):
            x[b, :, m:] = np.nan
        return x

    @rule(T=st.integers(1, 8), data=st.data())
    def append(self, T: int, data: st.DataObject) -> None:
        n = data.draw(st.lists(st.integers(0, T), min_size=self.B, max_size=self.B), label="n_new")
        q = self._draw((self.B, self.Hq, T, self.D), n)
        k = self._draw((self.B, self.Hkv, T, self.D), n)
        v = self._draw((self.B, self.Hkv, T, self.D), n)
        backend, on = self.case.backend, {"dtype": self.case.dtype, "device": self.case.device}
        before = snapshot(self.cache, self.case)
        try:
            out = attend_step(
                self.cache, backend.asarray(q, **on), backend.asarray(k, **on),
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
        options = window_options(self.cache)
        ref, _ = oracle_attention(
            q, k, v, causal=True, q_pos=np.arange(L - n, L), k_pos=np.arange(L), **options
        )
        allowed = spec_error_bound({"q": q, "k": k, "v": v}, dtype=self.case.dtype).out
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


@pytest.mark.parametrize("kind", CACHE_KINDS)
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
    left, steps = [length] * batch, []
    while any(left):
        T = draw(st.integers(1, max(left)))
        n = [draw(st.integers(0, min(T, r))) for r in left]
        if not any(n):  # every step moves some row on
            first = next(b for b, r in enumerate(left) if r)
            n[first] = min(T, left[first])
        steps.append((T, n))
        left = [r - m for r, m in zip(left, n, strict=True)]
    return arrays, steps


def _decode(
    kind: str, case: Case, arrays: dict[str, np.ndarray], steps: list, **kw: Any
) -> np.ndarray:
    from refattn.testing.decoding import decode_schedule

    B, Hkv, S, D = arrays["k"].shape
    cache = make_cache(kind, case, batch=B, kv_heads=Hkv, head_dim=D, capacity=S, **kw)
    poison_storage(cache)
    return decode_schedule(cache, case, arrays, steps)


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


@pytest.mark.parametrize("kind", CACHE_KINDS)
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
    np.testing.assert_array_equal(shuffled, in_order)


# -- positional encodings through the cache --------------------------------------


@pytest.mark.parametrize("style", ["neox", "interleaved"])
@given(history=histories(), theta=st.sampled_from([100.0, 10000.0]))
def test_rope_applied_before_caching_equals_rope_on_the_full_sequence(
    cache_case: Case, style: str, history, theta: float
) -> None:
    """Keys are rotated at their absolute positions once, before they are cached."""
    from refattn import rope
    from refattn.testing.decoding import decode_schedule

    arrays, steps = history
    arrays = {name: _rounded(x, cache_case.dtype) for name, x in arrays.items()}
    D = arrays["q"].shape[-1]
    rotary_dim = D - D % 2
    if rotary_dim == 0:
        return

    def encode(name: str, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return rope(x, positions, theta=theta, style=style, rotary_dim=rotary_dim)

    B, Hkv, S, _ = arrays["k"].shape
    cache = make_cache("static", cache_case, batch=B, kv_heads=Hkv, head_dim=D, capacity=S)
    decoded = decode_schedule(cache, cache_case, arrays, steps, encode=encode)
    positions = np.arange(S)
    full = {n: encode(n, arrays[n], positions) for n in ("q", "k")}
    ref, _ = oracle_attention(full["q"], full["k"], arrays["v"], causal=True)
    allowed = 2 * spec_error_bound({**full, "v": arrays["v"]}, dtype=cache_case.dtype).out
    # RoPE itself runs in float32 for low-precision inputs: its rounding is not the cache's.
    allowed += 4 * 2.0**-22 * float(np.abs(arrays["v"]).max()) * D * S
    assert max_abs_error(decoded, ref) <= allowed


@pytest.mark.parametrize("kind", CACHE_KINDS)
@given(history=histories())
def test_alibi_through_the_cache_equals_alibi_on_the_full_sequence(
    kind: str, cache_case: Case, history
) -> None:
    from refattn import alibi_slopes
    from refattn.testing.decoding import measure_cache

    arrays, steps = history
    arrays = {name: _rounded(x, cache_case.dtype) for name, x in arrays.items()}
    B, Hkv, S, D = arrays["k"].shape
    slopes = _rounded(
        np.asarray(alibi_slopes(arrays["q"].shape[1]), dtype=np.float64), cache_case.dtype
    )
    cache = make_cache(kind, cache_case, batch=B, kv_heads=Hkv, head_dim=D, capacity=S)
    agreement = measure_cache(
        cache, cache_case, arrays, steps, oracle_attention, alibi_slopes=slopes
    )
    assert agreement.passed, agreement
