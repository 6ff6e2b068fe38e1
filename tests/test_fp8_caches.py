"""fp8 KV caches judged by their format: refattn's QuantizedCache in e4m3 and e5m2 with a scale
per token, per KV head or per tensor, and a cache whose frozen scale saturates.

The format sets the allowance: half the spacing at a stored value's magnitude
(2^-4 of it for e4m3, 2^-3 for e5m2), the least spacing below the least
normal, and nothing for a value clipped at the largest finite code.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refattn
from refattn.caches.quantized import FLOAT8, SCALES
from refattn.testing import CacheSpec, check_cache, check_schedule
from refattn.testing.known_bugs import CORRECT_CACHES, WRONG_CACHES
from refattn.testing.known_bugs.caches import FrozenScale, FrozenScaleSaturates
from refattn.testing.tolerance import storage_error
from tests.test_caches import assert_same_state

PAIRS = [(f, s) for f in FLOAT8 for s in SCALES]


def _expected_error(x: np.ndarray, format: str, scales: str) -> np.ndarray:
    """The format's bound, written out from its constants: 2^-(m+1) |x| plus the least
    spacing at twice the least scale that holds the values sharing one, plus float32."""
    f8 = FLOAT8[format]
    axes = {"token": (-1,), "head": (0, 2, 3), "tensor": (0, 1, 2, 3)}[scales]
    scale = 2 * np.abs(x).max(axis=axes, keepdims=True) / f8.largest
    return 2.0 ** -(f8.mantissa + 1) * np.abs(x) + 2.0 ** (f8.min_exponent - f8.mantissa) * scale


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[np.ndarray], int]:
    """Appends of (2, 2, T, 4) float32 values, some steps much larger than the rest."""
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    steps = []
    for T in sizes:
        magnitude = draw(st.sampled_from([1.0, 1e-3, 30.0, 1e3]))
        steps.append((rng.standard_normal((2, 2, T, 4)) * magnitude).astype(np.float32))
    return steps, sum(sizes)


@pytest.mark.parametrize(("format", "scales"), PAIRS)
@settings(max_examples=25, deadline=None)
@given(history=histories())
def test_fp8_round_trip_is_within_the_formats_bound_and_never_clipped(
    format: str, scales: str, history: tuple[list[np.ndarray], int]
) -> None:
    steps, total = history
    cache = refattn.QuantizedCache(batch=2, kv_heads=2, head_dim=4, max_len=total,
                                   format=format, scales=scales)  # fmt: skip
    for x in steps:
        k, v, _ = cache.update(x, -x)
    seen = np.concatenate(steps, axis=2).astype(np.float64)
    error = np.abs(k.astype(np.float64) - seen)
    assert (error <= _expected_error(seen, format, scales) * (1 + 1e-6) + 1e-30).all()
    assert (error <= storage_error(seen, format=format, scales=scales)).all()
    # The largest value of every group that shares a scale is held, not clipped.
    assert np.abs(k).max() >= (1 - 2.0 ** -(FLOAT8[format].mantissa + 1)) * np.abs(seen).max()
    np.testing.assert_array_equal(v, -k)  # symmetric codes


@pytest.mark.parametrize("format", list(FLOAT8))
def test_per_token_codes_are_ml_dtypes_rounding_of_x_over_its_scale(format: str) -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((1, 3, 5, 8)) * 7).astype(np.float32)
    cache = refattn.QuantizedCache(batch=1, kv_heads=3, head_dim=8, max_len=5, format=format)
    cache.update(x, x)
    scale = np.abs(x).max(axis=-1, keepdims=True) / np.float32(FLOAT8[format].largest)
    expected = (x / scale).astype(getattr(ml_dtypes, FLOAT8[format].dtype))
    np.testing.assert_array_equal(cache.key_codes.astype(np.float32), expected.astype(np.float32))
    np.testing.assert_array_equal(cache.key_scales, scale)


def test_a_shared_scale_is_fixed_by_the_first_update_and_raised_by_powers_of_two() -> None:
    x = np.full((1, 1, 2, 4), 1.0, np.float32)
    cache = refattn.QuantizedCache(batch=1, kv_heads=1, head_dim=4, max_len=6, format="e4m3",
                                   scales="tensor")  # fmt: skip
    cache.update(x, x)
    first = float(cache.key_scales.item())
    assert first == np.float32(1 / 448)
    cache.update(x / 4, x / 4)  # smaller: the scale stays
    assert float(cache.key_scales.item()) == first
    k, _, _ = cache.update(100 * x[:, :, :1], 100 * x[:, :, :1])  # needs 100x: raised by 128
    assert float(cache.key_scales.item()) == first * 128
    np.testing.assert_array_equal(k[0, 0, :4, 0], [1.0, 1.0, 0.25, 0.25])  # old codes exact
    assert abs(float(k[0, 0, 4, 0]) - 100) <= 100 * 2.0**-4  # 352 * scale: e4m3's spacing 32


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="no torch")
@pytest.mark.parametrize(("format", "scales"), PAIRS)
def test_torch_stores_the_same_fp8_codes_as_numpy(format: str, scales: str) -> None:
    import array_api_compat.torch as xp
    import torch

    rng = np.random.default_rng(2)
    steps = [
        (rng.standard_normal((2, 2, T, 4)) * m).astype(np.float32) for T, m in ((3, 1), (2, 9))
    ]
    on_torch: dict[str, Any] = {"xp": xp, "dtype": torch.float32}
    caches = [refattn.QuantizedCache(batch=2, kv_heads=2, head_dim=4, max_len=5, format=format,
                                     scales=scales, **kw) for kw in ({}, on_torch)]  # fmt: skip
    for x in steps:
        k_np, _, _ = caches[0].update(x, x)
        k_torch, _, _ = caches[1].update(torch.from_numpy(x), torch.from_numpy(x))
    assert caches[1].key_codes.dtype == getattr(torch, FLOAT8[format].dtype)
    np.testing.assert_array_equal(k_torch.numpy(), k_np)


# -- check_cache --------------------------------------------------------------------------


@pytest.mark.parametrize(("format", "scales"), PAIRS)
def test_check_cache_passes_refattn_fp8_caches(format: str, scales: str) -> None:
    report = check_cache(refattn.QuantizedCache, format=format, scales=scales,
                         dtypes=("float32", "float16"), seed=0)  # fmt: skip
    assert report.passed, report
    assert report.counts["float32"]["outliers"].tried > 0


def test_check_cache_draws_every_format_a_quantized_cache_takes() -> None:
    drawn: set[tuple[Any, str]] = set()

    def seen(outcome: Any) -> None:
        drawn.add((outcome.spec.format, outcome.spec.scales))

    report = check_cache(refattn.QuantizedCache, max_examples=60, seed=1, on_example=seen)
    assert report.passed, report
    assert drawn == {("int8", "token"), *PAIRS}


def test_a_frozen_scale_that_saturates_is_caught_and_the_failure_says_why() -> None:
    assert WRONG_CACHES["FrozenScaleSaturates"] is FrozenScaleSaturates
    report = check_cache(FrozenScaleSaturates, seed=0)
    assert not report.passed
    failure = report.failures[0]
    spec = failure.outcome.spec
    assert failure.symptom == "wrong out", failure.symptom
    assert isinstance(spec, CacheSpec) and spec.outlier_size > 1 and len(spec.steps) > 1
    assert failure.outcome.error > failure.outcome.allowed
    assert "check_schedule(FrozenScaleSaturates" in failure.to_code()


def test_the_same_history_passes_a_cache_that_raises_its_scale() -> None:
    """A later outlier token clips under a frozen scale and is held by one that grows."""
    spec = CacheSpec(steps=(2, 1, 1), batch=1, head_dim=4, format="e4m3", scales="tensor",
                     outlier_size=32.0, seed=5)  # fmt: skip
    assert check_schedule(FrozenScaleSaturates, spec).failed
    assert check_schedule(FrozenScale, spec).passed
    assert check_schedule(refattn.QuantizedCache, spec).passed


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_frozen_scale_that_rescales_passes(dtype: str) -> None:
    assert CORRECT_CACHES["FrozenScale"] is FrozenScale
    report = check_cache(FrozenScale, dtypes=(dtype,), seed=0)
    assert report.passed, report


# -- arguments and failed updates ---------------------------------------------------------


SHAPE: dict[str, Any] = {"batch": 1, "kv_heads": 1, "head_dim": 4, "max_len": 4}


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        (
            {"format": "fp8"},
            ValueError,
            r"format must be one of \('int8', 'e4m3', 'e5m2'\); got 'fp8'",
        ),
        ({"scales": "row"}, ValueError, r"scales must be one of .*; got 'row'"),
        ({"scales": "head"}, ValueError, r"scales must be 'token' for format='int8'.*got 'head'"),
        ({"format": "e4m3", "bits": 4}, ValueError, r"bits must be 8 \(or not given\).*got 4"),
        ({"bits": True}, TypeError, r"bits must be an integer in \[2, 8\]; got True"),
        ({"bits": 9}, ValueError, r"bits must be an integer in \[2, 8\]; got 9"),
    ],
)
def test_bad_quantized_arguments_name_the_argument(
    arguments: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        refattn.QuantizedCache(**SHAPE, **arguments)


def test_fp8_on_a_library_without_float8_is_refused_by_name() -> None:
    strict = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match="format='e5m2' needs a float8_e5m2 dtype"):
        refattn.QuantizedCache(**SHAPE, format="e5m2", xp=strict)


def test_bad_check_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match="format must be one or more of"):
        check_cache(refattn.QuantizedCache, format="fp4")
    with pytest.raises(ValueError, match="bits=4 is for format='int8'"):
        check_cache(refattn.QuantizedCache, bits=4, format="e4m3")
    with pytest.raises(ValueError, match="leaves nothing to draw"):
        check_cache(refattn.QuantizedCache, format="int8", scales="head")
    with pytest.raises(ValueError, match="scales='head' is given without format="):
        check_cache(refattn.StaticCache, scales="head")
    with pytest.raises(ValueError, match=r"CacheSpec\.format must be one of"):
        CacheSpec(format="e3m4")
    with pytest.raises(ValueError, match=r"CacheSpec\.outlier_size must be at least 1"):
        CacheSpec(outlier_size=0.5)


def _state(cache: refattn.QuantizedCache) -> dict[str, Any]:
    state: dict[str, Any] = {"lengths": list(cache._lengths)}
    for name in (*cache.STORAGE, "positions"):
        state[name] = np.asarray(getattr(cache, name)).astype(np.float64)
    return state


@pytest.mark.parametrize("scales", SCALES)
def test_a_refused_update_leaves_a_shared_scale_and_its_codes_as_they_were(scales: str) -> None:
    cache = refattn.QuantizedCache(**SHAPE, format="e4m3", scales=scales)
    x = np.ones((1, 1, 3, 4), np.float32)
    cache.update(x, x)
    before = _state(cache)
    with pytest.raises(ValueError, match="overflow"):
        cache.update(100 * x[:, :, :2], 100 * x[:, :, :2])  # would raise the scale, if room
    with pytest.raises(ValueError, match="must have shape"):
        cache.update(100 * x[:, :, :1, :2], 100 * x[:, :, :1, :2])
    assert_same_state(before, _state(cache))


def test_releasing_rows_keeps_a_shared_scale() -> None:
    cache = refattn.QuantizedCache(**{**SHAPE, "batch": 2}, format="e5m2", scales="head")
    cache.update(np.ones((2, 1, 2, 4), np.float32), np.ones((2, 1, 2, 4), np.float32))
    scale = np.array(cache.key_scales)
    cache.release(0)
    np.testing.assert_array_equal(cache.key_scales, scale)
