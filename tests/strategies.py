"""Hypothesis strategies for attention problems: shapes and options drawn, data from a seed."""

from __future__ import annotations

from hypothesis import strategies as st

from refattn.testing.problems import LAYOUTS, ProblemSpec


@st.composite
def problem_specs(
    draw: st.DrawFn,
    *,
    max_len: int = 16,
    layouts: tuple[str, ...] = LAYOUTS,
    causal: bool | None = None,
    logit_sizes: tuple[float, ...] = (1.0, 30.0, 1e4),
    poison: bool | None = None,
    nan_slots: bool | None = None,
    options: bool = True,
) -> ProblemSpec:
    """Any attention problem, every option switched on or off by the draw."""
    kv_heads = draw(st.integers(1, 3))
    k_len = draw(st.integers(0, max_len))
    maybe = st.booleans() if options else st.just(False)
    return ProblemSpec(
        batch=draw(st.integers(1, 3)),
        q_heads=kv_heads * draw(st.integers(1, 3)),
        kv_heads=kv_heads,
        q_len=draw(st.integers(0, max_len)),
        k_len=k_len,
        head_dim=draw(st.sampled_from([1, 2, 3, 8, 13, 16])),
        value_dim=draw(st.sampled_from([1, 3, 8])),
        causal=draw(st.booleans()) if causal is None else causal,
        layout=draw(st.sampled_from(layouts)),
        window=draw(st.none() | st.integers(1, k_len + 2)) if options else None,
        sink_tokens=draw(st.integers(0, 3)) if options else 0,
        softcap=draw(st.none() | st.floats(0.5, 50.0)) if options else None,
        alibi=draw(maybe),
        sinks=draw(maybe),
        mask=draw(maybe),
        bias=draw(maybe),
        scale=draw(st.none() | st.floats(0.01, 2.0)) if options else None,
        logit_size=draw(st.sampled_from(logit_sizes)),
        poison=draw(st.booleans()) if poison is None else poison,
        nan_slots=(draw(st.booleans()) if options else False) if nan_slots is None else nan_slots,
        seed=draw(st.integers(0, 2**32 - 1)),
    )
