"""check_cache for caches as they ship: several layers, configs and keyword arguments, aliasing.

A factory may make one cache per layer (it takes ``layer_idx``), or one cache
may serve every layer (its ``update`` takes ``layer_idx``, as transformers'
DynamicCache's does); each layer draws its own history, sliding layers attend
through the window, and a failure names its layer. Returning arrays that share
memory with the caller's inputs is its own finding unless ``may_alias``.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest

import refattn
from refattn.testing import CacheSpec, check_cache, check_schedule
from refattn.testing.decoding import ALIASES
from refattn.testing.known_bugs.caches import DecodeOnly, KeepsViews, ListCache, ReturnsInputFirst

pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")

BUDGET: dict[str, Any] = {"max_examples": 30, "seed": 0}


class LayeredCache:
    """One cache object for every layer, ``update(k, v, layer_idx)`` as transformers' caches
    take it: full layers keep everything, sliding layers only the last ``window`` keys."""

    def __init__(self, *, config: dict[str, Any], xp: Any, **_: Any) -> None:
        self.kinds, self.window, self.xp = config["layers"], config["window"], xp
        self.k: dict[int, Any] = {}
        self.v: dict[int, Any] = {}
        self.seen: dict[int, int] = {}

    def update(self, k_new: Any, v_new: Any, layer_idx: int) -> tuple[Any, Any, Any]:
        xp = self.xp
        if layer_idx in self.k:
            k_all = xp.concat([self.k[layer_idx], k_new], axis=2)
            v_all = xp.concat([self.v[layer_idx], v_new], axis=2)
        else:
            k_all, v_all = xp.asarray(k_new, copy=True), xp.asarray(v_new, copy=True)
        seen = self.seen.get(layer_idx, 0) + k_new.shape[2]
        self.seen[layer_idx] = seen
        k_pos = xp.arange(seen - k_all.shape[2], seen)
        keep = self.window - 1 if self.kinds[layer_idx] == "sliding" else k_all.shape[2]
        self.k[layer_idx], self.v[layer_idx] = k_all[:, :, -keep:], v_all[:, :, -keep:]
        if keep == 0:
            self.k[layer_idx], self.v[layer_idx] = k_all[:, :, :0], v_all[:, :, :0]
        return k_all, v_all, k_pos


class ForgetsLayers(LayeredCache):
    """Keys by layer index modulo 2: layer 2 reads and writes layer 0's slot."""

    def update(self, k_new: Any, v_new: Any, layer_idx: int) -> tuple[Any, Any, Any]:
        return super().update(k_new, v_new, layer_idx % 2)


KINDS = ("full", "sliding", "full")
CONFIG = {"layers": KINDS, "window": 4}


def per_layer(*, layer_idx: int, max_len: int, window: int | None = None, **common: Any) -> Any:
    """A per-layer factory: a ring for the sliding layer, a dynamic cache for the others."""
    if KINDS[layer_idx] == "sliding":
        assert window == 4
        return refattn.SlidingWindowCache(window=window, **common)
    assert window is None  # a full layer is handed no window
    return refattn.DynamicCache(**common)


def test_a_per_layer_factory_gets_each_layer_index_and_passes() -> None:
    report = check_cache(per_layer, window=4, layers=KINDS, **BUDGET)
    assert report.passed, report
    assert report.counts["float32"]["layers"].tried == 30


def test_one_cache_serving_every_layer_by_index_passes() -> None:
    report = check_cache(LayeredCache, window=4, layers=KINDS, config=CONFIG, **BUDGET)
    assert report.passed, report


def test_a_cache_mixing_up_layers_fails_and_the_failure_names_the_layer() -> None:
    report = check_cache(ForgetsLayers, window=4, layers=KINDS, config=CONFIG, **BUDGET)
    assert not report.passed
    failure = report.failures[0]
    assert failure.symptom.startswith("wrong out in layer 2 (full)"), failure.symptom
    assert "layer 2 (full) of 3" in str(failure.outcome)
    spec = failure.outcome.spec
    assert isinstance(spec, CacheSpec) and spec.layers == KINDS


def test_layers_draw_their_own_histories() -> None:
    """A cache that hands every layer layer 0's keys and values is wrong on layer 1."""
    spec = CacheSpec(steps=(3, 1), layers=("full", "full"))
    shared: dict[str, Any] = {}

    def first_layer_only(**kw: Any) -> Any:
        cache = ListCache(**kw)
        if "cache" not in shared:
            shared["cache"] = cache
            return cache

        class Replays:
            def update(self, k_new: Any, v_new: Any) -> Any:
                return shared["cache"].keys[-1], shared["cache"].values[-1]

        return Replays()

    outcome = check_schedule(first_layer_only, spec)
    assert outcome.failed and "layer 1" in outcome.symptom


def test_a_number_of_layers_is_that_many_of_one_kind() -> None:
    report = check_cache(refattn.StaticCache, layers=2, **BUDGET)
    assert report.passed, report
    drawn = report.failures[0].outcome.spec if report.failures else None
    assert drawn is None


def test_cache_kwargs_and_config_pass_through_untouched() -> None:
    marker = object()
    seen: list[tuple[Any, Any]] = []

    def factory(*, config: Any, block: Any, max_len: int, **common: Any) -> Any:
        seen.append((config, block))
        return refattn.StaticCache(max_len=max_len, **common)

    report = check_cache(factory, config=marker, cache_kwargs={"block": [3]}, max_examples=5)
    assert report.passed, report
    assert seen and all(c is marker and b == [3] for c, b in seen)


def test_bad_layer_and_keyword_arguments_are_refused_by_name_before_anything_runs() -> None:
    calls: list[int] = []

    def factory(*, batch: int, kv_heads: int, head_dim: int, max_len: int, dtype: Any) -> Any:
        calls.append(1)
        return refattn.StaticCache(batch=batch, kv_heads=kv_heads, head_dim=head_dim,
                                   max_len=max_len, dtype=dtype)  # fmt: skip

    with pytest.raises(TypeError, match=r"cache_kwargs\['block'\] is not a keyword of the factory"):
        check_cache(factory, cache_kwargs={"block": 3})
    with pytest.raises(ValueError, match=r"cache_kwargs\['window'\] is a keyword the check hands"):
        check_cache(refattn.SlidingWindowCache, cache_kwargs={"window": 3})
    with pytest.raises(TypeError, match="config is given but the factory takes no config"):
        check_cache(factory, config={"layers": 2})
    with pytest.raises(ValueError, match="sliding layer, which needs window="):
        check_cache(factory, layers=("full", "sliding"))
    with pytest.raises(ValueError, match="layers must name at least one kind"):
        check_cache(factory, layers=("full", "local"))
    with pytest.raises(ValueError, match="layers must be at least 1; got 0"):
        check_cache(factory, layers=0)
    with pytest.raises(TypeError, match="may_alias must be True or False"):
        check_cache(factory, may_alias=1)  # type: ignore[arg-type]
    assert not calls


# -- aliasing -------------------------------------------------------------------------------


def _backends() -> list[str]:
    return ["numpy"] + (["torch"] if importlib.util.find_spec("torch") else [])


@pytest.mark.parametrize("backend", _backends())
def test_a_cache_returning_the_callers_arrays_is_an_aliasing_finding_by_default(
    backend: str,
) -> None:
    report = check_cache(ReturnsInputFirst, backend=backend, **BUDGET)
    assert not report.passed
    failure = report.failures[0]
    assert failure.symptom == ALIASES
    assert "k sharing memory with the caller's k_new" in failure.outcome.message
    assert all(f.symptom == ALIASES for f in report.failures)  # never as wrong values


@pytest.mark.parametrize("backend", _backends())
def test_the_same_cache_passes_when_aliasing_is_allowed(backend: str) -> None:
    report = check_cache(ReturnsInputFirst, backend=backend, may_alias=True, **BUDGET)
    assert report.passed, report


@pytest.mark.parametrize("may_alias", [False, True])
def test_a_cache_keeping_views_is_caught_as_wrong_values_either_way(may_alias: bool) -> None:
    """KeepsViews returns new arrays (no aliasing), built from views the caller rewrote."""
    report = check_cache(KeepsViews, may_alias=may_alias, **BUDGET)
    assert not report.passed
    assert report.failures[0].symptom in ("wrong out", "non-finite out")


def test_aliasing_is_seen_on_a_view_of_the_input_too() -> None:
    class ReturnsAView(ListCache):
        def update(self, k_new: Any, v_new: Any) -> tuple[np.ndarray, ...]:
            return k_new[:, :, :], np.array(v_new, copy=True)

    outcome = check_schedule(ReturnsAView, CacheSpec(steps=(2,)))
    assert outcome.symptom == ALIASES and "v sharing" not in outcome.message


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None,
    reason="needs transformers and torch",
)
def test_transformers_dynamic_cache_with_a_sliding_layer_from_its_config() -> None:
    """transformers' DynamicCache, one object for every layer, made from a config whose
    second layer slides; an adapter adds the positions of what each layer returns."""
    import torch
    import transformers

    config = transformers.Gemma2Config(
        num_hidden_layers=2, layer_types=["full_attention", "sliding_attention"],
        sliding_window=4, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, intermediate_size=16, vocab_size=10,
    )  # fmt: skip

    class WithPositions:
        def __init__(self, *, config: Any) -> None:
            self.cache = transformers.DynamicCache(config=config)
            self.seen = [0, 0]

        def update(self, k_new: Any, v_new: Any, layer_idx: int) -> tuple[Any, Any, Any]:
            k, v = self.cache.update(k_new, v_new, layer_idx)
            self.seen[layer_idx] += k_new.shape[2]
            end = self.seen[layer_idx]
            return k, v, torch.arange(end - k.shape[2], end)

    report = check_cache(WithPositions, backend="torch", window=4, layers=("full", "sliding"),
                         config=config, max_examples=20, seed=0)  # fmt: skip
    assert report.passed, report


def configured_decode_only(*, config: Any, block: Any, **common: Any) -> Any:
    """A wrong cache (keeps one token per step) behind a factory with a config and a keyword."""
    return DecodeOnly(**common)


def test_a_reproducer_carries_the_cache_kwargs_and_says_where_a_config_goes() -> None:
    report = check_cache(configured_decode_only, config=object(), cache_kwargs={"block": [3]},
                         max_examples=30, seed=0, max_failures=1)  # fmt: skip
    assert not report.passed
    code = report.to_code()
    assert "cache_kwargs = {'block': [3]}" in code and "cache_kwargs=cache_kwargs" in code
    assert "config = ...  # the config given to the check: not printable" in code
    printable = check_cache(configured_decode_only, config={"layers": 2}, cache_kwargs={"block": 3},
                            max_examples=30, seed=0, max_failures=1)  # fmt: skip
    with pytest.raises(AssertionError):  # the reproducer runs, and fails as the check did
        exec(printable.to_code(), {})
