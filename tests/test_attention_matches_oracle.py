"""``attention`` equals the independent loop oracle, for every option, backend and dtype.

The allowed error is the spec's forward error bound, and on backends other
than NumPy also the cross-implementation rule (refattn.testing.tolerance).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from hypothesis import given, note
from hypothesis import strategies as st

from refattn.backends import Case
from refattn.testing.drawing import ALL_FEATURES
from refattn.testing.oracle import oracle_attention
from refattn.testing.problems import ProblemSpec, build_problem, seen_slots
from refattn.testing.selfcheck.agreement import measure
from refattn.testing.strategies import attention_specs
from refattn.testing.verdict import run_spec

#: Everything the spec takes but rows of 64+ keys, which the loop oracle is slow on.
SPEC = ALL_FEATURES - {"long"}
#: No option at all beyond positions, causality, groups and empty slots.
PLAIN = frozenset({"causal", "gqa", "positions", "empty_slots", "no_queries", "unseen_nan"})


@given(spec=attention_specs(SPEC))
def test_attention_equals_oracle_for_every_option(case: Case, spec: ProblemSpec) -> None:
    agreement = measure(build_problem(spec), case, oracle_attention)
    note(f"{agreement}")
    assert agreement.passed, agreement


@given(
    spec=attention_specs(SPEC - {"seen_nan"}, max_len=12).map(lambda s: replace(s, logit_size=1e4))
)
def test_logits_near_1e4_neither_overflow_nor_lose_accuracy(case: Case, spec: ProblemSpec) -> None:
    problem = build_problem(spec)
    arrays = problem.rounded(case.dtype)
    out, _ = run_spec(case, arrays, problem.scalars())
    assert not np.isnan(out).any()
    agreement = measure(problem, case, oracle_attention)
    assert agreement.passed, agreement


@given(
    spec=st.builds(
        lambda spec, layout: replace(spec, unseen_nan=True, layout=layout),
        attention_specs(SPEC - {"seen_nan"}),
        st.sampled_from(("top_left", "left_padded", "scattered")),
    )
)
def test_nan_in_slots_no_query_sees_never_reaches_the_output(case: Case, spec: ProblemSpec) -> None:
    """NaN, +inf or -inf (as ``spec.unseen_values`` says) where no query looks never shows."""
    problem = build_problem(spec)
    assert not np.isfinite(problem.k[:, :, ~seen_slots(problem).any(axis=0)]).any()
    out, lse = run_spec(case, problem.rounded(case.dtype), problem.scalars())
    assert np.isfinite(out).all()
    assert not np.isnan(lse).any() and not (lse == np.inf).any()


@given(spec=attention_specs(SPEC - {"seen_nan"}), data=st.data())
def test_rows_with_no_visible_key_give_zero_and_minus_inf_lse(
    case: Case, spec: ProblemSpec, data: st.DataObject
) -> None:
    problem = build_problem(spec)
    # Hide every key from a drawn subset of the queries by moving them before position 0.
    hidden = data.draw(st.lists(st.booleans(), min_size=spec.q_len, max_size=spec.q_len))
    hidden_rows = np.array(hidden, dtype=bool)
    problem.q_pos = np.where(hidden_rows[None, :], -5, problem.q_pos)
    problem.sink_logits = None
    scalars = {**problem.scalars(), "causal": True}
    out, lse = run_spec(case, problem.rounded(case.dtype), scalars)
    assert np.all(out[:, :, hidden_rows] == 0)
    assert np.all(lse[:, :, hidden_rows] == -np.inf)
    assert not np.isnan(out).any()


@given(spec=attention_specs(SPEC, max_len=10), extra=st.integers(1, 6))
def test_more_queries_than_keys_hides_the_queries_before_the_first_key(
    case: Case, spec: ProblemSpec, extra: int
) -> None:
    """Bottom-right alignment: with Sq > Sk the first Sq - Sk queries precede every key."""
    spec = ProblemSpec(**{**spec.__dict__, "q_len": spec.k_len + extra, "layout": "bottom_right"})
    problem = build_problem(spec)
    arrays = problem.rounded(case.dtype)
    for name in ("q_pos", "k_pos"):
        arrays.pop(name)  # the defaults are under test
    out, lse = run_spec(case, arrays, {**problem.scalars(), "causal": True})
    assert np.all(out[:, :, :extra] == 0)
    if problem.sink_logits is None:
        assert np.all(lse[:, :, :extra] == -np.inf)
    agreement = measure(problem, case, oracle_attention)
    assert agreement.passed, agreement


@given(spec=attention_specs(PLAIN, max_len=8))
def test_no_keys_at_all_gives_zero_output(case: Case, spec: ProblemSpec) -> None:
    spec = ProblemSpec(**{**spec.__dict__, "k_len": 0})
    problem = build_problem(spec)
    out, lse = run_spec(case, problem.rounded(case.dtype), problem.scalars())
    assert out.shape == (spec.batch, spec.q_heads, spec.q_len, spec.value_dim)
    assert np.all(out == 0)
    assert np.all(lse == -np.inf)
