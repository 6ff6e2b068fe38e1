"""Hypothesis strategies for other projects' test suites: attention problems and cache schedules.

A drawn attention problem is a :class:`~refattn.testing.ProblemSpec`: shapes,
options and a seed, drawn by the one generator
:func:`refattn.testing.drawing.draw_spec` with Hypothesis as its source of
choices. Hypothesis shrinks the spec (fewer heads, shorter rows, options
switched off, seed 0), and :func:`~refattn.testing.build_problem` rebuilds
the same float64 arrays from it, so a failure is a line of code. The
features that narrow a draw are listed in :mod:`refattn.testing.drawing`.

>>> from hypothesis import given
>>> from refattn.testing.strategies import attention_specs
>>> @given(attention_specs(features={"causal", "gqa"}))
... def test_my_kernel(spec):
...     assert spec.window is None and spec.layout == "bottom_right"
>>> test_my_kernel()
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from hypothesis import strategies as st

from refattn.testing.drawing import (
    ALL_FEATURES,
    HEAD_DIMS,
    Choice,
    draw_spec,
    draw_steps,
    resolve_features,
)
from refattn.testing.problems import CacheSpec, Problem, ProblemSpec, build_problem


class HypothesisDraws:
    """The choices of :func:`~refattn.testing.drawing.draw_spec`, made by Hypothesis
    (so they shrink: integers towards the low end, choices towards the first)."""

    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw

    def integer(self, low: int, high: int) -> int:
        return self.draw(st.integers(low, high))

    def choice(self, options: Sequence[Choice]) -> Choice:
        return self.draw(st.sampled_from(options))

    def flag(self) -> bool:
        return self.draw(st.booleans())

    def real(self, low: float, high: float) -> float:
        return self.draw(st.floats(low, high))


@st.composite
def attention_specs(
    draw: st.DrawFn, features: Iterable[str] | None = None, *, max_len: int = 16
) -> ProblemSpec:
    """An attention problem as ``check_attention`` draws it, narrowed to ``features``.

    ``features`` may also name what only the spec takes (``mask``, ``bias``,
    ``sink_logits``, ...: :data:`~refattn.testing.drawing.SPEC_ONLY_FEATURES`),
    to test the spec itself. Short rows have up to ``max_len`` queries and
    keys; with ``long``, about one problem in six has 64 to 1024 keys.
    """
    chosen = resolve_features(features, allowed=ALL_FEATURES)
    return draw_spec(HypothesisDraws(draw), chosen, max_len=max_len)


def attention_problems(
    features: Iterable[str] | None = None, *, max_len: int = 16
) -> st.SearchStrategy[Problem]:
    """:func:`attention_specs` built into float64 NumPy arrays (a :class:`Problem`).

    >>> from hypothesis import given
    >>> @given(attention_problems(features={"gqa"}))
    ... def test_shapes(problem):
    ...     assert problem.q.shape[1] % problem.k.shape[1] == 0
    >>> test_shapes()
    """
    return attention_specs(features, max_len=max_len).map(build_problem)


@st.composite
def append_schedules(draw: st.DrawFn, *, max_len: int = 24, max_chunk: int = 6) -> list[int]:
    """How many tokens each ``update`` appends: a prefill of any length, then chunks.

    The sizes add up to at most ``max_len``; the first may be as long as
    ``max_len`` (a prompt), the rest at most ``max_chunk`` (decode steps and
    speculative chunks).

    >>> from hypothesis import given
    >>> @given(append_schedules(max_len=10))
    ... def test_total(steps):
    ...     assert 1 <= sum(steps) <= 10 and all(t >= 1 for t in steps)
    >>> test_total()
    """
    total = draw(st.integers(1, max_len))
    steps = [draw(st.integers(1, total))]
    while sum(steps) < total:
        steps.append(draw(st.integers(1, min(max_chunk, total - sum(steps)))))
    return steps


@st.composite
def ragged_schedules(
    draw: st.DrawFn, batch: int, *, max_len: int = 24, max_chunk: int = 6
) -> list[tuple[int, list[int]]]:
    """Per-row appends: steps ``(T, n_new)``, row b taking ``n_new[b] <= T`` real tokens.

    Each row gets its own total of at most ``max_len`` tokens; a row may take
    none at a step (it is waiting), or finish early
    (:func:`~refattn.testing.drawing.draw_steps`).
    """
    lengths = [draw(st.integers(0, max_len)) for _ in range(batch)]
    return draw_steps(HypothesisDraws(draw), lengths, max_chunk=max_chunk)


@st.composite
def cache_specs(
    draw: st.DrawFn,
    *,
    window: int | None = None,
    sink_tokens: int = 0,
    bits: int | None = None,
    max_len: int = 24,
    max_chunk: int = 6,
) -> CacheSpec:
    """A decoding history for ``check_cache``: a prefill, then decode steps and chunks.

    ``window`` and ``sink_tokens`` are the cache's own (a sliding-window cache
    keeps only those keys); histories are drawn to run past the window.
    """
    kv_heads = draw(st.integers(1, 3))
    return CacheSpec(
        batch=draw(st.integers(1, 3)),
        q_heads=kv_heads * draw(st.integers(1, 3)),
        kv_heads=kv_heads,
        head_dim=draw(st.sampled_from(HEAD_DIMS[:6])),
        steps=tuple(draw(append_schedules(max_len=max_len, max_chunk=max_chunk))),
        window=window,
        sink_tokens=sink_tokens,
        bits=bits,
        logit_size=draw(st.sampled_from([1.0, 30.0])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def cache_features_of(spec: CacheSpec) -> frozenset[str]:
    """The features a history exercises: prefill, decode steps, chunks, GQA, past the window."""
    tags = {
        "prefill": spec.steps[0] > 1,
        "decode": any(t == 1 for t in spec.steps[1:]),
        "chunks": any(t > 1 for t in spec.steps[1:]),
        "gqa": spec.q_heads > spec.kv_heads,
        "beyond_window": spec.window is not None and spec.length > spec.window + spec.sink_tokens,
    }
    return frozenset(name for name, on in tags.items() if on)
