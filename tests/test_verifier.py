"""The verifier catches real bugs, shrinks them, and passes correct kernels and caches.

Each wrong kernel and each wrong cache of ``refattn.testing.known_bugs`` has
one realistic bug; ``check_attention`` and
``check_cache`` must fail every one within their default number of examples,
with a shrunk problem whose reproducer still fails. Correct implementations
written differently from the spec (blockwise, split-KV, a plain NumPy kernel,
refattn's own caches) must pass.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import find, given
from hypothesis import strategies as st

import refattn
from refattn.testing import (
    AttentionProblem,
    CacheSpec,
    ProblemSpec,
    Unsupported,
    build_problem,
    check_attention,
    check_cache,
    check_problem,
    check_schedule,
)
from refattn.testing.drawing import DEFAULT_FEATURES, FEATURES, features_of
from refattn.testing.known_bugs import CORRECT_CACHES, WRONG_CACHES
from refattn.testing.known_bugs import CORRECT_KERNELS as CORRECT
from refattn.testing.known_bugs import KERNEL_FEATURES as WRONG_FEATURES
from refattn.testing.known_bugs import WRONG_KERNELS as WRONG
from refattn.testing.known_bugs.attention import textbook
from refattn.testing.report import size
from refattn.testing.strategies import append_schedules, attention_specs, ragged_schedules

# -- the strategies reach the corners ----------------------------------------


@given(features=st.sets(st.sampled_from(FEATURES)), data=st.data())
def test_narrowed_draws_exercise_only_the_features_asked_for(
    features: set[str], data: st.DataObject
) -> None:
    spec = data.draw(attention_specs(features))
    assert features_of(spec) <= features


@pytest.mark.parametrize("feature", sorted(DEFAULT_FEATURES))
def test_every_default_feature_is_drawn(feature: str) -> None:
    find(attention_specs(), lambda spec: feature in features_of(spec))


def _pairs(spec: ProblemSpec) -> tuple[np.ndarray, np.ndarray]:
    p = build_problem(spec)
    distance = p.q_pos[:, :, None] - p.k_pos[:, None, :]
    return distance, np.broadcast_to(p.k_pos[:, None, :] >= 0, distance.shape)


def test_draws_reach_both_sides_of_a_window_edge() -> None:
    def both_edges(spec: ProblemSpec) -> bool:
        if spec.window is None:
            return False
        distance, held = _pairs(spec)
        return bool(((distance == spec.window - 1) & held).any()) and bool(
            ((distance == spec.window) & held).any()
        )

    find(attention_specs(), both_edges)


def test_draws_reach_fully_masked_rows_and_rows_with_different_positions() -> None:
    def empty_row(spec: ProblemSpec) -> bool:
        distance, held = _pairs(spec)
        visible = held & ((distance >= 0) if spec.causal else True)
        return spec.k_len > 0 and bool((~visible.any(axis=-1)).any())

    def rows_differ(spec: ProblemSpec) -> bool:
        p = build_problem(spec)
        return spec.batch > 1 and bool((p.q_pos != p.q_pos[:1]).any())

    find(attention_specs(), empty_row)
    find(attention_specs(), rows_differ)
    find(attention_specs(), lambda s: s.q_len < s.k_len and s.causal)
    find(attention_specs(), lambda s: s.q_heads >= 2 * s.kv_heads and s.kv_heads >= 2)
    find(attention_specs(), lambda s: s.head_dim & (s.head_dim - 1) != 0 and s.head_dim > 8)


@given(append_schedules(max_len=10))
def test_append_schedules_add_up(steps: list[int]) -> None:
    assert 1 <= sum(steps) <= 10 and all(t >= 1 for t in steps)


@given(ragged_schedules(3, max_len=10))
def test_ragged_schedules_take_at_most_t_tokens_per_row(steps: list[tuple[int, list[int]]]) -> None:
    assert all(0 <= n <= T for T, ns in steps for n in ns)
    assert all(sum(ns) > 0 for _, ns in steps)


# -- wrong kernels are caught, correct ones pass -------------------------------


@pytest.mark.parametrize("name", sorted(WRONG))
def test_every_wrong_kernel_is_caught_with_a_shrunk_reproducer(name: str) -> None:
    fn, dtypes = WRONG[name]
    # Default max_examples on a fixed seed: a fresh one made this test fail now and then
    # (float16_weighted_sum was missed on one); benchmarks/verifier_catch_rates.py
    # measures how often each is caught over many seeds.
    report = check_attention(fn, dtypes=dtypes, features=WRONG_FEATURES.get(name), seed=2)
    assert not report.passed, report
    for failure in report.failures:  # every class found
        assert failure.examples <= 200
        # The shrunk problem still fails on its own, and its reproducer says so.
        o = failure.outcome
        assert isinstance(o.spec, ProblemSpec)
        assert check_problem(fn, o.spec, backend=o.backend, dtype=o.dtype).failed
        code = failure.to_code()
        assert f"from {fn.__module__} import {name}" in code
        with pytest.raises(AssertionError):
            exec(code, {})
        # Shrinking made it no bigger than it was found.
        assert failure.found is not None and size(o.spec) <= size(failure.found), failure


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_correct_kernels_written_differently_pass(name: str) -> None:
    report = check_attention(CORRECT[name], dtypes=("float64", "float32", "float16", "bfloat16"))
    assert report.passed, report
    # Only left padding cannot say every problem: rows not numbered from 0.
    assert report.supported("float32") == 200 or name == "left_padded_textbook", report
    assert report.supported("float32") >= 50, report


@pytest.mark.parametrize("backend", ["array_api_strict", "torch"])
def test_problems_live_on_the_backend_asked_for(backend: str) -> None:
    pytest.importorskip(backend)
    seen: list[Any] = []

    def blockwise_here(p: AttentionProblem) -> Any:
        seen.append(type(p.q).__module__.split(".")[0])
        return CORRECT["blockwise"](p)

    report = check_attention(blockwise_here, backend=backend, max_examples=30, seed=1)
    assert report.passed, report
    assert set(seen) == {backend}


def test_wrong_kernel_on_torch_problems_is_caught() -> None:
    pytest.importorskip("torch")
    fn, _ = WRONG["gqa_heads_interleaved"]
    report = check_attention(fn, backend="torch", dtypes=("float32", "bfloat16"), seed=0)
    assert {f.outcome.dtype for f in report.failures} == {"float32", "bfloat16"}, report
    # Every class is the interleaving: each needs query heads grouped over KV heads.
    assert all("gqa" in f.features or "mqa" in f.features for f in report.failures), report


# -- the protocol ---------------------------------------------------------------


def test_unsupported_problems_are_counted_not_failed() -> None:
    def causal_only(p: AttentionProblem) -> Any:
        if not p.causal:
            raise Unsupported("non-causal")
        return textbook(p)

    report = check_attention(causal_only, max_examples=50, seed=2)
    assert report.passed, report
    total = report.counts["float32"]["all"]
    assert total.unsupported > 0 and total.passed > 0
    assert total.unsupported + total.passed == total.tried == 50
    assert report.counts["float32"]["causal"].unsupported == 0


def test_a_kernel_that_supports_nothing_has_not_passed() -> None:
    def nothing(p: AttentionProblem) -> Any:
        raise Unsupported("not yet")

    report = check_attention(nothing, max_examples=10, seed=0)
    assert not report.passed
    assert "every problem was unsupported" in str(report)


def test_a_crash_is_a_failure_naming_the_exception() -> None:
    def crashes_on_gqa(p: AttentionProblem) -> Any:
        if p.q.shape[1] != p.k.shape[1]:
            raise RuntimeError("head counts differ")
        return textbook(p)

    report = check_attention(crashes_on_gqa, seed=0)
    assert not report.passed
    failure = report.failures[0]
    assert "head counts differ" in failure.outcome.message
    assert failure.outcome.spec.q_heads == 2 and failure.outcome.spec.kv_heads == 1


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (lambda p, out: out[..., :1], "out has shape"),
        (lambda p, out: (out, out[..., 0]), "must return out alone"),
    ],
)
def test_wrong_shapes_and_tuples_are_named(result: Any, message: str) -> None:
    spec = ProblemSpec(q_len=2, k_len=3)
    outcome = check_problem(lambda p: result(p, textbook(p)), spec)
    assert outcome.failed and message in outcome.message, outcome


def test_lse_is_required_when_asked_for() -> None:
    outcome = check_problem(lambda p: textbook(replace(p, return_lse=False)),
                            ProblemSpec(k_len=3, return_lse=True))  # fmt: skip
    assert outcome.failed and "(out, lse)" in outcome.message


def test_unknown_features_and_strings_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown"):
        check_attention(textbook, features={"causal", "dropout"})
    with pytest.raises(TypeError, match="string"):
        check_attention(textbook, features="causal")
    with pytest.raises(ValueError, match="dtype must be one of"):
        check_attention(textbook, backend="array_api_strict", dtypes=("float16",))
    with pytest.raises(
        ValueError, match=r"unknown \['seen_nan'\] \(the spec takes it, but a candidate"
    ):
        check_attention(textbook, features={"causal", "seen_nan"})


@pytest.mark.parametrize("check", [check_attention, check_cache])
def test_an_empty_dtype_list_is_refused_rather_than_passed(check: Any) -> None:
    """No dtype means no problem checked: that must be an error, never ``passed``."""
    with pytest.raises(ValueError, match="dtypes must name at least one dtype; got none"):
        check(textbook if check is check_attention else refattn.StaticCache, dtypes=())


def test_report_to_dict_carries_counts_and_the_reproducer() -> None:
    fn, dtypes = WRONG["unscaled"]
    data = check_attention(fn, dtypes=dtypes, seed=0).to_dict()
    assert data["passed"] is False
    failed = data["counts"]["float32"]["all"]["failed"]
    assert failed == sum(f["draws"] for f in data["failures"])  # every failing draw sorted
    assert data["first_failure"]["float32"] <= 200 and data["seconds"]["float32"] > 0
    for failure in data["failures"]:
        out_wrong = failure["error"] > failure["allowed"]
        assert out_wrong or failure["lse_error"] > failure["lse_allowed"]
        assert "check_problem(unscaled" in failure["code"]


# -- caches ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(WRONG_CACHES))
def test_every_wrong_cache_is_caught_with_a_shrunk_reproducer(name: str) -> None:
    factory = WRONG_CACHES[name]
    report = check_cache(factory)
    assert not report.passed, report
    failure = report.failures[0]
    o = failure.outcome
    assert isinstance(o.spec, CacheSpec)
    assert check_schedule(factory, o.spec, backend=o.backend, dtype=o.dtype).failed
    with pytest.raises(AssertionError):
        exec(failure.to_code(), {})
    assert failure.found is not None and size(o.spec) <= size(failure.found), failure


def _refattn_caches() -> dict[str, tuple[Any, dict[str, Any]]]:
    def drop(name: str) -> Any:
        def factory(**kw: Any) -> Any:
            kw.pop("max_len")
            return getattr(refattn, name)(**kw)

        return factory

    def paged(**kw: Any) -> Any:
        max_len = kw.pop("max_len")
        return refattn.PagedCache(**kw, block_size=3, num_blocks=kw["batch"] * -(-max_len // 3))

    def ring(**kw: Any) -> Any:
        kw.pop("max_len")
        return refattn.SlidingWindowCache(**kw, window=5, sink_tokens=2)

    return {
        "static": (refattn.StaticCache, {}),
        "dynamic": (drop("DynamicCache"), {}),
        "paged": (paged, {}),
        "sliding": (ring, {"window": 5, "sink_tokens": 2}),
        "quantized": (lambda **kw: refattn.QuantizedCache(**kw, bits=8), {"bits": 8}),
    }


@pytest.mark.parametrize("kind", sorted(_refattn_caches()))
def test_refattn_caches_pass(kind: str) -> None:
    factory, options = _refattn_caches()[kind]
    report = check_cache(factory, dtypes=("float32", "float16"), **options)
    assert report.passed, report


@pytest.mark.parametrize("name", sorted(CORRECT_CACHES))
def test_correct_caches_written_differently_pass(name: str) -> None:
    report = check_cache(CORRECT_CACHES[name], dtypes=("float32", "float16"))
    assert report.passed, report


def test_a_ring_cache_without_the_window_is_caught() -> None:
    def ring(**kw: Any) -> Any:
        kw.pop("max_len")
        return refattn.SlidingWindowCache(**kw, window=4)

    report = check_cache(ring)  # checked as if it kept every token
    assert not report.passed
    spec = report.failures[0].outcome.spec
    assert isinstance(spec, CacheSpec) and spec.length > 4
