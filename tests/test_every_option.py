"""The verifier speaks every option of the spec: masks, bias, sinks, two-sided windows, latent
shapes, in-op caches, kernel constraints, "don't care" rows.

Each new feature is shown drawn by a ``hypothesis.find`` over the strategy
``check_attention`` uses; the structured masks are checked against their
definitions written out here; the two-sided window against the loop oracle's
weights; the constraints by drawing under them; a Result's present K/V and
don't-care rows by candidates that get them right and wrong.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st

import refattn
from refattn.testing import (
    AttentionProblem,
    Constraints,
    ProblemSpec,
    Result,
    Unsupported,
    build_problem,
    check_attention,
    check_problem,
)
from refattn.testing.drawing import DEFAULT_FEATURES, FEATURES, features_of
from refattn.testing.known_bugs.attention import CORRECT, EVERY_OPTION, WRONG
from refattn.testing.known_bugs.attention import FEATURES as BUG_FEATURES
from refattn.testing.oracle import oracle_attention
from refattn.testing.problems import MASK_KINDS, visible_by_positions
from refattn.testing.strategies import attention_specs

#: The features this suite adds to what a candidate can be handed.
NEW = tuple(FEATURES[FEATURES.index("mask") :])
DTYPES = ("float64", "float32", "float16", "bfloat16")


def _mask_of(problem: Any) -> np.ndarray:
    assert problem.mask is not None
    return np.asarray(problem.mask)


def _found(features: set[str], condition: Any) -> ProblemSpec:
    spec = find(attention_specs(features), condition, settings=settings(max_examples=2000))
    assert condition(spec)
    return spec


# -- part 1: every option drawn ---------------------------------------------------


def _has_tree_depth(spec: ProblemSpec) -> bool:
    """A draft tree with a node two levels below the prefix (a grandparent in the tree)."""
    if not (spec.mask and spec.mask_kind == "tree" and spec.q_len >= 3 and spec.k_len >= 3):
        return False
    mask = build_problem(spec).mask
    prefix = spec.k_len - min(spec.q_len, spec.k_len)
    return mask is not None and bool((mask.sum(axis=-1) >= prefix + 3).any())


FOUND = {
    "mask": lambda s: s.mask and s.mask_kind == "random",
    "tree_mask": _has_tree_depth,
    "document_mask": lambda s: (
        s.mask
        and s.mask_kind == "document"
        and len(np.unique(_mask_of(build_problem(s))[0, 0].sum(axis=-1))) >= 2
    ),
    "prefix_lm": lambda s: s.mask and s.mask_kind == "prefix_lm" and not s.causal,
    "bias": lambda s: s.bias,
    "sink_logits": lambda s: s.sink_logits and s.sink_offset >= 30,
    "sink_tokens": lambda s: s.sink_tokens > 0 and s.window is not None,
    "two_sided_window": lambda s: s.window is not None and s.window_right is not None,
    "latent": lambda s: (s.head_dim, s.value_dim, s.kv_heads) == (576, 512, 1),
    "mqa": lambda s: s.kv_heads == 1 and s.q_heads >= 8,
    "in_op_cache": lambda s: s.new_keys is not None and 0 < s.new_keys < s.k_len - 1,
}


def test_every_new_feature_has_a_find_test() -> None:
    assert set(FOUND) == set(NEW)


@pytest.mark.parametrize("feature", NEW)
def test_each_new_feature_is_drawn(feature: str) -> None:
    """``hypothesis.find`` reaches each feature, in its hardest form, from the check's
    own strategy (with the features a real kernel would be checked with beside it)."""
    spec = _found(set(DEFAULT_FEATURES) | {feature}, FOUND[feature])
    assert feature in features_of(spec)


def test_new_features_are_never_drawn_unasked() -> None:
    """By default a candidate is handed only what it has always been: no problem drawn with
    the default features sets a field added later."""

    @given(attention_specs(DEFAULT_FEATURES))
    @settings(max_examples=300)
    def check(spec: ProblemSpec) -> None:
        assert not features_of(spec) & set(NEW)
        assert (spec.mask, spec.bias, spec.sink_logits, spec.sink_tokens) == (False,) * 3 + (0,)
        assert spec.window_right is None and spec.new_keys is None

    check()


def _ancestors(mask: np.ndarray, n: int) -> np.ndarray:
    return mask[-n:, -n:] if n else mask[:0, :0]


@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_a_tree_mask_is_a_prefix_and_a_tree_of_ancestors(q_len: int, k_len: int, seed: int) -> None:
    """Every node sees the whole prefix, itself, and a chain of ancestors that is closed (its
    parent's ancestors are its own); with the default layout a node sits at the prefix
    length plus its depth, one past its parent."""
    spec = ProblemSpec(q_len=q_len, k_len=k_len, mask=True, mask_kind="tree", seed=seed,
                       causal=True)  # fmt: skip
    p = build_problem(spec)
    mask = _mask_of(p)[0, 0]  # (Sq, Sk)
    n = min(q_len, k_len)
    prefix = k_len - n
    assert mask[:, :prefix].all()
    tree = _ancestors(mask, n)  # (n, n): node t sees node u
    assert np.diag(tree).all() and not np.triu(tree, 1).any()
    for t in range(n):
        seen = np.flatnonzero(tree[t, :t])
        if seen.size:
            parent = seen.max()
            assert (tree[t, : parent + 1] == tree[parent, : parent + 1]).all()
            assert p.q_pos[0, q_len - n + t] == p.k_pos[0, prefix + parent] + 1
        else:
            assert p.q_pos[0, q_len - n + t] == prefix
    assert (p.q_pos[0, q_len - n :] == p.k_pos[0, prefix:]).all()


@given(st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_a_document_mask_keeps_each_query_in_its_own_document(n: int, seed: int) -> None:
    """Packed self-attention: the keys a query sees are one run of slots holding its own,
    and positions restart at 0 where each document starts."""
    p = build_problem(ProblemSpec(q_len=n, k_len=n, mask=True, mask_kind="document",
                                  seed=seed, causal=True))  # fmt: skip
    mask = _mask_of(p)[0, 0]
    for i in range(n):
        kept = np.flatnonzero(mask[i])
        assert i in kept and (np.diff(kept) == 1).all()
        assert p.k_pos[0, kept[0]] == 0 and p.q_pos[0, i] == i - kept[0]
    assert (mask == mask.T).all()  # one relation: same document


@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_a_prefix_lm_mask_is_bidirectional_on_the_prefix_causal_after(
    q_len: int, k_len: int, seed: int
) -> None:
    """Some prefix length P makes the mask exactly ``k < P or k <= q``."""
    p = build_problem(ProblemSpec(batch=2, q_len=q_len, k_len=k_len, mask=True,
                                  mask_kind="prefix_lm", seed=seed))  # fmt: skip
    for b in range(2):
        k, q = p.k_pos[b][None, :], p.q_pos[b][:, None]
        fits = [P for P in range(k_len + 1) if ((k < P) | (k <= q) == _mask_of(p)[b, 0]).all()]
        assert fits, _mask_of(p)[b, 0]


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_no_empty_rows_keeps_a_key_in_every_row_positions_allow(kind: str) -> None:
    for seed in range(30):
        spec = ProblemSpec(batch=2, q_heads=2, q_len=5, k_len=6, mask=True, mask_kind=kind,
                           causal=True, layout="holes", seed=seed, no_empty_rows=True)  # fmt: skip
        p = build_problem(spec)
        positions = visible_by_positions(spec, p.q_pos, p.k_pos)[:, None]  # (B, 1, Sq, Sk)
        seen = positions & p.mask
        assert (seen.any(axis=-1) == np.broadcast_to(positions.any(axis=-1), seen.shape[:3])).all()


# -- part 2: two-sided windows ----------------------------------------------------


@given(st.integers(1, 8), st.integers(1, 10), st.integers(1, 6), st.integers(0, 5),
       st.booleans(), st.integers(0, 2**32 - 1))  # fmt: skip
def test_a_two_sided_window_keeps_exactly_the_band_around_each_query(
    q_len: int, k_len: int, window: int, right: int, causal: bool, seed: int
) -> None:
    """The loop oracle gives weight to key j exactly when ``q - W < k <= q + R`` (and
    ``k <= q`` with causal); the spec and its blockwise form agree with it."""
    spec = ProblemSpec(q_len=q_len, k_len=k_len, window=window, window_right=right,
                       causal=causal, layout="staggered", seed=seed)  # fmt: skip
    p = build_problem(spec)
    scalars, arrays = p.scalars(), dict[str, Any](p.arrays())
    out, _, weights = oracle_attention(**arrays, **scalars, return_weights=True)
    q, k = p.q_pos[0][:, None], p.k_pos[0][None, :]
    band = (q - window < k) & (k <= q + right) & ((k <= q) if causal else True)
    assert ((weights[0, 0] > 0) == band).all()
    for form in (refattn.attention, refattn.attention_blockwise):
        got = form(**arrays, **scalars)
        assert np.allclose(got, out, atol=1e-12)


def test_the_one_sided_window_keeps_its_meaning() -> None:
    """``window=W`` alone is ``window_right=None``: the same outputs as before it came."""
    p = build_problem(ProblemSpec(q_len=4, k_len=7, window=3, seed=2))
    plain = refattn.attention(**p.arrays(), window=3)
    assert np.array_equal(plain, refattn.attention(**p.arrays(), window=3, window_right=None))
    with pytest.raises(ValueError, match=r"window_right must be >= 0; got -1"):
        refattn.attention(**p.arrays(), window_right=-1)


def test_the_blockwise_form_skips_blocks_outside_a_two_sided_window() -> None:
    """A block of keys past every query's right reach is never read: NaN there stays out."""
    spec = ProblemSpec(q_len=4, k_len=32, window=2, window_right=1, layout="top_left")
    arrays = dict[str, Any](build_problem(spec).arrays())
    k, v = arrays["k"].copy(), arrays["v"].copy()
    k[:, :, 16:], v[:, :, 16:] = np.nan, np.nan  # keys 16.. are past query 3's reach of 1
    out = refattn.attention_blockwise(**{**arrays, "k": k, "v": v}, window=2, window_right=1,
                                      block_k=8)  # fmt: skip
    assert np.isfinite(out).all()


# -- acceptance: the correct kernels pass with every new option, the wrong ones fail -----


@pytest.mark.parametrize("name", ["textbook", "blockwise", "split_kv"])
def test_correct_kernels_pass_with_every_new_option_in_four_dtypes(name: str) -> None:
    report = check_attention(CORRECT[name], features=EVERY_OPTION, dtypes=DTYPES,
                             max_examples=60, seed=3)  # fmt: skip
    assert report.passed, str(report)
    for feature in NEW:
        assert report.counts["float32"][feature].passed > 0, feature


@pytest.mark.parametrize(
    "name", ["sink_left_out_of_denominator", "tree_mask_transposed", "document_mask_leaks",
             "right_reach_off_by_one"],
)  # fmt: skip
def test_wrong_kernels_for_the_new_options_are_caught(name: str) -> None:
    fn, dtypes = WRONG[name]
    for seed in range(3):
        report = check_attention(fn, features=BUG_FEATURES[name], dtypes=dtypes, seed=seed,
                                 max_failures=1)  # fmt: skip
        assert not report.passed
        assert report.failures[0].features & set(NEW), str(report)


# -- part 3: kernel constraints narrow the draws ----------------------------------


CONSTRAINTS = [
    Constraints(head_dim_multiple=16, max_head_dim=128),
    Constraints(same_value_dim=True, max_head_dim=256),
    Constraints(square_unless_causal=True),
    Constraints(keys_cover_queries=True),
    Constraints(causal_only=True),
    Constraints(no_empty_rows=True),
    Constraints(
        head_dim_multiple=8,
        same_value_dim=True,
        keys_cover_queries=True,
        no_empty_rows=True,
        causal_only=True,
    ),
]


@pytest.mark.parametrize("constraints", CONSTRAINTS, ids=lambda c: ",".join(c.requirements()))
def test_only_problems_a_kernel_takes_are_drawn(constraints: Constraints) -> None:
    """A kernel that refuses everything outside its constraints is never refused a draw,
    and still meets the features it asked for."""

    def strict(p: AttentionProblem) -> Any:
        s = p.spec
        D, Dv = s.head_dim, s.value_dim
        c = constraints
        if D % c.head_dim_multiple or Dv % c.head_dim_multiple:
            raise Unsupported("head dim")
        if c.max_head_dim is not None and max(D, Dv) > c.max_head_dim:
            raise Unsupported("head dim too large")
        if c.same_value_dim and D != Dv:
            raise Unsupported("Dv != D")
        if c.causal_only and not p.causal:
            raise Unsupported("not causal")
        if c.square_unless_causal and not p.causal and s.q_len != s.k_len:
            raise Unsupported("Sq != Sk")
        held = (np.asarray(p.k_pos) >= 0).sum(axis=-1)
        if c.keys_cover_queries and (held < s.q_len).any():
            raise Unsupported("a row with fewer keys than queries")
        out, lse = refattn.attention(p.q, p.k, p.v, **{**p.options(), "return_lse": True})
        if c.no_empty_rows and bool((np.asarray(lse) == -math.inf).any()) and \
                p.sink_logits is None:  # fmt: skip
            raise Unsupported("an empty row")
        return (out, lse) if p.return_lse else out

    strict.constraints = constraints  # type: ignore[attr-defined]
    features = EVERY_OPTION
    report = check_attention(strict, features=features, max_examples=80, seed=5)
    assert report.passed, str(report)
    assert report.counts["float32"]["all"].unsupported == 0, str(report)
    assert report.counts["float32"]["all"].tried == 80


def test_constraints_are_checked_and_explained() -> None:
    with pytest.raises(ValueError, match="max_head_dim must be >= 16"):
        Constraints(head_dim_multiple=16, max_head_dim=8)
    with pytest.raises(TypeError, match=r"Constraints\.causal_only must be True or False"):
        Constraints(causal_only=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="features must include 'causal'"):
        check_attention(CORRECT["textbook"], features={"gqa"},
                        constraints=Constraints(causal_only=True))  # fmt: skip
    with pytest.raises(TypeError, match="constraints must be a refattn"):
        check_attention(CORRECT["textbook"], constraints={"causal_only": True})  # type: ignore[arg-type]


# -- part 4 and 5: don't-care rows and present K/V ---------------------------------


def _spec_answer(p: AttentionProblem) -> tuple[Any, Any]:
    return refattn.attention(p.q, p.k, p.v, **{**p.options(), "return_lse": True})


def _garbled_empty_rows(p: AttentionProblem, *, declare: bool) -> Any:
    """The spec's answer with 7.0 written into every row that sees no key (as kernels leave
    padding queries), declaring them "don't care" or not."""
    out, lse = _spec_answer(p)
    empty = (np.asarray(lse) == -math.inf).any(axis=1)  # (B, Sq)
    out = np.where(empty[:, None, :, None], 7.0, np.asarray(out))
    return Result(out, lse if p.return_lse else None, dont_care=empty if declare else None)


def test_dont_care_rows_are_not_compared_and_are_counted() -> None:
    features = DEFAULT_FEATURES
    declared = check_attention(lambda p: _garbled_empty_rows(p, declare=True),
                               features=features, seed=2)  # fmt: skip
    assert declared.passed, str(declared)
    assert declared.ignored_rows["float32"] > 0
    assert "declared don't care (padding) were not compared" in str(declared)
    silent = check_attention(lambda p: _garbled_empty_rows(p, declare=False), features=features,
                             seed=2, max_failures=1)  # fmt: skip
    assert not silent.passed and silent.failures[0].symptom == "wrong out"


def test_a_result_with_bad_dont_care_rows_is_unusable() -> None:
    spec = ProblemSpec(batch=2, q_len=3, k_len=4)
    bad = check_problem(lambda p: Result(_spec_answer(p)[0], dont_care=np.zeros((3, 2))), spec)
    assert "dont_care must be booleans of shape (2, 3)" in bad.message


def _in_op(p: AttentionProblem, *, drop_last: bool = False) -> Result:
    """An in-op cache kernel: gets the past K/V and the new tokens' K/V, appends, attends.
    With ``drop_last`` it forgets to write the last new token (its slot keeps the zeros of
    a fresh buffer)."""
    k, v = np.asarray(p.k).copy(), np.asarray(p.v).copy()
    held = np.asarray(p.k_pos) >= 0
    present_k, present_v = np.zeros_like(k), np.zeros_like(v)
    for b in range(k.shape[0]):
        slots = np.flatnonzero(held[b])
        past, new = slots[: slots.size - p.new_keys], slots[slots.size - p.new_keys :]
        present_k[b][:, past], present_v[b][:, past] = k[b][:, past], v[b][:, past]
        written = new[:-1] if drop_last and new.size else new
        present_k[b][:, written], present_v[b][:, written] = k[b][:, written], v[b][:, written]
    out, lse = refattn.attention(p.q, present_k, present_v,
                                 **{**p.options(), "return_lse": True})  # fmt: skip
    return Result(out, lse if p.return_lse else None, present=(present_k, present_v))


def test_an_in_op_cache_is_judged_by_its_present_k_and_v() -> None:
    features = DEFAULT_FEATURES | {"in_op_cache"}
    right = check_attention(_in_op, features=features, dtypes=DTYPES, seed=4, max_examples=80)
    assert right.passed, str(right)
    wrong = check_attention(lambda p: _in_op(p, drop_last=True), features=features, seed=4,
                            max_failures=1)  # fmt: skip
    assert not wrong.passed
    assert wrong.failures[0].symptom == "wrong present K/V", str(wrong)
    assert "present k differs from the problem's k" in wrong.failures[0].outcome.message


def test_present_k_and_v_may_be_longer_and_held_by_a_cache_object() -> None:
    spec = ProblemSpec(batch=2, kv_heads=2, q_heads=4, q_len=2, k_len=5, causal=True)

    class Layer:
        def __init__(self, keys: Any, values: Any) -> None:
            self.keys, self.values = keys, values

    class Cache:  # transformers' shape: layers[i].keys / .values
        def __init__(self, keys: Any, values: Any) -> None:
            self.layers = [Layer(keys, values)]

    def longer(p: AttentionProblem) -> Result:
        pad = ((0, 0), (0, 0), (0, 3), (0, 0))
        k, v = np.pad(np.asarray(p.k), pad), np.pad(np.asarray(p.v), pad)
        return Result(refattn.attention(p.q, p.k, p.v, **p.options()), present=Cache(k, v))

    assert check_problem(longer, spec).passed
    short = check_problem(lambda p: Result(refattn.attention(p.q, p.k, p.v, **p.options()),
                                           present=(p.k[:, :, :4], p.v)), spec)  # fmt: skip
    assert "present k has shape (2, 2, 4, 8), expected (2, 2, S >= 5, 8)" in short.message


def test_new_keys_is_concrete_and_never_more_than_a_row_holds() -> None:
    from refattn.testing import make_problem

    p = make_problem(ProblemSpec(q_len=3, k_len=6))
    assert p.new_keys == 3
    p = make_problem(ProblemSpec(q_len=3, k_len=6, new_keys=5, layout="ragged", batch=3, seed=1))
    assert p.new_keys == min(5, int((np.asarray(p.k_pos) >= 0).sum(axis=-1).min()))
    p = make_problem(ProblemSpec(q_len=4, k_len=6, new_keys=2))
    assert p.new_keys == 2  # a split inside the row, not at the queries
