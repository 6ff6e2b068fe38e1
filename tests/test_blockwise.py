"""Blockwise (online-softmax) attention, split-KV decoding and state merging, against the oracle."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from refattn import attention, attention_blockwise, attention_split_kv, merge_states, merge_states_n
from refattn.backends import Case
from refattn.testing.drawing import ALL_FEATURES
from refattn.testing.oracle import oracle_attention
from refattn.testing.problems import ProblemSpec, build_problem
from refattn.testing.selfcheck.agreement import measure
from refattn.testing.strategies import attention_specs
from refattn.testing.tolerance import (
    UNIT_ROUNDOFF,
    finite_max_abs,
    max_abs_error,
    spec_error_bound,
)

#: Everything the spec takes but rows of 64+ keys, which the loop oracle is slow on.
SPEC = ALL_FEATURES - {"long"}


@given(spec=attention_specs(SPEC), block_q=st.integers(1, 9), block_k=st.integers(1, 9))
def test_blockwise_equals_the_oracle_for_any_block_sizes_and_options(
    case: Case, spec: ProblemSpec, block_q: int, block_k: int
) -> None:
    # Tile-length rows (up to 257 queries and keys) in blocks of at least a sixteenth of
    # their length: at most 17 x 17 blocks, each tail block still ragged, not 257 x 257.
    block_q = max(block_q, -(-spec.q_len // 16))
    block_k = max(block_k, -(-spec.k_len // 16))
    fn = partial(attention_blockwise, block_q=block_q, block_k=block_k)
    agreement = measure(build_problem(spec), case, oracle_attention, fn)
    assert agreement.passed, agreement


@given(spec=attention_specs(SPEC), num_splits=st.integers(1, 7))
def test_split_kv_equals_the_oracle_for_any_number_of_splits(
    case: Case, spec: ProblemSpec, num_splits: int
) -> None:
    fn = partial(attention_split_kv, num_splits=num_splits)
    agreement = measure(build_problem(spec), case, oracle_attention, fn)
    assert agreement.passed, agreement


def _on(case: Case, arrays: dict[str, Any]) -> dict[str, Any]:
    return {
        n: case.backend.asarray(x, dtype=case.dtype, device=case.device) for n, x in arrays.items()
    }


@given(spec=attention_specs(SPEC - {"seen_nan"}), data=st.data())
def test_merging_the_states_of_any_partition_of_the_keys_equals_attention_over_all(
    case: Case, spec: ProblemSpec, data: st.DataObject
) -> None:
    """Keys dealt into parts at random (not contiguous); each part attended alone; merged."""
    spec = ProblemSpec(**{**spec.__dict__, "sink_logits": False})  # a sink belongs to no part
    problem = build_problem(spec)
    arrays = problem.rounded(case.dtype)
    scalars = problem.scalars()
    n_parts = data.draw(st.integers(1, 4), label="parts")
    owner = np.array(data.draw(st.lists(st.integers(0, n_parts - 1), min_size=spec.k_len,
                                        max_size=spec.k_len), label="owner"))  # fmt: skip
    outs, lses = [], []
    attend = case.backend.compiled(attention, **scalars, return_lse=True)  # jitted on JAX
    for part in range(n_parts):
        keys = np.flatnonzero(owner == part)
        sliced = dict(arrays)
        sliced["k"], sliced["v"] = arrays["k"][:, :, keys], arrays["v"][:, :, keys]
        sliced["k_pos"] = arrays["k_pos"][:, keys]
        for name in ("mask", "bias"):
            if name in arrays and arrays[name].shape[-1] != 1:
                sliced[name] = arrays[name][..., keys]
        out, lse = attend(**_on(case, sliced))
        outs.append(out)
        lses.append(lse)
    merged, merged_lse = merge_states_n(outs, lses)
    ref, ref_lse, weights = oracle_attention(**arrays, **scalars, return_weights=True)
    bound = spec_error_bound(
        arrays, dtype=case.dtype, scale=scalars["scale"], out=ref, weights=weights,
        lse_scale=max(1.0, finite_max_abs(ref_lse)),
    )  # fmt: skip
    # Each part's output is rounded to the dtype before the merge: one more rounding per part.
    allowed = 2 * bound.out + n_parts * UNIT_ROUNDOFF[case.dtype] * finite_max_abs(arrays["v"])
    assert max_abs_error(case.backend.to_numpy(merged), ref) <= allowed
    assert max_abs_error(case.backend.to_numpy(merged_lse), ref_lse) <= 2 * bound.lse


@st.composite
def states(draw: st.DrawFn, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """n partial states (out, lse) over (2, 3) rows of width 4; some parts empty (lse = -inf)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    result = []
    for _ in range(n):
        lse = rng.standard_normal((2, 3)) * draw(st.sampled_from([1.0, 30.0, 300.0]))
        lse = np.where(rng.random((2, 3)) < 0.3, -np.inf, lse)
        result.append((rng.standard_normal((2, 3, 4)), lse))
    return result


@given(parts=states(3))
def test_merge_is_commutative_and_associative(case: Case, parts) -> None:
    on = [(case.backend.asarray(o, dtype="float64" if case.dtype == "float64" else "float32",
                                device=case.device),
           case.backend.asarray(s, dtype="float64" if case.dtype == "float64" else "float32",
                                device=case.device)) for o, s in parts]  # fmt: skip
    (a, la), (b, lb), (c, lc) = on
    ab = merge_states(a, la, b, lb)
    ba = merge_states(b, lb, a, la)
    for x, y in zip(ab, ba, strict=True):
        np.testing.assert_array_equal(case.backend.to_numpy(x), case.backend.to_numpy(y))
    left = merge_states(*merge_states(a, la, b, lb), c, lc)
    right = merge_states(a, la, *merge_states(b, lb, c, lc))
    u = 2.0**-52 if case.dtype == "float64" else 2.0**-23
    # A part's weight is exp(lse_i - lse); the difference carries an absolute
    # rounding error of about u * |lse|, so the weights move by that relative amount.
    lse_size = max(1.0, max(float(np.abs(s[np.isfinite(s)]).max(initial=0)) for _, s in parts))
    for x, y in zip(left, right, strict=True):
        x, y = case.backend.to_numpy(x), case.backend.to_numpy(y)
        assert max_abs_error(x, y) <= 16 * u * lse_size * max(
            1.0, float(np.abs(y[np.isfinite(y)]).max(initial=0))
        )


def test_empty_parts_contribute_nothing_and_all_empty_gives_zero() -> None:
    out = np.arange(6.0).reshape(1, 2, 3)
    lse = np.array([[0.5, -1.0]])
    empty_out, empty_lse = np.full((1, 2, 3), np.nan), np.full((1, 2), -np.inf)
    merged, merged_lse = merge_states(out, lse, empty_out, empty_lse)
    np.testing.assert_array_equal(merged, out)
    np.testing.assert_array_equal(merged_lse, lse)
    nothing, nothing_lse = merge_states(empty_out, empty_lse, empty_out, empty_lse)
    np.testing.assert_array_equal(nothing, np.zeros((1, 2, 3)))
    assert np.all(nothing_lse == -np.inf)


@given(spec=attention_specs({"causal", "gqa", "positions", "empty_slots", "no_queries"}))
def test_lse_is_the_log_sum_exp_of_the_visible_scaled_scores(case: Case, spec: ProblemSpec) -> None:
    problem = build_problem(spec)
    arrays = problem.rounded(case.dtype)
    _, lse = attention(**_on(case, arrays), causal=spec.causal, return_lse=True)
    q, k = arrays["q"], np.repeat(arrays["k"], spec.q_heads // spec.kv_heads, axis=1)
    s = np.einsum("bhid,bhjd->bhij", q, k) / np.sqrt(spec.head_dim)
    q_pos, k_pos = arrays["q_pos"][:, None, :, None], arrays["k_pos"][:, None, None, :]
    visible = (k_pos >= 0) & ((k_pos <= q_pos) | (not spec.causal))
    s = np.where(visible, s, -np.inf)
    m = s.max(axis=-1, keepdims=True, initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):  # log 0 = -inf for a row with no visible key
        expected = np.log(np.sum(np.exp(s - m), axis=-1)) + m[..., 0]
    u = 2.0**-52 if case.dtype == "float64" else 2.0**-23
    allowed = 64 * u * (1 + finite_max_abs(s)) * (spec.head_dim + spec.k_len)
    assert max_abs_error(case.backend.to_numpy(lse), expected) <= allowed
