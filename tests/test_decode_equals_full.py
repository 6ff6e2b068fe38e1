"""The property of the mission: decoding chunk by chunk equals full causal attention.

Keys and values of earlier tokens are kept (here by plain concatenation; the
caches come later); queries are used once, by their own chunk. The outputs of
all chunks, concatenated, equal causal attention over the whole sequence, to
rounding. Both sides are measured against the loop oracle of the full pass.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, note
from hypothesis import strategies as st

from refattn.backends import Case
from refattn.testing.drawing import ALL_FEATURES, MASK_FEATURES
from refattn.testing.oracle import oracle_attention
from refattn.testing.problems import ProblemSpec, build_problem
from refattn.testing.selfcheck.agreement import measure_decode
from refattn.testing.strategies import attention_specs
from refattn.testing.tolerance import max_abs_error
from refattn.testing.verdict import run_spec


@st.composite
def sequences(draw: st.DrawFn, max_len: int = 20) -> ProblemSpec:
    """A causal self-attention problem over one sequence, optionally left padded per row."""
    # No mask or bias: they are shaped for one pass, and a decode step has neither.
    spec = draw(attention_specs(ALL_FEATURES - {"long", *MASK_FEATURES, "bias"}, max_len=max_len))
    n = draw(st.integers(1, max_len))
    layout = draw(st.sampled_from(("bottom_right", "left_padded")))
    fields = {"q_len": n, "k_len": n, "causal": True, "layout": layout}
    return ProblemSpec(**{**spec.__dict__, **fields})


@st.composite
def schedules(draw: st.DrawFn, n: int) -> list[int]:
    """A prefill of any length (0 included), then chunks of 1 or more tokens."""
    prefill = draw(st.integers(0, n))
    chunks = [prefill] if prefill else []
    while sum(chunks) < n:
        chunks.append(draw(st.integers(1, n - sum(chunks))))
    return chunks


@given(spec=sequences(), data=st.data())
def test_chunked_decoding_equals_full_causal_attention(
    case: Case, spec: ProblemSpec, data: st.DataObject
) -> None:
    chunks = data.draw(schedules(spec.q_len), label="chunks")
    agreement = measure_decode(build_problem(spec), chunks, case, oracle_attention)
    note(f"{agreement}")
    assert agreement.passed, agreement


@given(spec=sequences(), extra=st.integers(1, 8))
def test_appending_tokens_never_changes_earlier_outputs(
    case: Case, spec: ProblemSpec, extra: int
) -> None:
    """Causal attention over n tokens, then over n + extra: the first n outputs stay put."""
    longer = build_problem(
        ProblemSpec(**{**spec.__dict__, "q_len": spec.q_len + extra, "k_len": spec.k_len + extra})
    )
    n = spec.q_len
    arrays = longer.rounded(case.dtype)
    # Positions continue past the end of the shorter sequence.
    pad = np.maximum(-arrays["q_pos"][:, :1], 0)
    arrays["q_pos"] = np.arange(n + extra)[None, :] - pad
    arrays["k_pos"] = np.where(arrays["q_pos"] < 0, -1, arrays["q_pos"])
    shorter = {
        name: x[:, :, :n] if name in ("q", "k", "v") else x[:, :n] if name.endswith("_pos") else x
        for name, x in arrays.items()
    }
    scalars = longer.scalars()
    long_out, _ = run_spec(case, arrays, scalars)
    short_out, _ = run_spec(case, shorter, scalars)
    agreement = measure_decode(longer, [n + extra], case, oracle_attention)
    assert max_abs_error(long_out[:, :, :n], short_out) <= 2 * agreement.allowed


@given(spec=sequences())
def test_queries_of_earlier_tokens_are_never_needed(case: Case, spec: ProblemSpec) -> None:
    """Poison the queries of the earlier tokens: the output of the last token does not move.

    The last token's output reads its own query and every key and value, but
    no earlier query, which is why a KV cache stores keys and values only.
    """
    arrays = build_problem(spec).rounded(case.dtype)
    scalars = {**spec_scalars(spec), "causal": True}
    clean, _ = run_spec(case, arrays, scalars)
    poisoned_q = arrays["q"].copy()
    poisoned_q[:, :, :-1] = np.nan
    poisoned, _ = run_spec(case, {**arrays, "q": poisoned_q}, scalars)
    np.testing.assert_array_equal(poisoned[:, :, -1], clean[:, :, -1])


def spec_scalars(spec: ProblemSpec) -> dict[str, object]:
    return {
        "window": spec.window,
        "sink_tokens": spec.sink_tokens,
        "softcap": spec.softcap,
        "scale": spec.scale,
    }
