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

from hypothesis import assume
from hypothesis import strategies as st

from refattn.testing.constraints import ANY, Constraints
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
    draw: st.DrawFn, features: Iterable[str] | None = None, *, max_len: int = 16,
    constraints: Constraints = ANY,
) -> ProblemSpec:  # fmt: skip
    """An attention problem as ``check_attention`` draws it, narrowed to ``features``.

    ``features`` may also name what only the spec takes (``mask``, ``bias``,
    ``sink_logits``, ...: :data:`~refattn.testing.drawing.SPEC_ONLY_FEATURES`),
    to test the spec itself. Short rows have up to ``max_len`` queries and
    keys; with ``long``, about one problem in eight has 64 to 4096 keys.
    ``constraints`` (a kernel's :class:`~refattn.testing.constraints.Constraints`)
    narrow the draws to problems that kernel takes.
    """
    chosen = resolve_features(features, allowed=ALL_FEATURES)
    spec = draw_spec(HypothesisDraws(draw), chosen, max_len=max_len, constraints=constraints)
    assume(constraints.allows(spec))  # rare: what the drawing could not choose ahead
    return spec


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
    quantized: Sequence[tuple[str, str]] | None = None,
    layers: tuple[str, ...] | None = None,
    may_alias: bool = False,
) -> CacheSpec:
    """A decoding history for ``check_cache``: a prefill, then decode steps and chunks.

    ``window`` and ``sink_tokens`` are the cache's own (a sliding-window cache
    keeps only those keys); histories are drawn to run past the window.
    ``layers``, ``may_alias`` and ``bits`` are the check's, as given. A cache
    that quantizes (``bits``, or ``quantized``: the ``(format, scales)`` pairs
    to draw its codes from) gets histories with outlier tokens 4 or 16 times
    larger two times in three.

    >>> from hypothesis import given
    >>> @given(cache_specs(quantized=[("e4m3", "head"), ("e5m2", "tensor")]))
    ... def test_fp8(spec):
    ...     assert (spec.format, spec.scales) in [("e4m3", "head"), ("e5m2", "tensor")]
    >>> test_fp8()
    """
    kv_heads = draw(st.integers(1, 3))
    quantizes = bits is not None or quantized is not None
    codes = (None, "token") if quantized is None else draw(st.sampled_from(tuple(quantized)))
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
        format=codes[0],
        scales=codes[1],
        outlier_size=draw(st.sampled_from([1.0, 8.0, 32.0])) if quantizes else 1.0,
        layers=layers,
        may_alias=may_alias,
    )


def cache_features_of(spec: CacheSpec) -> frozenset[str]:
    """The features a history exercises: prefill, decode steps, chunks, GQA, past the window,
    outlier tokens, more than one layer."""
    tags = {
        "prefill": spec.steps[0] > 1,
        "decode": any(t == 1 for t in spec.steps[1:]),
        "chunks": any(t > 1 for t in spec.steps[1:]),
        "gqa": spec.q_heads > spec.kv_heads,
        "beyond_window": spec.window is not None and spec.length > spec.window + spec.sink_tokens,
        "outliers": spec.outlier_size > 1,
        "layers": len(spec.layer_kinds) > 1,
    }
    return frozenset(name for name, on in tags.items() if on)
